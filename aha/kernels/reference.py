"""Dense masked AHA attention: the ground truth every fast path is tested against.

It materialises ``[batch, q_heads, seq_q, seq_kv]`` scores, so use it for tests and
short sequences only; the dispatcher never picks it for long inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from aha.kernels._checks import is_binary
from aha.kernels.masks import KeyPadding, key_positions, sink_key_mask


def sanitized(x: Tensor) -> Tensor:
    """``x`` with NaN and inf replaced by 0."""
    return torch.where(torch.isfinite(x), x, torch.zeros((), dtype=x.dtype, device=x.device))


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    padding: KeyPadding | None = None,
    sink: int = 0,
) -> Tensor:
    """Compute AHA attention densely (scores in fp32, output in ``q.dtype``).

    A query at absolute position ``p`` attends keys ``0..p`` when routed global and
    ``max(0, p - window + 1)..p`` when local, plus, when local, the ``sink`` keys
    ``s..s + sink - 1`` that are ``<= p`` (``s`` = the first real key, 0 without padding).
    Bool routes select a branch; float gates mix them as ``g * full + (1 - g) * local`` (a gate of
    exactly 0 or 1 selects, with ``d out / d g = full - local``). Padded keys are never attended; a
    query whose own key is padding gets a zero output.

    Non-finite values follow IEEE arithmetic over the keys each row reads and never reach a row
    that does not read them (see :mod:`aha.kernels.nonfinite`): a NaN or +inf score makes the row
    NaN, a -inf score gives its key no weight, and a non-finite element of a value the row reads
    makes that output element non-finite (here NaN) whatever the key's weight.

    Shapes: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]``, route ``[B, Hq, Sq]`` -> ``[B, Hq, Sq, D]``.
    """
    batch, q_heads, seq_q, _ = q.shape
    kv_heads, seq_kv = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    bad_value = (~torch.isfinite(v)).float().repeat_interleave(group, dim=1)  # [B, Hq, Skv, D]
    kf = k.float().repeat_interleave(group, dim=1)
    vf = sanitized(v.float()).repeat_interleave(group, dim=1)
    scores = torch.matmul(q.float(), kf.transpose(-1, -2)) * scale

    qpos, kpos = key_positions(seq_q, seq_kv, q.device)
    causal = kpos[None, :] <= qpos[:, None]
    band = causal & (kpos[None, :] > qpos[:, None] - window)
    if sink:
        is_sink = sink_key_mask(seq_kv, sink, padding, batch, q.device)
        band = band | (causal & is_sink[:, None, None, :])  # [B, 1, Sq, Skv]
    query_valid = None
    if padding is not None:
        keep = padding.mask[:, None, None, :]
        causal = causal & keep
        band = band & keep
        query_valid = padding.mask[:, seq_kv - seq_q :][:, None, :, None]
        # a padded query still "sees" its own key so its softmax stays finite; it is zeroed below
        own = (kpos[None, :] == qpos[:, None])
        causal = causal | own
        band = band | own

    def branch(mask: Tensor) -> Tensor:
        out = torch.softmax(scores.masked_fill(~mask, torch.finfo(torch.float32).min), dim=-1) @ vf
        return out.masked_fill(mask.float() @ bad_value > 0, float("nan"))  # a read non-finite value element

    full, local = branch(causal), branch(band)
    if route.dtype == torch.bool:
        out = torch.where(route[..., None], full, local)
    else:
        g = route.float()[..., None]
        if is_binary(route):
            gap = torch.nan_to_num(full - local, nan=0.0, posinf=0.0, neginf=0.0)  # d out / d g, finite
            out = torch.where(route.detach()[..., None] > 0.5, full, local) + (g - g.detach()) * gap
        else:
            out = g * full + (1 - g) * local
    if query_valid is not None:
        out = out.masked_fill(~query_valid, 0.0)
    return out.to(q.dtype)
