"""Input validation shared by every attention implementation.

Every public entry point calls :func:`check_inputs` once (shapes, dtypes, devices: nothing that
reads a tensor's values, so it also runs inside a compiled graph) and, in eager mode,
:func:`check_route_values`, so implementations can assume well-formed tensors and the error
messages are the same everywhere.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from aha.kernels.masks import KeyPadding, padding_mask


class AhaInputError(ValueError):
    """Raised when inputs to :func:`aha.aha_attention` are malformed. The message names the fix."""


def check_inputs(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    key_padding_mask: Tensor | KeyPadding | None = None,
    sink: int = 0,
    scale: float | None = None,
) -> None:
    """Validate shapes, dtypes and devices of an AHA attention call.

    Args:
        q: ``[batch, q_heads, seq_q, head_dim]``.
        k, v: ``[batch, kv_heads, seq_kv, head_dim]`` with ``seq_kv >= seq_q`` and
            ``q_heads % kv_heads == 0``.
        route: ``[batch, q_heads, seq_q]``; bool (True = global) or a float gate in [0, 1].
        window: number of keys a local query sees, its own included; ``>= 1``.
        key_padding_mask: optional ``[batch, seq_kv]`` bool, True = a real (attendable) key, or
            its :class:`~aha.kernels.masks.KeyPadding`.
        sink: attention-sink keys every local query also sees; ``>= 0``.
        scale: softmax scale, a finite number, or None for ``1 / sqrt(head_dim)``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise AhaInputError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise AhaInputError(
                f"{name} must have 4 dims [batch, heads, seq, head_dim], got shape {tuple(t.shape)}; "
                "transpose from [batch, seq, heads, head_dim] with .transpose(1, 2)"
            )
        if not t.is_floating_point():
            raise AhaInputError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise AhaInputError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    batch, q_heads, seq_q, head_dim = q.shape
    kv_batch, kv_heads, seq_kv, kv_dim = k.shape
    if kv_batch != batch:
        raise AhaInputError(f"q has batch {batch} but k/v have batch {kv_batch}")
    if kv_dim != head_dim:
        raise AhaInputError(f"q has head_dim {head_dim} but k/v have head_dim {kv_dim}")
    if kv_heads == 0 or q_heads % kv_heads != 0:
        raise AhaInputError(
            f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads}) for grouped-query attention"
        )
    if seq_kv < seq_q:
        raise AhaInputError(
            f"k/v hold {seq_kv} positions but q has {seq_q}; queries are the last seq_q positions, "
            "so pass the whole key/value prefix (seq_kv >= seq_q)"
        )
    if q.dtype != k.dtype or q.dtype != v.dtype:
        raise AhaInputError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    if q.device != k.device or q.device != v.device:
        raise AhaInputError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if head_dim == 0:
        raise AhaInputError("head_dim is 0: q, k and v need at least one feature per head")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale)):
        raise AhaInputError(f"scale must be a finite number (or None for 1/sqrt(head_dim)), got {scale!r}")
    if isinstance(window, bool) or not isinstance(window, int):
        raise AhaInputError(f"window must be an int, got {type(window).__name__}")
    if window < 1:
        raise AhaInputError(f"window must be >= 1 (a local query always sees its own key), got {window}")
    if isinstance(sink, bool) or not isinstance(sink, int):
        raise AhaInputError(f"sink must be an int, got {type(sink).__name__}")
    if sink < 0:
        raise AhaInputError(f"sink must be >= 0 (the number of first keys local queries also see; 0 = none), got {sink}")
    if not isinstance(route, Tensor):
        raise AhaInputError(f"route must be a torch.Tensor, got {type(route).__name__}")
    if tuple(route.shape) != (batch, q_heads, seq_q):
        raise AhaInputError(
            f"route must have shape [batch, q_heads, seq_q] = {(batch, q_heads, seq_q)}, got {tuple(route.shape)}"
        )
    if route.device != q.device:
        raise AhaInputError(f"route is on {route.device} but q is on {q.device}; move it with route.to(q.device)")
    if route.dtype != torch.bool and not route.is_floating_point():
        raise AhaInputError(
            f"route must be bool (True = global) or a float gate in [0, 1], got {route.dtype}; "
            "use route.bool() for hard routes"
        )
    key_padding_mask = padding_mask(key_padding_mask)
    if key_padding_mask is not None:
        if not isinstance(key_padding_mask, Tensor) or key_padding_mask.dtype != torch.bool:
            raise AhaInputError("key_padding_mask must be a bool tensor [batch, seq_kv] (True = real key)")
        if tuple(key_padding_mask.shape) != (batch, seq_kv):
            raise AhaInputError(
                f"key_padding_mask must have shape [batch, seq_kv] = {(batch, seq_kv)}, "
                f"got {tuple(key_padding_mask.shape)}"
            )
        if key_padding_mask.device != q.device:
            raise AhaInputError("key_padding_mask must be on the same device as q")


def check_route_values(route: Tensor) -> None:
    """A float gate must hold finite values in [0, 1] (reads the values: eager mode only; producers
    that guarantee them, such as :func:`aha.route_from_logits`, skip this)."""
    if route.dtype == torch.bool:
        return
    r = route.detach()
    if not torch.isfinite(r).all():
        raise AhaInputError("route contains NaN or inf; gates must be finite values in [0, 1]")
    if (r < 0).any() or (r > 1).any():
        raise AhaInputError(
            f"float route values must lie in [0, 1] (got min {r.min().item():.4g}, max {r.max().item():.4g}); "
            "apply torch.sigmoid to router logits first"
        )


def is_binary(route: Tensor) -> bool:
    """True when ``route`` is bool or a float gate whose values are all exactly 0 or 1 (as with the STE)."""
    if route.dtype == torch.bool:
        return True
    r = route.detach()
    return bool(((r == 0) | (r == 1)).all())
