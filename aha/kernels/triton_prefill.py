"""``triton``: a Triton flash-attention forward over queries sorted by route, global tiles split over the keys.

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

Forward only (inference); training uses ``flex``. CUDA, or CPU tensors under
``TRITON_INTERPRET=1`` (Triton's interpreter, for testing without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from aha.kernels._checks import AhaInputError
from aha.kernels.cpp import key_start
from aha.kernels.gating import apply_route_with_kernel
from aha.kernels.triton_decode import triton_available

# Launch configuration, not yet tuned on a GPU (benchmarks/triton_tune.py sweeps it there).
BLOCK_M = 64  # sorted query rows per tile
BLOCK_N = 64  # keys per inner iteration
NUM_SPLITS = 8  # key ranges per split global tile
SPLIT_TILES = 16  # tiles per head that are split when they hold a global row
NUM_WARPS = 4
NUM_STAGES = 3
LOG2E = 1.4426950408889634


@triton.jit
def _attend_keys(
    q, k_base, v_base, stride_kn, stride_vn, key_lo, key_hi, position, is_global, first_key, sink_end, window,
    scale_log2e, acc, row_max, row_sum,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """Online-softmax accumulation of keys ``[key_lo, key_hi)`` for a tile of rows.

    ``MASKED``: per row, a row at ``position`` sees keys ``first_key..position``; a local row only
    those after ``position - window`` or before ``sink_end``; every row its own key (rows before
    the first real key, whose output the caller zeroes). Rows with nothing allowed so far keep max
    ``-inf``, sum 0. Unmasked: the caller guarantees whole blocks that every row sees.
    """
    dims = tl.arange(0, HEAD_DIM)
    row = position[:, None]
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
            key = keys[None, :]
            allowed = (key <= row) & (key >= first_key) & (is_global[:, None] | (key > row - window) | (key < sink_end))
            allowed = (allowed | (key == row)) & in_range[None, :]
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
def _store_rows(out_ptr, head_row, seq_q, order, row_valid, acc, row_sum, HEAD_DIM: tl.constexpr):
    """Normalise a tile's rows and write them to their original positions ``order`` (padding rows: nothing)."""
    out = acc / tl.where(row_valid, row_sum, 1.0)[:, None]
    out_rows = out_ptr + (head_row * seq_q + order)[:, None] * HEAD_DIM
    tl.store(out_rows + tl.arange(0, HEAD_DIM)[None, :], out.to(out_ptr.dtype.element_ty), mask=row_valid[:, None])


