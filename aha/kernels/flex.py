"""``flex``: FlexAttention with queries sorted by route, so whole tiles of work are skipped.

With i.i.d. per-token routes almost every 128-query tile holds a global query, so a per-token
mask over queries in their natural order skips nothing. Here each (batch, head) reorders its
queries -- global ones first, latest position first, then local ones in position order -- so a
tile of sorted queries needs only the keys of its rows' ranges: a prefix for global tiles, a
band for local tiles (plus the blocks of the ``sink`` first keys, when asked). Global tiles come first because they are the long ones: FlexAttention
launches query tiles in order, and starting the longest work first keeps the GPU busy to the end
(longest-processing-time-first scheduling). The ``BlockMask`` is built directly from those ranges
(:func:`route_block_mask`, O(B * H * blocks^2) integers) instead of ``create_block_mask``, which
evaluates the mask on every (query, key) pair on each call. The output is scattered back to the
original order.

Device support (torch 2.13): CUDA forward and backward; CPU forward only (FlexAttention has no
CPU backward), through the inductor C++ template. Each new shape compiles (seconds on CPU).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch._dynamo.exc
import torch._inductor.exc
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from aha.kernels.gating import apply_route_with_kernel
from aha.kernels.masks import KeyPadding, first_real_key, padding_mask

BLOCK = 128

# Compiled on first use; tests on CPU switch this off to run FlexAttention's eager (dense) path.
USE_COMPILE = True
_compiled_flex: Callable[..., Tensor] | None = None
# On CUDA the whole routed call (sort, BlockMask, attention, unsort) is compiled as one graph: one
# guard check and fused index work instead of dozens of small launches (on an H100 the per-op path
# spent about 2 ms of host time per call at n = 16384, more than the attention itself). It is
# compiled per shape (dynamic=False). Inductor (torch 2.11) failed to lower it for some inputs
# (once with dynamic shapes, once at n = 500); inputs of a signature that failed use the per-op path
# with only flex_attention compiled. Past dynamo's recompile limit the graph runs eagerly, still
# with the compiled flex_attention.
_compiled_routed: Callable[..., Tensor] | None = None
_whole_graph_failed: set[tuple] = set()
# what a failed lowering raises (dynamo's own errors, inductor's, and a CUDA compile of the generated code)
_LOWERING_FAILURES = (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.InductorError)


def _flex() -> Callable[..., Tensor]:
    global _compiled_flex
    if not USE_COMPILE:
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention)
    return _compiled_flex


class SortedRoute:
    """Per (batch, head) order of the queries: global ones by descending position, then local ones by position.

    Attributes (``[B, Hq, Sq_padded]`` with ``Sq_padded`` a multiple of :data:`BLOCK`; padding
    rows attend nothing):
        order: original query index of each sorted row, ``[B, Hq, Sq]``.
        position, is_global: absolute position and route of each sorted row.
        lo, hi: inclusive key range of each sorted row (empty: ``lo > hi``).
        sink_end: ``[B, 1, 1]``; keys from the first real key up to ``sink_end - 1`` are sink keys,
            which local rows see too.
    """

    def __init__(self, hard: Tensor, seq_kv: int, window: int, key_padding_mask: Tensor | None, sink: int = 0) -> None:
        batch, heads, seq_q = hard.shape
        device = hard.device
        padded = -(-seq_q // BLOCK) * BLOCK
        position_in_queries = torch.arange(seq_q, device=device, dtype=torch.int32)
        sort_key = torch.where(hard, -1 - position_in_queries, position_in_queries)
        self.order = torch.argsort(sort_key, dim=-1)
        self.is_global = F.pad(hard.gather(-1, self.order), (0, padded - seq_q))
        position = (seq_kv - seq_q + self.order).to(torch.int32)
        self.position = F.pad(position, (0, padded - seq_q), value=-1)
        first = torch.zeros(batch, dtype=torch.int32, device=device) if key_padding_mask is None else first_real_key(key_padding_mask)
        start = first.to(torch.int32)[:, None, None]
        self.sink_end = start + sink
        lo = torch.where(self.is_global, start, torch.maximum(start, self.position - window + 1))
        # a query before the first real key still sees its own key (its output is zeroed later)
        self.lo = torch.where(self.position >= 0, torch.minimum(lo, self.position), torch.iinfo(torch.int32).max)
        self.hi = self.position


def route_block_mask(sorted_route: SortedRoute, seq_q: int, seq_kv: int, mask_mod: Callable, key_padding_mask: Tensor | None) -> BlockMask:
    """The BlockMask of sorted queries: a KV block is needed by a query tile when it meets the
    union of the tile's row ranges, and "full" (no mask_mod call) when it lies inside every
    row's range, is complete and holds no padding."""
    lo = sorted_route.lo.unflatten(-1, (-1, BLOCK))  # [B, H, q_blocks, BLOCK]
    hi = sorted_route.hi.unflatten(-1, (-1, BLOCK))
    live = lo <= hi
    big = torch.iinfo(torch.int32).max
    union_lo = torch.where(live, lo, big).amin(-1)
    union_hi = torch.where(live, hi, -1).amax(-1)
    sink_end = sorted_route.sink_end  # [B, 1, 1]
    shared_lo = torch.where(live, lo, -1).amax(-1)
    shared_hi = torch.where(live, hi, big).amin(-1)
    shared_hi = torch.where(live.all(-1), shared_hi, -1)  # a tile with padding rows is never full

    kv_blocks = -(-seq_kv // BLOCK)
    first = torch.arange(kv_blocks, device=lo.device, dtype=torch.int32) * BLOCK
    last = first + BLOCK - 1
    needed = (first <= union_hi[..., None]) & ((last >= union_lo[..., None]) | (first < sink_end[..., None]))
    full = (first >= shared_lo[..., None]) & (last <= shared_hi[..., None]) & (last < seq_kv)
    if key_padding_mask is not None:
        complete = F.pad(key_padding_mask, (0, kv_blocks * BLOCK - seq_kv)).unflatten(-1, (-1, BLOCK)).all(-1)
        full = full & complete[:, None, None, :]
    partial = needed & ~full

    def compact(blocks: Tensor) -> tuple[Tensor, Tensor]:
        counts = blocks.sum(-1, dtype=torch.int32)
        indices = torch.argsort((~blocks).to(torch.uint8), dim=-1, stable=True).to(torch.int32)
        return counts, indices

    kv_num, kv_indices = compact(partial)
    full_num, full_indices = compact(full)
    return BlockMask.from_kv_blocks(
        kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(seq_q, seq_kv)
    )


def route_mask_mod(sorted_route: SortedRoute, window: int, key_padding_mask: Tensor | None) -> Callable[..., Any]:
    """``mask_mod(b, h, q_idx, kv_idx)`` over sorted queries: keys ``..p`` for global rows,
    ``p-window+1..p`` and the sink keys for local ones, real keys only (own key always, so no row
    is empty)."""
    position, is_global, sink_end = sorted_route.position, sorted_route.is_global, sorted_route.sink_end[:, 0, 0]
    key_ok = None
    if key_padding_mask is not None:
        kv_padded = -(-key_padding_mask.shape[-1] // BLOCK) * BLOCK
        key_ok = F.pad(key_padding_mask, (0, kv_padded - key_padding_mask.shape[-1]))

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        p = position[b, h, q_idx]
        allowed = (kv_idx <= p) & (is_global[b, h, q_idx] | (kv_idx > p - window) | (kv_idx < sink_end[b]))
        if key_ok is not None:
            allowed = (allowed & key_ok[b, kv_idx]) | (kv_idx == p)
        return allowed

    return mask_mod


def _routed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hard: Tensor,
    window: int,
    scale: float,
    key_padding_mask: Tensor | None,
    sink: int,
    attend: Callable[..., Tensor],
) -> Tensor:
    seq_q, seq_kv, dim = q.shape[2], k.shape[2], q.shape[3]
    sorted_route = SortedRoute(hard, seq_kv, window, key_padding_mask, sink)
    mask_mod = route_mask_mod(sorted_route, window, key_padding_mask)
    block_mask = route_block_mask(sorted_route, seq_q, seq_kv, mask_mod, key_padding_mask)
    index = sorted_route.order[..., None].expand(-1, -1, -1, dim)
    out_sorted = attend(q.gather(2, index), k, v, block_mask=block_mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return torch.empty_like(out_sorted).scatter(2, index, out_sorted)


def flex_routed(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hard: Tensor,
    window: int,
    scale: float,
    key_padding_mask: Tensor | None = None,
    sink: int = 0,
) -> Tensor:
    """AHA attention for a bool route ``[B, Hq, Sq]`` (True = global) via sorted FlexAttention;
    q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` -> ``[B, Hq, Sq, D]``."""
    signature = (q.shape, k.shape, q.dtype, key_padding_mask is None, window, sink)
    # inside a user's torch.compile the outer graph already takes this code in
    if USE_COMPILE and q.is_cuda and signature not in _whole_graph_failed and not torch.compiler.is_compiling():
        global _compiled_routed
        if _compiled_routed is None:
            _compiled_routed = torch.compile(_routed, dynamic=False)
        try:
            return _compiled_routed(q, k, v, hard, window, scale, key_padding_mask, sink, _flex())
        except _LOWERING_FAILURES as exc:  # use the per-op path for these inputs
            _whole_graph_failed.add(signature)
            warnings.warn(f"aha: whole-graph compile of impl='flex' failed for {signature}, using the per-op path ({exc!r})", stacklevel=2)
    return _routed(q, k, v, hard, window, scale, key_padding_mask, sink, _flex())


def flex_attention_aha(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    padding: KeyPadding | None = None,
    sink: int = 0,
) -> Tensor:
    """AHA attention with FlexAttention (see the module docstring); shapes as :func:`flex_routed`
    (the registry in :mod:`aha.kernels.dispatch` refuses gradients on CPU, where FlexAttention has none)."""
    mask = padding_mask(padding)
    return apply_route_with_kernel(
        route, window >= k.shape[2], lambda hard, sink: flex_routed(q, k, v, hard, window, scale, mask, sink), sink
    )
