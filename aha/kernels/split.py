"""CPU fast path: compute each branch only where it is needed, with PyTorch SDPA pieces.

The dense branch runs over all queries with a kernel that skips work by construction
(a banded, blocked SDPA for sliding-window attention, or SDPA ``is_causal`` for full
attention); the minority branch runs only over the (token, head) pairs routed to it,
gathered into a packed tensor and attended in chunks that read only the keys they need.
The two are merged per (token, head). Everything is built from differentiable PyTorch
ops, so autograd provides the backward pass.

All functions take q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` with the queries at the
last ``Sq`` positions, and return ``[B, Hq, Sq, D]``. ``sink`` > 0 adds the attention-sink keys
(see :mod:`aha.kernels.masks`) before the window of every local query.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from aha.kernels import nonfinite
from aha.kernels.gating import apply_route
from aha.kernels.masks import KeyPadding, first_key, sink_key_mask, sink_keys

# Below this global fraction the band runs densely and global pairs are packed; above it,
# full causal attention runs densely and local pairs are packed.
DENSE_GLOBAL_ABOVE = 0.5


def band_block_size(window: int) -> int:
    """Query block for the banded kernel: each block reads ``block + window - 1`` keys, so the
    wasted work is ``block / window``; small blocks pay per-call overhead instead."""
    return int(min(256, max(16, 16 * round(window / 64))))


def band_attention(
    q: Tensor, k: Tensor, v: Tensor, window: int, scale: float, padding: KeyPadding | None = None, sink: int = 0
) -> Tensor:
    """Sliding-window causal attention for every query, reading ``O(seq * window)`` keys.

    Queries are cut into blocks of ``b``; block ``j`` attends the ``b + window - 1`` keys that end
    at its last query, taken as an overlapping ``unfold`` view (no copy), with one small band mask
    shared by all blocks. Grouped query heads sharing a KV head are stacked as extra query rows.
    Sink keys are prepended to every block's keys, masked where the window already holds them.
    """
    batch, q_heads, seq_q, dim = q.shape
    kv_heads, seq_kv = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    block = band_block_size(window)
    n_blocks = math.ceil(seq_q / block)
    span = block + window - 1
    first_query = seq_kv - seq_q
    first_column = first_query - window + 1  # absolute position of column 0 of block 0

    def windows(t: Tensor) -> Tensor:
        front = max(0, -first_column)
        body = t[:, :, max(0, first_column) :]
        back = n_blocks * block + window - 1 - front - body.shape[2]
        padded = F.pad(body, (0, 0, front, back))
        # [B, Hkv, n_blocks, span, D] view; blocks overlap in memory
        return padded.unfold(2, span, block).transpose(-1, -2).reshape(batch * kv_heads, n_blocks, span, dim)

    kb, vb = windows(k), windows(v)
    qp = F.pad(q, (0, 0, 0, n_blocks * block - seq_q))
    qb = (
        qp.view(batch, kv_heads, group, n_blocks, block, dim)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch * kv_heads, n_blocks, group * block, dim)
    )

    def per_kv_head(rows: Tensor) -> Tensor:
        """A per-batch mask ``[B, n_blocks, block, keys]`` as ``[B * Hkv, n_blocks, group * block, keys]``."""
        keys = rows.shape[-1]
        return (
            rows.repeat(1, 1, group, 1)[:, None]
            .expand(batch, kv_heads, n_blocks, group * block, keys)
            .reshape(batch * kv_heads, n_blocks, group * block, keys)
        )

    device = q.device
    row = torch.arange(block, device=device)[:, None]
    col = torch.arange(span, device=device)[None, :]
    base = (col >= row) & (col <= row + window - 1)  # [block, span]
    key_abs = first_column + torch.arange(n_blocks, device=device)[:, None] * block + col  # [n_blocks, span]
    own = (col == row + window - 1)[None]  # the query's own key
    if padding is None:
        mask = base[None] & (key_abs >= 0)[:, None, :]  # [n_blocks, block, span]
        mask = mask.repeat(1, group, 1)[None]  # [1, n_blocks, group*block, span]
    else:
        kpm = F.pad(padding.mask, (max(0, -first_column), 0), value=False)[:, max(0, first_column) :]
        kpm = F.pad(kpm, (0, n_blocks * block + window - 1 - kpm.shape[1]), value=False)
        key_ok = kpm.unfold(1, span, block)  # [B, n_blocks, span]
        mask = per_kv_head(base[None, None] & (key_ok[:, :, None, :] | own[None]))
    if sink:
        k_sink, v_sink, sink_pos, sink_real = sink_keys(k, v, sink, padding)
        query_abs = first_query + torch.arange(n_blocks * block, device=device).view(n_blocks, block)
        sink_mask = sink_real[:, None, None, :] & (sink_pos[:, None, None, :] <= query_abs[None, :, :, None] - window)
        mask = torch.cat([per_kv_head(sink_mask), mask.expand(batch * kv_heads, -1, -1, -1)], dim=-1)
        kb, vb = (
            torch.cat([t.reshape(batch * kv_heads, 1, sink, dim).expand(-1, n_blocks, -1, -1), blocks], dim=2)
            for t, blocks in ((k_sink, kb), (v_sink, vb))
        )
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=scale)
    out = (
        out.view(batch, kv_heads, n_blocks, group, block, dim)
        .permute(0, 1, 3, 2, 4, 5)
        .reshape(batch, q_heads, n_blocks * block, dim)
    )
    return out[:, :, :seq_q]


def packed_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    select: Tensor,
    window: int | None,
    scale: float,
    padding: KeyPadding | None = None,
    chunk: int = 64,
    sink: int = 0,
) -> Tensor:
    """Attention for the selected (token, head) pairs only; other rows of the result are zero.

    Args:
        select: ``[B, Hq, Sq]`` bool, the pairs to compute.
        window: ``None`` for full causal attention (keys ``0..p``), else keys ``p-window+1..p``
            (and the ``sink`` keys).

    Per (batch, head) the selected queries are gathered in position order into a packed
    ``[B, Hq, M, D]`` tensor (``M`` = the largest count); each chunk of packed rows attends
    only the key range its rows need, under a ``[B, Hq, chunk, keys]`` mask.
    """
    batch, q_heads, seq_q, dim = q.shape
    seq_kv = k.shape[2]
    first_query = seq_kv - seq_q
    counts = select.sum(-1)
    packed = int(counts.max())
    result = q.new_zeros(q.shape)
    if packed == 0:
        return result
    order = torch.argsort((~select).to(torch.uint8), dim=-1, stable=True)[..., :packed]  # [B, Hq, M]
    valid = torch.arange(packed, device=q.device) < counts[..., None]
    positions = first_query + order
    gather_index = order[..., None].expand(-1, -1, -1, dim)
    q_packed = q.gather(2, gather_index)
    is_sink = None
    if window is not None and sink:
        is_sink = sink_key_mask(seq_kv, sink, padding, batch, q.device)
        sink_end = int(first_key(padding, batch, q.device).max()) + sink

    outputs = []
    for start in range(0, packed, chunk):
        pos = positions[..., start : start + chunk]
        ok = valid[..., start : start + chunk]
        hi = int(pos.masked_fill(~ok, -1).max()) + 1
        lo = 0 if window is None else max(0, int(pos.masked_fill(~ok, seq_kv).min()) - window + 1)
        kpos = torch.arange(lo, hi, device=q.device)
        keys, values = k[:, :, lo:hi], v[:, :, lo:hi]
        if is_sink is not None and lo > 0:
            kpos = torch.cat([torch.arange(min(lo, sink_end), device=q.device), kpos])
            keys, values = k.index_select(2, kpos), v.index_select(2, kpos)
        allowed = kpos <= pos[..., None]
        if window is not None:
            in_window = kpos > pos[..., None] - window
            allowed = allowed & (in_window if is_sink is None else in_window | is_sink[:, None, None, kpos])
        if padding is not None:
            allowed = allowed & (padding.mask[:, None, None, kpos] | (kpos == pos[..., None]))
        allowed = allowed | ~ok[..., None]  # padding rows: any finite result, discarded below
        outputs.append(
            F.scaled_dot_product_attention(
                q_packed[..., start : start + chunk, :],
                keys,
                values,
                attn_mask=allowed,
                scale=scale,
                enable_gqa=k.shape[1] != q_heads,
            )
        )
    return result.scatter(2, gather_index, torch.cat(outputs, dim=2))


def full_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, padding: KeyPadding | None = None
) -> Tensor:
    """Full causal attention for every query (queries at the last ``Sq`` positions)."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    gqa = k.shape[1] != q.shape[1]
    if padding is None and seq_q == seq_kv:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    if padding is None and seq_q == 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa)
    everything = torch.ones(q.shape[:3], dtype=torch.bool, device=q.device)
    return packed_attention(q, k, v, everything, None, scale, padding, chunk=256)