@triton.jit
def _prefill_tiles(
    q_ptr, k_ptr, v_ptr, out_ptr, order_ptr, n_global_ptr, first_key_ptr, acc_ptr, max_ptr, sum_ptr,
    seq_q, seq_kv, window, sink, scale_log2e, q_heads, group, heads_total, split_tiles,
    stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """One program per (split tile, split) first, then one per whole tile; tile-major, so the
    first tiles of every head start before the second ones."""
    work = tl.program_id(0)
    split_work = split_tiles * heads_total * NUM_SPLITS
    is_split = work < split_work
    split = work % NUM_SPLITS  # read by split programs only
    whole_work = work - split_work
    head_row = tl.where(is_split, (work // NUM_SPLITS) % heads_total, whole_work % heads_total)
    tile = tl.where(is_split, work // (NUM_SPLITS * heads_total), whole_work // heads_total)
    head_row = head_row.to(tl.int64)  # offsets from it pass 2**31 elements in large batches
    n_global = tl.load(n_global_ptr + head_row)
    if ((tile < split_tiles) & (tile * BLOCK_M < n_global)) != is_split:  # the other kind of program computes it
        return
    batch = head_row // q_heads
    head = head_row % q_heads
    kv_head = head // group
    first_key = tl.load(first_key_ptr + batch)
    sorted_rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_valid = sorted_rows < seq_q
    order = tl.load(order_ptr + head_row * seq_q + sorted_rows, mask=row_valid, other=0)
    position = tl.where(row_valid, seq_kv - seq_q + order, -1)
    is_global = sorted_rows < n_global
    row_lo = tl.where(is_global, first_key, tl.maximum(first_key, position - window + 1))
    row_lo = tl.minimum(row_lo, position)
    tile_lo = tl.min(tl.where(row_valid, row_lo, seq_kv), axis=0)
    tile_hi = tl.max(position, axis=0) + 1
    # keys every row sees (none when the tile has padding rows or queries before the first real key)
    min_position = tl.min(tl.where(row_valid, position, seq_kv), axis=0)
    shares = ((tile + 1) * BLOCK_M <= seq_q) & (min_position >= first_key)
    shared_lo = tl.where(shares, tl.max(row_lo, axis=0), seq_kv)
    shared_hi = tl.where(shares, min_position + 1, 0)
    sink_end = first_key + sink

    dims = tl.arange(0, HEAD_DIM)
    q_rows = q_ptr + batch * stride_qb + head * stride_qh + order[:, None] * stride_qn
    q = tl.load(q_rows + dims[None, :], mask=row_valid[:, None], other=0.0)
    k_base = k_ptr + batch * stride_kb + kv_head * stride_kh
    v_base = v_ptr + batch * stride_vb + kv_head * stride_vh
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    row_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    if is_split:
        span = tl.cdiv(tl.cdiv(tile_hi - tile_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
        lo = tile_lo + split * span
        acc, row_max, row_sum = _attend_range(
            q, k_base, v_base, stride_kn, stride_vn, lo, tl.minimum(lo + span, tile_hi), shared_lo, shared_hi,
            position, is_global, first_key, sink_end, window, scale_log2e, acc, row_max, row_sum,
            HEAD_DIM, BLOCK_N, PRECISION,
        )  # fmt: skip
        slot_rows = ((head_row * split_tiles + tile) * NUM_SPLITS + split) * BLOCK_M + tl.arange(0, BLOCK_M)
        tl.store(acc_ptr + slot_rows[:, None] * HEAD_DIM + dims[None, :], acc)
        tl.store(max_ptr + slot_rows, row_max)
        tl.store(sum_ptr + slot_rows, row_sum)
    else:
        # the sink keys before the band (none when the band reaches them, or for a global tile), then the band
        acc, row_max, row_sum = _attend_keys(
            q, k_base, v_base, stride_kn, stride_vn, first_key, tl.minimum(sink_end, tile_lo), position, is_global,
            first_key, sink_end, window, scale_log2e, acc, row_max, row_sum, HEAD_DIM, BLOCK_N, PRECISION, True,
        )  # fmt: skip
        acc, row_max, row_sum = _attend_range(
            q, k_base, v_base, stride_kn, stride_vn, tile_lo, tile_hi, shared_lo, shared_hi,
            position, is_global, first_key, sink_end, window, scale_log2e, acc, row_max, row_sum,
            HEAD_DIM, BLOCK_N, PRECISION,
        )  # fmt: skip
        _store_rows(out_ptr, head_row, seq_q, order, row_valid, acc, row_sum, HEAD_DIM)


@triton.jit
def _merge_splits(
    acc_ptr, max_ptr, sum_ptr, out_ptr, order_ptr, n_global_ptr, seq_q, heads_total, split_tiles,
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
    sorted_rows = tile * BLOCK_M + rows
    row_valid = sorted_rows < seq_q
    order = tl.load(order_ptr + head_row * seq_q + sorted_rows, mask=row_valid, other=0)
    _store_rows(out_ptr, head_row, seq_q, order, row_valid, acc, row_sum, HEAD_DIM)


def triton_prefill(
    q: Tensor, k: Tensor, v: Tensor, hard: Tensor, window: int, scale: float, first_key: Tensor, sink: int = 0
) -> Tensor:
    """AHA attention for a bool route: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]``, ``hard``
    ``[B, Hq, Sq]`` (True = global), ``first_key`` ``[B]`` int32 (first real key per row), ``sink``
    keys local rows also see -> ``[B, Hq, Sq, D]``."""
    batch, q_heads, seq_q, head_dim = q.shape
    seq_kv = k.shape[2]
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    positions = torch.arange(seq_q, device=q.device, dtype=torch.int32)
    order = torch.argsort(torch.where(hard, -1 - positions, positions), dim=-1).to(torch.int32)
    n_global = hard.sum(-1, dtype=torch.int32).flatten()
    heads_total = batch * q_heads
    q_tiles = triton.cdiv(seq_q, BLOCK_M)
    split_tiles = min(SPLIT_TILES, q_tiles)
    slots = split_tiles * heads_total * NUM_SPLITS * BLOCK_M
    partials = torch.empty(slots * (head_dim + 2), dtype=torch.float32, device=q.device)
    acc, row_max, row_sum = partials.split([slots * head_dim, slots, slots])
    out = torch.empty(batch, q_heads, seq_q, head_dim, dtype=q.dtype, device=q.device)
    programs = split_tiles * heads_total * NUM_SPLITS + heads_total * q_tiles
    _prefill_tiles[(programs,)](
        q, k, v, out, order, n_global, first_key, acc, row_max, row_sum,
        seq_q, seq_kv, window, sink, scale * LOG2E, q_heads, q_heads // k.shape[1], heads_total, split_tiles,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, NUM_SPLITS=NUM_SPLITS,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=NUM_WARPS, num_stages=NUM_STAGES,
    )  # fmt: skip
    _merge_splits[(split_tiles * heads_total,)](
        acc, row_max, row_sum, out, order, n_global, seq_q, heads_total, split_tiles,
        HEAD_DIM=head_dim, BLOCK_M=BLOCK_M, NUM_SPLITS=NUM_SPLITS,
    )  # fmt: skip
    return out


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    key_padding_mask: Tensor | None = None,
    sink: int = 0,
) -> Tensor:
    """AHA attention with the Triton prefill kernel (see the module docstring); shapes as
    :func:`triton_prefill`, ``route`` bool or a float gate.

    Raises:
        AhaInputError: gradients are needed (forward only), the inputs are not on CUDA, the head
            size is not a power of two >= 16, or a row's real keys are not one contiguous run.
    """
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, route)):
        raise AhaInputError("impl='triton' is forward-only; use impl='flex' (or 'auto') for training")
    if not triton_available(q):
        raise AhaInputError("impl='triton' needs CUDA tensors and a power-of-two head_dim >= 16; use impl='auto'")
    first_key = key_start(key_padding_mask, q.shape[0], q.device)
    if first_key is None:
        raise AhaInputError(
            "impl='triton' needs each row's real keys to be one contiguous run (left or right padding); "
            "use impl='flex' for a key_padding_mask with holes"
        )
    return apply_route_with_kernel(
        route, window >= k.shape[2], lambda hard, sink: triton_prefill(q, k, v, hard, window, scale, first_key, sink), sink
    )
