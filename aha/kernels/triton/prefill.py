"""``triton``: Triton flash-attention kernels over queries sorted by route, global tiles split over the keys.

Each (batch, query head) orders its queries as ``flex`` does -- global ones first by descending
position, then local ones by position -- and cuts them into tiles of :data:`BLOCK_M` rows. A tile
reads one key range, the union of its rows' ranges, and masks per row inside it:

* A tile of local rows reads the sink keys before its band, then its band (about
  ``BLOCK_M / (1 - rho) + window`` keys). One program computes it and writes its rows.
* A tile that holds a global row reads a prefix of the keys. In the first :data:`SPLIT_TILES`
  tiles of a head (the ones with the latest, longest-prefix global rows) the prefix is split into
  :data:`NUM_SPLITS` key ranges, one program each (split-KV, as in flash-decoding). The programs
  write unnormalised partial outputs with their row maxima and sums, and a second kernel merges
  them with log-sum-exp weights. Later global tiles (high global fractions) have parallelism
  enough and run whole, like local tiles.

Splitting matters on a GPU. With rho = 0.07 only a few tiles per head are global, each a long
serial loop over the prefix, while the many local tiles finish at once. Unsplit, the global tiles
are the critical path (FlexAttention with the same sorted BlockMask measured 1.5x the causal time
on an H100 at n = 16384, ``benchmarks/RESULTS.md``). The split programs are launched first
(longest work first). Local-tile programs follow. There is no ``BlockMask`` to build and no
gather or scatter of q and the output: the kernels read q rows and write output rows through the
sort order. The partials have a fixed size (``SPLIT_TILES`` tiles per head), so there is no host
sync.

The backward recomputes the scores from the saved log2-sum-exp of each row (as FlashAttention-2
does). dq runs on the forward's programs (the split tiles split the same way, adding into fp32
``dq`` atomically). dk and dv run one program per key block, over the tiles whose key ranges
(saved by the forward) meet it, so a local tile is visited only by the blocks of its sink keys
and its band.

CUDA, or CPU tensors under ``TRITON_INTERPRET=1`` (Triton's interpreter, for testing without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Launch configuration, not yet tuned on a GPU (benchmarks/triton_tune.py sweeps it there).
BLOCK_M = 64  # sorted query rows per tile
BLOCK_N = 64  # keys per inner iteration
NUM_SPLITS = 8  # key ranges per split global tile
SPLIT_TILES = 16  # tiles per head that are split when they hold a global row
NUM_WARPS = 4
NUM_STAGES = 3
LOG2E = 1.4426950408889634


@triton.jit
def _allowed(keys, key_hi, position, is_global, first_key, sink_end, window):
    """``[rows, keys]`` bool: a row at ``position`` sees keys ``first_key..position``; a local row
    only those after ``position - window`` or before ``sink_end``; every row its own key (rows
    before the first real key, whose output ``aha_attention`` zeroes); no key from ``key_hi`` on."""
    key = keys[None, :]
    row = position[:, None]
    allowed = (key <= row) & (key >= first_key) & (is_global[:, None] | (key > row - window) | (key < sink_end))
    return (allowed | (key == row)) & (keys < key_hi)[None, :]


@triton.jit
def _attend_keys(
    q, k_base, v_base, stride_kn, stride_vn, key_lo, key_hi, position, is_global, first_key, sink_end, window,
    scale_log2e, acc, row_max, row_sum,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Online-softmax accumulation of keys ``[key_lo, key_hi)`` for a tile of rows.

    ``MASKED``: per row (:func:`_allowed`); rows with nothing allowed so far keep max ``-inf``,
    sum 0. Unmasked: the caller guarantees whole blocks that every row sees.
    """
    dims = tl.arange(0, HEAD_DIM)
    for key0 in range(key_lo, key_hi, BLOCK):
        keys = key0 + tl.arange(0, BLOCK)
        if MASKED:
            in_range = keys < key_hi
            k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=in_range[:, None], other=0.0)
            v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=in_range[:, None], other=0.0)
        else:
            k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :])
            v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :])
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
        if MASKED:
            allowed = _allowed(keys, key_hi, position, is_global, first_key, sink_end, window)
            scores = tl.where(allowed, scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, axis=1))
        pivot = tl.where(new_max == float("-inf"), 0.0, new_max)  # nothing allowed yet: weights 0, not NaN
        p = tl.exp2(scores - pivot[:, None])
        correction = tl.exp2(row_max - pivot)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        row_sum = row_sum * correction + tl.sum(p, axis=1)
        row_max = new_max
    return acc, row_max, row_sum