def packed_chunk(global_fraction: float) -> int:
    """Packed rows per SDPA call: the staircase of key ranges in a chunk wastes about
    ``chunk / (global_fraction * seq)`` of the useful work, so sparse routes want small chunks;
    dense ones amortise the per-call overhead over larger chunks (measured on 2 Zen 4 cores)."""
    if global_fraction <= 0.1:
        return 32
    return 64 if global_fraction <= 0.2 else 128


def routed_split(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hard: Tensor,
    window: int,
    scale: float,
    padding: KeyPadding | None = None,
    sink: int = 0,
) -> Tensor:
    """AHA attention for a bool route ``[B, Hq, Sq]`` (True = global): the majority branch runs
    densely, the minority branch only on its packed (token, head) pairs, merged per pair."""
    global_fraction = float(hard.float().mean())
    if global_fraction <= DENSE_GLOBAL_ABOVE:
        out = band_attention(q, k, v, window, scale, padding, sink)
        if hard.any():
            full = packed_attention(q, k, v, hard, None, scale, padding, packed_chunk(global_fraction))
            out = torch.where(hard[..., None], full, out)
        return out
    out = full_attention(q, k, v, scale, padding)
    if not hard.all():
        local = packed_attention(
            q, k, v, ~hard, window, scale, padding, packed_chunk(1 - global_fraction), sink
        )
        out = torch.where(hard[..., None], out, local)
    return out


@nonfinite.checked
def split_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    padding: KeyPadding | None = None,
    sink: int = 0,
    binary: bool | None = None,
) -> Tensor:
    """AHA attention that computes each branch only for the pairs routed to it (see :func:`routed_split`);
    gates and windows covering every key follow :func:`aha.kernels.gating.apply_route`; NaN and inf
    follow :mod:`aha.kernels.nonfinite` (:func:`~aha.kernels.nonfinite.checked`)."""
    return apply_route(
        route,
        window >= k.shape[2],
        routed=lambda hard: routed_split(q, k, v, hard, window, scale, padding, sink),
        full=lambda: full_attention(q, k, v, scale, padding),
        local=lambda: band_attention(q, k, v, window, scale, padding, sink),
        binary=binary,
    )
