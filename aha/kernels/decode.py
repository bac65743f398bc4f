"""Decode path: one new query per (batch, head) against a long KV cache.

Local heads read only the last ``window`` keys of the cache (and the ``sink`` first keys);
global heads read the whole cache.
Out-of-window keys are never touched for local heads. On CPU the C++ kernel does this in one
call (split-KV over threads, bf16 read as bf16); on CUDA a Triton split-KV kernel does
(:mod:`aha.kernels.triton_decode`). Elsewhere, or without either, local heads take one SDPA call
over a slice view of the window and global heads one SDPA call per (batch, KV head) that has a
global query head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from aha.kernels import nonfinite
from aha.kernels.cpp import cpp_supports, kernel_attention, key_start
from aha.kernels.split import sink_keys

try:
    from aha.kernels.triton_decode import triton_decode, triton_available
except ImportError:  # no Triton (CPU-only installs)
    triton_decode = None


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    key_padding_mask: Tensor | None = None,
    sink: int = 0,
) -> Tensor:
    """AHA attention for ``seq_q == 1`` with hard routes (inference only).

    Shapes: q ``[B, Hq, 1, D]``, k/v ``[B, Hkv, Skv, D]``, route ``[B, Hq, 1]`` bool -> ``[B, Hq, 1, D]``.
    """
    if cpp_supports(q, key_padding_mask):
        starts = key_start(key_padding_mask, q.shape[0], q.device)
        assert starts is not None  # cpp_supports checked it
        return kernel_attention(q, k, v, route, window, scale, starts, sink)[0]
    if triton_decode is not None and q.is_cuda and triton_available(q):
        starts = key_start(key_padding_mask, q.shape[0], q.device)
        if starts is not None:  # real keys are one contiguous run
            return triton_decode(q, k, v, route, window, scale, starts, sink)
    out = _sdpa_decode(q, k, v, route, window, scale, key_padding_mask, sink)
    if q.device.type != "cpu" or nonfinite.looks_finite(out, q, k, v):
        return out
    return nonfinite.enforce(q, k, v, route, window, scale, key_padding_mask, sink)  # SDPA hides a NaN key


def _sdpa_decode(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    key_padding_mask: Tensor | None = None,
    sink: int = 0,
) -> Tensor:
    """Decode with SDPA: one call over the window (and sink) of every head, one per global KV head."""
    batch, q_heads = q.shape[:2]
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    gqa = group > 1
    window_start = max(0, k.shape[2] - window)
    k_local, v_local = k[:, :, window_start:], v[:, :, window_start:]
    local_mask = None if key_padding_mask is None else key_padding_mask[:, window_start:]
    if sink and window_start > 0:
        k_sink, v_sink, sink_pos, sink_real = sink_keys(k, v, sink, key_padding_mask)
        k_local, v_local = torch.cat([k_sink, k_local], dim=2), torch.cat([v_sink, v_local], dim=2)
        in_window = torch.ones(k.shape[0], k.shape[2] - window_start, dtype=torch.bool, device=q.device)
        local_mask = torch.cat([sink_real & (sink_pos < window_start), in_window if local_mask is None else local_mask], 1)
    out = F.scaled_dot_product_attention(
        q, k_local, v_local, attn_mask=None if local_mask is None else local_mask[:, None, None, :], scale=scale,
        enable_gqa=gqa,
    )
    if k.shape[2] <= window:
        return out
    hard = route[..., 0]  # [B, Hq]
    if not hard.any():
        return out
    grouped = hard.view(batch, kv_heads, group)
    for b, kv_head in grouped.any(-1).nonzero().tolist():
        heads = kv_head * group + grouped[b, kv_head].nonzero()[:, 0]
        mask = None if key_padding_mask is None else key_padding_mask[b, None, None, None, :]
        out[b, heads] = F.scaled_dot_product_attention(
            q[b : b + 1, heads], k[b : b + 1, kv_head : kv_head + 1], v[b : b + 1, kv_head : kv_head + 1],
            attn_mask=mask, scale=scale, enable_gqa=True,
        )[0]
    return out
