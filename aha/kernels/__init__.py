"""The AHA attention operator: one signature, several implementations, one dispatcher.

Implementations (all share :data:`AttentionImpl`'s signature):

* ``reference`` -- dense masked attention, the ground truth (O(seq_q * seq_kv) memory).
* ``cpp`` -- the CPU fast path: a C++ flash-style kernel in which every query reads one
  contiguous key range, tiled by route so it only computes what each query needs; forward and
  backward; compiled on first use (``make install`` builds it ahead).
* ``split`` -- the pure-PyTorch CPU path (fallback when the C++ kernel is unavailable): dense
  kernel for the majority branch, packed queries for the minority branch, merged per
  (token, head); differentiable.
* ``decode`` -- one query per head against a long cache; local heads read only the window.
* ``flex`` -- FlexAttention with queries sorted by route so tiles are skipped (GPU; CPU forward only).
* ``triton`` -- Triton kernels over the same sorted queries, with global tiles split over the
  keys; forward and backward (GPU; needs Triton).

Models, training, evaluation and the CLI call :func:`aha_attention`, never an implementation.
"""

from __future__ import annotations

import math
from typing import Callable, Literal

import torch
from torch import Tensor

from aha.kernels._checks import AhaInputError, check_inputs, is_binary
from aha.kernels.cpp import cpp_attention, cpp_supports
from aha.kernels.decode import decode_attention
from aha.kernels.reference import reference_attention
from aha.kernels.split import split_attention

AttentionImpl = Callable[[Tensor, Tensor, Tensor, Tensor, int, float, "Tensor | None", int], Tensor]
ImplName = Literal["auto", "reference", "cpp", "split", "decode", "flex", "triton"]

IMPLEMENTATIONS: dict[str, AttentionImpl] = {
    "reference": reference_attention,
    "cpp": cpp_attention,
    "split": split_attention,
    "decode": decode_attention,
}

try:
    from aha.kernels.flex import flex_attention_aha
except ImportError:  # a torch without torch.nn.attention.flex_attention
    pass
else:
    IMPLEMENTATIONS["flex"] = flex_attention_aha

try:
    from aha.kernels.triton_prefill import triton_attention
except ImportError:  # no Triton (CPU-only installs)
    pass
else:
    IMPLEMENTATIONS["triton"] = triton_attention


def _flex_available(q: Tensor, needs_grad: bool) -> bool:
    return "flex" in IMPLEMENTATIONS and (q.is_cuda or not needs_grad)


def choose_impl(q: Tensor, k: Tensor, route: Tensor, window: int, key_padding_mask: Tensor | None = None) -> str:
    """The implementation ``impl="auto"`` uses for these inputs.

    Decode steps (one query, hard routes, no grad) use ``decode``; CUDA inputs use ``flex`` when
    it is importable; CPU inputs use ``cpp`` when the C++ kernel is built and covers them
    (fp32/bf16/fp16, padding without holes), else ``split``. ``cpp`` is chosen at every global
    fraction and with or without grad: on 2 Zen 4 cores it was faster than SDPA causal even at
    rho = 1 (1.3-2x forward, 1.4x forward+backward; ``benchmarks/RESULTS.md``), so there is no
    fraction above which plain SDPA wins. ``split`` switches to SDPA itself above half global.
    ``triton`` (CUDA) is opt-in until it has been timed on a GPU against ``flex``.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or route.requires_grad)
    if q.shape[2] == 1 and not needs_grad and is_binary(route):
        return "decode"
    if q.is_cuda and _flex_available(q, needs_grad):
        return "flex"
    if cpp_supports(q, key_padding_mask):
        return "cpp"
    return "split"


def aha_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    *,
    scale: float | None = None,
    impl: ImplName = "auto",
    key_padding_mask: Tensor | None = None,
    sink: int = 0,
) -> Tensor:
    """All-or-Here attention: per (token, query head), full causal or sliding-window attention.

    Args:
        q: queries ``[batch, q_heads, seq_q, head_dim]``. They sit at the last ``seq_q``
            positions of the keys (``seq_q < seq_kv`` for decoding and chunked prefill).
        k, v: keys and values ``[batch, kv_heads, seq_kv, head_dim]``; ``q_heads`` must be a
            multiple of ``kv_heads`` (grouped-query attention: query head ``h`` uses KV head
            ``h // (q_heads // kv_heads)``).
        route: ``[batch, q_heads, seq_q]``. Bool: True = global (keys ``0..p``), False = local
            (keys ``max(0, p - window + 1)..p``, its own key included). Float gate ``g`` in
            [0, 1]: output ``g * full + (1 - g) * local``, differentiable in ``g`` (pass the
            straight-through gate ``g_hard + g_soft - g_soft.detach()`` when training).
        window: keys a local query sees, its own included; ``>= 1``. ``window >= seq_kv`` makes
            local attention equal full attention.
        scale: softmax scale; default ``1 / sqrt(head_dim)``.
        impl: ``"auto"`` (see :func:`choose_impl`) or one of :data:`IMPLEMENTATIONS`.
        key_padding_mask: optional ``[batch, seq_kv]`` bool, True = real key (left padding
            for batched generation). Padded keys are never attended; queries at padded
            positions return zeros.
        sink: attention-sink keys: a local query also sees the first ``sink`` keys (from the
            first real key) that lie before its window. 0 (default) is the paper's operator;
            pretrained models park attention on their first token, and one sink key restores
            most of what a pure window loses (``benchmarks/RESULTS.md``).

    Returns:
        ``[batch, q_heads, seq_q, head_dim]`` in ``q.dtype``.

    Raises:
        AhaInputError: malformed shapes, dtypes, devices, window or route (the message names the fix).
    """
    check_inputs(q, k, v, route, window, key_padding_mask, sink)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    name = choose_impl(q, k, route, window, key_padding_mask) if impl == "auto" else impl
    if name not in IMPLEMENTATIONS:
        raise AhaInputError(f"unknown impl {impl!r}; choose one of {['auto', *IMPLEMENTATIONS]}")
    if name == "decode" and (q.shape[2] != 1 or not is_binary(route)):
        raise AhaInputError("impl='decode' needs seq_q == 1 and a hard (bool or 0/1) route")
    if name == "decode" and route.dtype != torch.bool:
        route = route > 0.5
    out = IMPLEMENTATIONS[name](q, k, v, route, window, scale, key_padding_mask, sink)
    if key_padding_mask is not None:
        query_valid = key_padding_mask[:, None, k.shape[2] - q.shape[2] :, None]
        out = out.masked_fill(~query_valid, 0.0)
    return out


__all__ = ["AhaInputError", "IMPLEMENTATIONS", "aha_attention", "choose_impl"]