@triton.jit
def _attend_range(
    q, k_base, v_base, stride_kn, stride_vn, key_lo, key_hi, shared_lo, shared_hi, position, is_global, first_key,
    sink_end, window, scale_log2e, acc, row_max, row_sum,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Keys ``[key_lo, key_hi)``: the whole blocks inside ``[shared_lo, shared_hi)`` (keys every row
    sees) without masks, the blocks before and after them masked."""
    inner_lo = key_lo + tl.cdiv(tl.maximum(shared_lo - key_lo, 0), BLOCK) * BLOCK
    inner_hi = key_lo + tl.maximum(tl.minimum(key_hi, shared_hi) - key_lo, 0) // BLOCK * BLOCK
    no_inner = inner_hi <= inner_lo
    inner_lo = tl.where(no_inner, key_hi, inner_lo)
    inner_hi = tl.where(no_inner, key_hi, inner_hi)
    acc, row_max, row_sum = _attend_keys(
        q, k_base, v_base, stride_kn, stride_vn, key_lo, inner_lo, position, is_global, first_key, sink_end, window,
        scale_log2e, acc, row_max, row_sum, HEAD_DIM, BLOCK, PRECISION, True,
    )  # fmt: skip
    acc, row_max, row_sum = _attend_keys(
        q, k_base, v_base, stride_kn, stride_vn, inner_lo, inner_hi, position, is_global, first_key, sink_end, window,
        scale_log2e, acc, row_max, row_sum, HEAD_DIM, BLOCK, PRECISION, False,
    )  # fmt: skip
    return _attend_keys(
        q, k_base, v_base, stride_kn, stride_vn, inner_hi, key_hi, position, is_global, first_key, sink_end, window,
        scale_log2e, acc, row_max, row_sum, HEAD_DIM, BLOCK, PRECISION, True,
    )  # fmt: skip


@triton.jit
def _work_item(work, split_tiles, heads_total, n_global_ptr, BLOCK_M: tl.constexpr, NUM_SPLITS: tl.constexpr):
    """The tile a program computes: programs ``(split tile, split)`` come first, then one per
    whole tile; tile-major, so the first tiles of every head start before the second ones.

    Returns ``(is_split, split, head_row, tile, n_global, skip)`` (``split`` 0 for a whole tile); ``skip``: the other kind of
    program computes this tile (a split tile holds a global row and is one of the first
    ``split_tiles`` of its head).
    """
    split_work = split_tiles * heads_total * NUM_SPLITS
    is_split = work < split_work
    whole_work = work - split_work
    head_row = tl.where(is_split, (work // NUM_SPLITS) % heads_total, whole_work % heads_total)
    head_row = head_row.to(tl.int64)  # offsets from it pass 2**31 elements in large batches
    tile = tl.where(is_split, work // (NUM_SPLITS * heads_total), whole_work // heads_total)
    n_global = tl.load(n_global_ptr + head_row)
    skip = ((tile < split_tiles) & (tile * BLOCK_M < n_global)) != is_split
    return is_split, tl.where(is_split, work % NUM_SPLITS, 0), head_row, tile, n_global, skip


@triton.jit
def _sorted_rows(order_ptr, head_row, tile, seq_q, BLOCK_M: tl.constexpr):
    """A tile's rows in sorted order: ``(sorted_rows, row_valid, order)``; ``order`` is each row's
    original query index (0 for padding rows past ``seq_q``)."""
    sorted_rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = sorted_rows < seq_q
    return sorted_rows, row_valid, tl.load(order_ptr + head_row * seq_q + sorted_rows, mask=row_valid, other=0)


@triton.jit
def _rows(order_ptr, head_row, tile, n_global, seq_q, seq_kv, BLOCK_M: tl.constexpr):
    """:func:`_sorted_rows` and each row's key ``position`` (-1 for padding rows) and route:
    ``(sorted_rows, row_valid, order, position, is_global)``."""
    sorted_rows, row_valid, order = _sorted_rows(order_ptr, head_row, tile, seq_q, BLOCK_M)
    position = tl.where(row_valid, seq_kv - seq_q + order, -1)
    return sorted_rows, row_valid, order, position, sorted_rows < n_global


@triton.jit
def _tile_rows(order_ptr, head_row, tile, n_global, first_key, seq_q, seq_kv, window, BLOCK_M: tl.constexpr):
    """:func:`_rows` and the tile's key ranges: ``(sorted_rows, row_valid, order, position,
    is_global, tile_lo, tile_hi, shared_lo, shared_hi)``. ``[tile_lo, tile_hi)`` holds every key a
    row sees except the sink keys; ``[shared_lo, shared_hi)`` the keys every row sees (none when
    the tile has padding rows or queries before the first real key)."""
    sorted_rows, row_valid, order, position, is_global = _rows(order_ptr, head_row, tile, n_global, seq_q, seq_kv, BLOCK_M)
    row_lo = tl.where(is_global, first_key, tl.maximum(first_key, position - window + 1))
    row_lo = tl.minimum(row_lo, position)
    tile_lo = tl.min(tl.where(row_valid, row_lo, seq_kv), axis=0)
    tile_hi = tl.max(position, axis=0) + 1
    min_position = tl.min(tl.where(row_valid, position, seq_kv), axis=0)
    shares = ((tile + 1) * BLOCK_M <= seq_q) & (min_position >= first_key)
    shared_lo = tl.where(shares, tl.max(row_lo, axis=0), seq_kv)
    shared_hi = tl.where(shares, min_position + 1, 0)
    return sorted_rows, row_valid, order, position, is_global, tile_lo, tile_hi, shared_lo, shared_hi


@triton.jit
def _key_ranges(is_split, split, tile_lo, tile_hi, first_key, sink_end, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key ranges a program reads: ``[first_key, sink_hi)``, the sink keys before a whole
    tile's band (empty for split programs, and for global tiles, whose range starts at the first
    key), and ``[lo, hi)``, the whole tile's range or the split's share of it."""
    span = tl.cdiv(tl.cdiv(tile_hi - tile_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    split_lo = tile_lo + split * span
    sink_hi = tl.where(is_split, first_key, tl.minimum(sink_end, tile_lo))
    lo = tl.where(is_split, split_lo, tile_lo)
    hi = tl.where(is_split, tl.minimum(split_lo + span, tile_hi), tile_hi)
    return sink_hi, lo, hi


@triton.jit
def _tile_program(
    work, split_tiles, heads_total, q_heads, n_global_ptr, first_key_ptr, order_ptr, seq_q, seq_kv, window, sink,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """What a program of the forward (and of the dq backward) computes: :func:`_work_item`, then
    :func:`_tile_rows` and :func:`_key_ranges` of its tile. Returns ``(skip, is_split, split,
    head_row, tile, batch, head, first_key, sink_end, sorted_rows, row_valid, order, position,
    is_global, tile_lo, tile_hi, shared_lo, shared_hi, sink_hi, lo, hi)``."""
    is_split, split, head_row, tile, n_global, skip = _work_item(work, split_tiles, heads_total, n_global_ptr, BLOCK_M, NUM_SPLITS)
    batch = head_row // q_heads
    first_key = tl.load(first_key_ptr + batch)
    sink_end = first_key + sink
    sorted_rows, row_valid, order, position, is_global, tile_lo, tile_hi, shared_lo, shared_hi = _tile_rows(
        order_ptr, head_row, tile, n_global, first_key, seq_q, seq_kv, window, BLOCK_M
    )
    sink_hi, lo, hi = _key_ranges(is_split, split, tile_lo, tile_hi, first_key, sink_end, NUM_SPLITS, BLOCK_N)
    return (
        skip, is_split, split, head_row, tile, batch, head_row % q_heads, first_key, sink_end, sorted_rows, row_valid,
        order, position, is_global, tile_lo, tile_hi, shared_lo, shared_hi, sink_hi, lo, hi,
    )  # fmt: skip


@triton.jit
def _load_q_rows(q_ptr, batch, head, order, row_valid, stride_qb, stride_qh, stride_qn, HEAD_DIM: tl.constexpr):
    """q rows ``[BLOCK_M, HEAD_DIM]`` of a tile, gathered through ``order`` (padding rows: 0)."""
    rows = q_ptr + batch * stride_qb + head * stride_qh + order[:, None] * stride_qn
    return tl.load(rows + tl.arange(0, HEAD_DIM)[None, :], mask=row_valid[:, None], other=0.0)


@triton.jit
def _load_grad_rows(do_ptr, lse_ptr, delta_ptr, head_row, seq_q, sorted_rows, order, row_valid, HEAD_DIM: tl.constexpr):
    """The backward's inputs for a tile's rows: ``do`` (contiguous ``[B, Hq, Sq, D]``), the saved
    log2-sum-exp (sorted order) and ``delta = rowsum(do * out)`` (original order)."""
    do_rows = do_ptr + (head_row * seq_q + order)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    do = tl.load(do_rows, mask=row_valid[:, None], other=0.0)
    lse = tl.load(lse_ptr + head_row * seq_q + sorted_rows, mask=row_valid, other=0.0)
    delta = tl.load(delta_ptr + head_row * seq_q + order, mask=row_valid, other=0.0)
    return do, lse, delta


@triton.jit
def _store_rows(out_ptr, lse_ptr, head_row, seq_q, sorted_rows, order, row_valid, acc, row_max, row_sum, HEAD_DIM: tl.constexpr):
    """Normalise a tile's rows and write them to their original positions ``order``, and their
    log2-sum-exp (for the backward) in sorted order; padding rows write nothing."""
    row_sum = tl.where(row_valid, row_sum, 1.0)
    out_rows = out_ptr + (head_row * seq_q + order)[:, None] * HEAD_DIM
    out = (acc / row_sum[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_rows + tl.arange(0, HEAD_DIM)[None, :], out, mask=row_valid[:, None])
    tl.store(lse_ptr + head_row * seq_q + sorted_rows, row_max + tl.log2(row_sum), mask=row_valid)


@triton.jit
def _prefill_tiles(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, order_ptr, n_global_ptr, first_key_ptr, tile_lo_ptr, tile_hi_ptr,
    acc_ptr, max_ptr, sum_ptr,
    seq_q, seq_kv, window, sink, scale_log2e, q_heads, group, heads_total, q_tiles, split_tiles,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Forward: whole tiles write their rows; split programs write partials for :func:`_merge_splits`.
    Every tile's key range goes to ``tile_lo``/``tile_hi`` for the backward."""
    (
        skip, is_split, split, head_row, tile, batch, head, first_key, sink_end, sorted_rows, row_valid, order, position,
        is_global, tile_lo, tile_hi, shared_lo, shared_hi, sink_hi, lo, hi,
    ) = _tile_program(
        tl.program_id(0), split_tiles, heads_total, q_heads, n_global_ptr, first_key_ptr, order_ptr, seq_q, seq_kv,
        window, sink, BLOCK_M, BLOCK_N, NUM_SPLITS,
    )  # fmt: skip
    if skip:
        return
    if split == 0:
        tl.store(tile_lo_ptr + head_row * q_tiles + tile, tile_lo)
        tl.store(tile_hi_ptr + head_row * q_tiles + tile, tile_hi)

    dims = tl.arange(0, HEAD_DIM)
    q = _load_q_rows(q_ptr, batch, head, order, row_valid, stride_qb, stride_qh, stride_qn, HEAD_DIM)
    k_base = k_ptr + batch * stride_kb + (head // group) * stride_kh
    v_base = v_ptr + batch * stride_vb + (head // group) * stride_vh
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, row_max, row_sum = _attend_keys(
        q, k_base, v_base, stride_kn, stride_vn, first_key, sink_hi, position, is_global, first_key, sink_end, window,
        scale_log2e, acc, row_max, row_sum, HEAD_DIM, BLOCK_N, PRECISION, True,
    )  # fmt: skip
    acc, row_max, row_sum = _attend_range(
        q, k_base, v_base, stride_kn, stride_vn, lo, hi, shared_lo, shared_hi, position, is_global, first_key,
        sink_end, window, scale_log2e, acc, row_max, row_sum, HEAD_DIM, BLOCK_N, PRECISION,
    )  # fmt: skip
    if is_split:
        slot_rows = ((head_row * split_tiles + tile) * NUM_SPLITS + split) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(acc_ptr + slot_rows[:, None] * HEAD_DIM + dims[None, :], acc)
        tl.store(max_ptr + slot_rows, row_max)
        tl.store(sum_ptr + slot_rows, row_sum)
    else:
        _store_rows(out_ptr, lse_ptr, head_row, seq_q, sorted_rows, order, row_valid, acc, row_max, row_sum, HEAD_DIM)


@triton.jit
def _merge_splits(
    acc_ptr, max_ptr, sum_ptr, out_ptr, lse_ptr, order_ptr, n_global_ptr, seq_q, heads_total, split_tiles,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, NUM_SPLITS: tl.constexpr,
):  # fmt: skip
    """One program per split tile: merge its splits' partials and write its rows (tiles without a global row exit)."""
    work = tl.program_id(0)
    head_row = (work % heads_total).to(tl.int64)
    tile = work // heads_total
    if tile * BLOCK_M >= tl.load(n_global_ptr + head_row):
        return
    rows = tl.arange(0, BLOCK_M)
    dims = tl.arange(0, HEAD_DIM)
    first_slot = (head_row * split_tiles + tile) * NUM_SPLITS
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in tl.static_range(NUM_SPLITS):
        row_max = tl.maximum(row_max, tl.load(max_ptr + (first_slot + split) * BLOCK_M + rows))
    row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # padding rows: every split empty
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    for split in tl.static_range(NUM_SPLITS):
        slot_rows = (first_slot + split) * BLOCK_M + rows
        weight = tl.exp2(tl.load(max_ptr + slot_rows) - row_max)  # an empty split has max -inf: weight 0
        row_sum += weight * tl.load(sum_ptr + slot_rows)
        acc += weight[:, None] * tl.load(acc_ptr + slot_rows[:, None] * HEAD_DIM + dims[None, :])
    sorted_rows, row_valid, order = _sorted_rows(order_ptr, head_row, tile, seq_q, BLOCK_M)
    _store_rows(out_ptr, lse_ptr, head_row, seq_q, sorted_rows, order, row_valid, acc, row_max, row_sum, HEAD_DIM)


@triton.jit
def _probabilities_and_score_grads(
    q, k, v, do, lse, delta, keys, key_hi, position, is_global, first_key, sink_end, window, scale_log2e,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Recomputed ``p`` and ``ds = p * (dp - delta)`` of a ``[rows, keys]`` block (masked pairs: 0)."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
    allowed = _allowed(keys, key_hi, position, is_global, first_key, sink_end, window)
    p = tl.where(allowed, tl.exp2(scores - lse[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    return p, p * (dp - delta[:, None])


@triton.jit
def _dq_keys(
    q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, key_lo, key_hi, position, is_global, first_key,
    sink_end, window, scale_log2e, dq, HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    dims = tl.arange(0, HEAD_DIM)
    for key0 in range(key_lo, key_hi, BLOCK):
        keys = key0 + tl.arange(0, BLOCK)
        in_range = (keys < key_hi)[:, None]
        k = tl.load(k_base + keys[:, None] * stride_kn + dims[None, :], mask=in_range, other=0.0)
        v = tl.load(v_base + keys[:, None] * stride_vn + dims[None, :], mask=in_range, other=0.0)
        _, ds = _probabilities_and_score_grads(
            q, k, v, do, lse, delta, keys, key_hi, position, is_global, first_key, sink_end, window, scale_log2e, PRECISION
        )
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    return dq


@triton.jit
def _dq_tiles(
    q_ptr, k_ptr, v_ptr, do_ptr, dq_ptr, lse_ptr, delta_ptr, order_ptr, n_global_ptr, first_key_ptr,
    seq_q, seq_kv, window, sink, scale, scale_log2e, q_heads, group, heads_total, split_tiles,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """Backward, dq: the forward's programs (split tiles split the same way) add ``scale * ds @ k``
    of their key ranges into the fp32 ``dq`` rows."""
    (
        skip, _, _, head_row, _, batch, head, first_key, sink_end, sorted_rows, row_valid, order, position,
        is_global, _, _, _, _, sink_hi, lo, hi,
    ) = _tile_program(
        tl.program_id(0), split_tiles, heads_total, q_heads, n_global_ptr, first_key_ptr, order_ptr, seq_q, seq_kv,
        window, sink, BLOCK_M, BLOCK_N, NUM_SPLITS,
    )  # fmt: skip
    if skip:
        return
    q = _load_q_rows(q_ptr, batch, head, order, row_valid, stride_qb, stride_qh, stride_qn, HEAD_DIM)
    do, lse, delta = _load_grad_rows(do_ptr, lse_ptr, delta_ptr, head_row, seq_q, sorted_rows, order, row_valid, HEAD_DIM)
    k_base = k_ptr + batch * stride_kb + (head // group) * stride_kh
    v_base = v_ptr + batch * stride_vb + (head // group) * stride_vh
    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    dq = _dq_keys(
        q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, first_key, sink_hi, position, is_global, first_key,
        sink_end, window, scale_log2e, dq, HEAD_DIM, BLOCK_N, PRECISION,
    )  # fmt: skip
    dq = _dq_keys(
        q, do, lse, delta, k_base, v_base, stride_kn, stride_vn, lo, hi, position, is_global, first_key,
        sink_end, window, scale_log2e, dq, HEAD_DIM, BLOCK_N, PRECISION,
    )  # fmt: skip
    dq_rows = dq_ptr + (head_row * seq_q + order)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :]
    tl.atomic_add(dq_rows, dq * scale, mask=row_valid[:, None])


@triton.jit
def _dkdv_blocks(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, lse_ptr, delta_ptr, order_ptr, n_global_ptr, first_key_ptr,
    tile_lo_ptr, tile_hi_ptr,
    seq_q, seq_kv, window, sink, scale, scale_log2e, q_heads, kv_heads, group, q_tiles, kv_rows,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """Backward, dk and dv: one program per (key block, batch * KV head), key-block-major (the
    first blocks, read by every global tile, start first). It visits every tile of the KV head's
    query heads whose key ranges (saved by the forward) meet its block and accumulates
    ``p^T @ do`` and ``scale * ds^T @ q``."""
    work = tl.program_id(0)
    kv_row = (work % kv_rows).to(tl.int64)
    block = work // kv_rows
    batch = kv_row // kv_heads
    kv_head = kv_row % kv_heads
    first_key = tl.load(first_key_ptr + batch)
    sink_end = first_key + sink
    keys = block * BLOCK_N + tl.arange(0, BLOCK_N)
    key_valid = (keys < seq_kv)[:, None]
    dims = tl.arange(0, HEAD_DIM)
    k = tl.load(k_ptr + batch * stride_kb + kv_head * stride_kh + keys[:, None] * stride_kn + dims[None, :], mask=key_valid, other=0.0)
    v = tl.load(v_ptr + batch * stride_vb + kv_head * stride_vh + keys[:, None] * stride_vn + dims[None, :], mask=key_valid, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    block_lo = block * BLOCK_N
    block_hi = block_lo + BLOCK_N
    for member in range(group):
        head = kv_head * group + member
        head_row = batch * q_heads + head
        n_global = tl.load(n_global_ptr + head_row)
        for tile in range(q_tiles):
            tile_lo = tl.load(tile_lo_ptr + head_row * q_tiles + tile)
            tile_hi = tl.load(tile_hi_ptr + head_row * q_tiles + tile)
            sink_hi = tl.minimum(sink_end, tile_lo)
            if ((block_lo < tile_hi) & (block_hi > tile_lo)) | ((block_lo < sink_hi) & (block_hi > first_key)):
                sorted_rows, row_valid, order, position, is_global = _rows(
                    order_ptr, head_row, tile, n_global, seq_q, seq_kv, BLOCK_M
                )
                q = _load_q_rows(q_ptr, batch, head, order, row_valid, stride_qb, stride_qh, stride_qn, HEAD_DIM)
                do, lse, delta = _load_grad_rows(
                    do_ptr, lse_ptr, delta_ptr, head_row, seq_q, sorted_rows, order, row_valid, HEAD_DIM
                )
                p, ds = _probabilities_and_score_grads(
                    q, k, v, do, lse, delta, keys, seq_kv, position, is_global, first_key, sink_end, window,
                    scale_log2e, PRECISION,
                )  # fmt: skip
                dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PRECISION)
                dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)
    out_rows = (kv_row * seq_kv + keys)[:, None] * HEAD_DIM + dims[None, :]  # dk, dv: contiguous [B, Hkv, Skv, D]
    tl.store(dk_ptr + out_rows, (dk * scale).to(dk_ptr.dtype.element_ty), mask=key_valid)
    tl.store(dv_ptr + out_rows, dv.to(dv_ptr.dtype.element_ty), mask=key_valid)


def _strides(*tensors: Tensor) -> list[int]:
    """Batch, head and sequence strides of each ``[B, H, S, D]`` tensor, in order."""
    return [stride for t in tensors for stride in t.stride()[:3]]


def _tile_grid(heads_total: int, q_tiles: int) -> tuple[int, int]:
    """``(split_tiles, programs)`` of the forward and dq launches: the first ``split_tiles`` tiles of
    a head may be split (``NUM_SPLITS`` programs each), every tile may run whole (:func:`_work_item`)."""
    split_tiles = min(SPLIT_TILES, q_tiles)
    return split_tiles, split_tiles * heads_total * NUM_SPLITS + heads_total * q_tiles


def _precision(dtype: torch.dtype) -> str:
    """fp32 dots in full precision (the 1e-5 contract); 16-bit inputs use the tensor cores as they are."""
    return "ieee" if dtype == torch.float32 else "tf32"


def _last_dim_contiguous(*tensors: Tensor) -> list[Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


@torch.library.custom_op("aha::triton_prefill", mutates_args=())
def _prefill_op(
    q: Tensor, k: Tensor, v: Tensor, hard: Tensor, first_key: Tensor, window: int, sink: int, scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The forward kernels -> ``(out, lse, order, n_global, tile_range)``; the last four are saved for the backward."""
    batch, q_heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    q, k, v = _last_dim_contiguous(q, k, v)
    positions = torch.arange(seq_q, device=q.device, dtype=torch.int32)
    order = torch.argsort(torch.where(hard, -1 - positions, positions), dim=-1).to(torch.int32)
    n_global = hard.sum(-1, dtype=torch.int32).flatten()
    heads_total = batch * q_heads
    q_tiles = triton.cdiv(seq_q, BLOCK_M)
    split_tiles, programs = _tile_grid(heads_total, q_tiles)
    slots = split_tiles * heads_total * NUM_SPLITS * BLOCK_M
    partials = torch.empty(slots * (head_dim + 2), dtype=torch.float32, device=q.device)
    acc, row_max, row_sum = partials.split([slots * head_dim, slots, slots])
    tile_range = torch.empty(2, heads_total, q_tiles, dtype=torch.int32, device=q.device)
    out = torch.empty(batch, q_heads, seq_q, head_dim, dtype=q.dtype, device=q.device)
    lse = torch.empty(heads_total, seq_q, dtype=torch.float32, device=q.device)
    _prefill_tiles[(programs,)](
        q, k, v, out, lse, order, n_global, first_key, tile_range[0], tile_range[1], acc, row_max, row_sum,
        seq_q, seq_kv, window, sink, scale * LOG2E, q_heads, q_heads // k.shape[1], heads_total, q_tiles, split_tiles,
        *_strides(q, k, v), HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_SPLITS=NUM_SPLITS,
        PRECISION=_precision(q.dtype), num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    _merge_splits[(split_tiles * heads_total,)](
        acc, row_max, row_sum, out, lse, order, n_global, seq_q, heads_total, split_tiles,
        HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, NUM_SPLITS=NUM_SPLITS,
    )  # fmt: skip
    return out, lse, order, n_global, tile_range


@_prefill_op.register_fake
def _prefill_fake(q, k, v, hard, first_key, window, sink, scale):
    batch, q_heads, seq_q, _ = q.shape
    heads_total = batch * q_heads
    q_tiles = (seq_q + BLOCK_M - 1) // BLOCK_M
    int32 = {"dtype": torch.int32}
    return (
        q.new_empty(q.shape),
        q.new_empty(heads_total, seq_q, dtype=torch.float32),
        q.new_empty(batch, q_heads, seq_q, **int32),
        q.new_empty(heads_total, **int32),
        q.new_empty(2, heads_total, q_tiles, **int32),
    )


@torch.library.custom_op("aha::triton_prefill_backward", mutates_args=())
def _prefill_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, order: Tensor, n_global: Tensor,
    first_key: Tensor, tile_range: Tensor, window: int, sink: int, scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The dq and dk-dv kernels -> ``(dq, dk, dv)``; the tile ranges saved by the forward are per ``BLOCK_M`` rows."""
    q, k, v = _last_dim_contiguous(q, k, v)
    batch, q_heads, seq_q, head_dim = q.shape
    kv_heads, seq_kv = k.shape[1], k.shape[2]
    grad_out = grad_out.contiguous()
    delta = (grad_out.float() * out.float()).sum(-1)  # [B, Hq, Sq]: rowsum(do * o)
    heads_total = batch * q_heads
    q_tiles = tile_range.shape[-1]
    split_tiles, programs = _tile_grid(heads_total, q_tiles)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = torch.empty(k.shape, dtype=k.dtype, device=k.device), torch.empty(v.shape, dtype=v.dtype, device=v.device)
    common = dict(HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, PRECISION=_precision(q.dtype), num_warps=NUM_WARPS)
    _dq_tiles[(programs,)](
        q, k, v, grad_out, dq, lse, delta, order, n_global, first_key,
        seq_q, seq_kv, window, sink, scale, scale * LOG2E, q_heads, q_heads // kv_heads, heads_total, split_tiles,
        *_strides(q, k, v), NUM_SPLITS=NUM_SPLITS, **common,
    )  # fmt: skip
    kv_rows = batch * kv_heads
    _dkdv_blocks[(triton.cdiv(seq_kv, BLOCK_N) * kv_rows,)](
        q, k, v, grad_out, dk, dv, lse, delta, order, n_global, first_key, tile_range[0], tile_range[1],
        seq_q, seq_kv, window, sink, scale, scale * LOG2E, q_heads, kv_heads, q_heads // kv_heads, q_tiles, kv_rows,
        *_strides(q, k, v), **common,
    )  # fmt: skip
    return dq.to(q.dtype), dk, dv


@_prefill_backward_op.register_fake
def _prefill_backward_fake(grad_out, q, k, v, out, lse, order, n_global, first_key, tile_range, window, sink, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, _, first_key, window, sink, scale = inputs
    out, lse, order, n_global, tile_range = output
    ctx.save_for_backward(q, k, v, out, lse, order, n_global, first_key, tile_range)
    ctx.settings = (window, sink, scale)


def _backward(ctx, grad_out, *_unused):
    q, k, v, out, lse, order, n_global, first_key, tile_range = ctx.saved_tensors
    dq, dk, dv = _prefill_backward_op(grad_out, q, k, v, out, lse, order, n_global, first_key, tile_range, *ctx.settings)
    return dq, dk, dv, None, None, None, None, None


_prefill_op.register_autograd(_backward, setup_context=_setup_context)


def triton_prefill(
    q: Tensor, k: Tensor, v: Tensor, hard: Tensor, window: int, scale: float, first_key: Tensor, sink: int = 0
) -> Tensor:
    """AHA attention for a bool route: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]``, ``hard``
    ``[B, Hq, Sq]`` (True = global), ``first_key`` ``[B]`` int32 (first real key per row), ``sink``
    keys local rows also see -> ``[B, Hq, Sq, D]``; differentiable in q, k and v (``torch.ops.aha.triton_prefill``
    with its registered backward, so ``torch.compile`` and ``torch.export`` see single nodes)."""
    return _prefill_op(q, k, v, hard, first_key, window, sink, float(scale))[0]
