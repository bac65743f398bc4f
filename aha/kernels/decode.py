"""``decode``: one new query per (batch, head) against a long KV cache, with SDPA.

Local heads read only the last ``window`` keys of the cache (and the ``sink`` first keys), in one
SDPA call over a slice view of the window; global heads read the whole cache, in one SDPA call per
(batch, KV head) that has a global query head. Out-of-window keys are never touched for local
heads. Where a fused kernel serves the inputs ``auto`` prefers it (the C++ kernel on CPU, the
Triton decode kernel on CUDA: see :data:`aha.kernels.dispatch.PRIORITY`); this path runs anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from aha.kernels import nonfinite
from aha.kernels.masks import KeyPadding, padding_mask, sink_keys


def decode_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    padding: KeyPadding | None = None,
    sink: int = 0,
) -> Tensor:
    """AHA attention for ``seq_q == 1`` with hard routes (inference only), with SDPA: one call over
    the window (and sink) of every head, one per global KV head.

    Shapes: q ``[B, Hq, 1, D]``, k/v ``[B, Hkv, Skv, D]``, route ``[B, Hq, 1]`` bool -> ``[B, Hq, 1, D]``.

    SDPA hides a NaN query or key, so on CPU the query, the output and the keys and values the step
    read (the windows, and the caches of global KV heads only) are summed once each, and the call is
    redone under :mod:`~aha.kernels.nonfinite`'s contract when one is not finite.
    """
    out, read = _decode_sdpa(q, k, v, route, window, scale, padding, sink)
    return nonfinite.settled(out, read, q, k, v, route, window, scale, padding, sink)


def _decode_sdpa(
    q: Tensor, k: Tensor, v: Tensor, route: Tensor, window: int, scale: float, padding: KeyPadding | None, sink: int
) -> tuple[Tensor, list[Tensor]]:
    """:func:`decode_attention` without the non-finite check: the output and the K/V tensors it read."""
    key_padding_mask = padding_mask(padding)
    batch, q_heads = q.shape[:2]
    kv_heads = k.shape[1]
    group = q_heads // kv_heads
    gqa = group > 1
    window_start = max(0, k.shape[2] - window)
    k_local, v_local = k[:, :, window_start:], v[:, :, window_start:]
    local_mask = None if key_padding_mask is None else key_padding_mask[:, window_start:]
    if sink and window_start > 0:
        k_sink, v_sink, sink_pos, sink_real = sink_keys(k, v, sink, padding)
        k_local, v_local = torch.cat([k_sink, k_local], dim=2), torch.cat([v_sink, v_local], dim=2)
        in_window = torch.ones(k.shape[0], k.shape[2] - window_start, dtype=torch.bool, device=q.device)
        local_mask = torch.cat([sink_real & (sink_pos < window_start), in_window if local_mask is None else local_mask], 1)
    out = F.scaled_dot_product_attention(
        q, k_local, v_local, attn_mask=None if local_mask is None else local_mask[:, None, None, :], scale=scale,
        enable_gqa=gqa,
    )
    read = [k_local, v_local]
    if k.shape[2] <= window:
        return out, read
    hard = route[..., 0]  # [B, Hq]
    if not hard.any():
        return out, read
    grouped = hard.view(batch, kv_heads, group)
    for b, kv_head in grouped.any(-1).nonzero().tolist():
        heads = kv_head * group + grouped[b, kv_head].nonzero()[:, 0]
        mask = None if key_padding_mask is None else key_padding_mask[b, None, None, None, :]
        k_head, v_head = k[b : b + 1, kv_head : kv_head + 1], v[b : b + 1, kv_head : kv_head + 1]
        out[b, heads] = F.scaled_dot_product_attention(
            q[b : b + 1, heads], k_head, v_head, attn_mask=mask, scale=scale, enable_gqa=True
        )[0]
        read += [k_head, v_head]
    return out, read
