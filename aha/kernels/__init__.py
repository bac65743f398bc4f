"""The AHA attention operator: one signature, several implementations, one dispatcher.

Implementations (registered in :mod:`aha.kernels.dispatch`; each declares the devices, dtypes and
inputs it serves, and ``auto`` walks one priority list per device):

* ``reference`` -- dense masked attention, the ground truth (O(seq_q * seq_kv) memory).
* ``cpp`` -- the CPU fast path: a C++ flash-style kernel in which every query reads one
  contiguous key range, tiled by route so it only computes what each query needs; forward,
  backward and decode steps, on hand-written AVX-512/AVX2 GEMMs or on oneDNN's micro-GEMMs (AMX),
  whichever :mod:`aha.kernels.cpu_tuning` measured faster here (``cpp:vector`` / ``cpp:onednn``
  force one); compiled on first use (``make install`` builds and calibrates it ahead).
* ``split`` -- pure PyTorch (any device; on CPU where the C++ kernel is unavailable, and above
  the measured crossover global fraction, where SDPA's kernel is faster): dense
  kernel for the majority branch, packed queries for the minority branch, merged per
  (token, head); differentiable.
* ``decode`` -- one query per head against a long cache with SDPA; local heads read only the window.
* ``flex`` -- FlexAttention with queries sorted by route so tiles are skipped (GPU; CPU forward only).
* ``triton`` -- Triton kernels over the same sorted queries, with global tiles split over the
  keys; forward and backward, and split-KV decode steps (GPU; needs Triton).

Which keys a query reads is defined once, in :mod:`aha.kernels.masks`. Models, training,
evaluation and the CLI call :func:`aha_attention`, never an implementation.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from aha.kernels._checks import (
    AhaInputError,
    check_inputs,
    check_route_values,
    is_binary,
)
from aha.kernels.dispatch import IMPLEMENTATIONS, Inputs, select
from aha.kernels.gate_estimators import GateGradient, gate_gradient
from aha.kernels.gate_estimators import estimate as estimate_gate_gradient
from aha.kernels.masks import KeyPadding, padding_mask
from aha.kernels.ops import attention_op

ImplName = Literal["auto", "reference", "cpp", "cpp:vector", "cpp:onednn", "split", "decode", "flex", "triton"]


def _needs_grad(q: Tensor, k: Tensor, v: Tensor, route: Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, route))


def _inputs(q, k, v, route, window, scale, key_padding_mask, sink, route_is_binary) -> Inputs:
    """The call as the registry sees it; in eager mode route values and the padding layout are read here."""
    if not torch.compiler.is_compiling():
        if not route_is_binary:
            check_route_values(route)
        binary = route.dtype == torch.bool or route_is_binary or is_binary(route)
    else:
        binary = True if route.dtype == torch.bool or route_is_binary else None
    padding = KeyPadding.of(key_padding_mask)
    return Inputs(q, k, v, route, window, scale, padding, sink, _needs_grad(q, k, v, route), binary)


def run_eager(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    key_padding_mask: Tensor | KeyPadding | None,
    sink: int,
    impl: str,
    route_is_binary: bool | None,
) -> Tensor:
    """The dispatcher on checked shapes, a resolved ``scale`` and clamped window/sink (see :func:`aha_attention`)."""
    inputs = _inputs(q, k, v, route, window, scale, key_padding_mask, sink, route_is_binary)
    # an estimator runs passes on hard routes: each is dispatched on its own route (a trainable gate
    # counts as all-global, which on CPU can move the whole call to the dense-branch implementation)
    out = estimate_gate_gradient(inputs, lambda routed: select(routed, impl)(routed))
    if out is None:  # the implementation's own (STE) gate
        out = select(inputs, impl)(inputs)
    if inputs.padding is not None:
        query_valid = inputs.padding.mask[:, None, k.shape[2] - q.shape[2] :, None]
        out = out.masked_fill(~query_valid, 0.0)
    return out


def choose_impl(
    q: Tensor, k: Tensor, route: Tensor, window: int, key_padding_mask: Tensor | KeyPadding | None = None
) -> str:
    """The implementation ``impl="auto"`` runs for these inputs (see :data:`aha.kernels.dispatch.PRIORITY`).

    CPU: ``cpp`` when the C++ kernel is built and covers the inputs (fp32/bf16/fp16, padding
    without holes) -- for decode steps too -- unless the crossover measured on this machine
    (:mod:`aha.kernels.cpu_tuning`) says ``split``, whose dense branch is SDPA's kernel, is faster at
    this global fraction; else ``split`` (``decode`` for one-query steps). CUDA: ``flex`` for
    prefill and training, the Triton kernel (else SDPA ``decode``) for decode steps; ``triton``
    prefill is opt-in until it has been timed on a GPU against ``flex``.
    """
    inputs = _inputs(q, k, k, route, window, 1.0, key_padding_mask, 0, None)
    return select(inputs).name


def aha_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    *,
    scale: float | None = None,
    impl: ImplName = "auto",
    key_padding_mask: Tensor | KeyPadding | None = None,
    sink: int = 0,
    route_is_binary: bool | None = None,
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
            straight-through gate ``g_hard + (g_soft - g_soft.detach())`` when training). How
            ``d out / d g`` of such a gate is computed (exactly, or estimated without full attention
            for every pair) is set by the :func:`gate_gradient` context (:mod:`aha.kernels.gate_estimators`).
        window: keys a local query sees, its own included; ``>= 1``. ``window >= seq_kv`` makes
            local attention equal full attention.
        scale: softmax scale; default ``1 / sqrt(head_dim)``.
        impl: ``"auto"`` (see :func:`choose_impl`) or one of :data:`IMPLEMENTATIONS`;
            ``"cpp:vector"`` / ``"cpp:onednn"`` run the C++ kernel on the given microkernel
            (hand-written AVX GEMMs / oneDNN's micro-GEMMs) instead of the measured choice.
        key_padding_mask: optional ``[batch, seq_kv]`` bool, True = real key (left padding
            for batched generation), or a :class:`~aha.kernels.masks.KeyPadding` built once from
            it and shared by every layer of a forward pass. Padded keys are never attended;
            queries at padded positions return zeros.
        sink: attention-sink keys: a local query also sees the first ``sink`` keys (from the
            first real key) that lie before its window. 0 (default) is the paper's operator;
            pretrained models park attention on their first token, and one sink key restores
            most of what a pure window loses (``benchmarks/RESULTS.md``).
        route_is_binary: True when the caller guarantees a float route holds only 0 and 1 (the
            STE gate of :func:`aha.route_from_logits`): its values are then neither checked nor
            read. Inside ``torch.compile`` a float route not declared binary costs both dense
            branches (a graph cannot read it to find out).

    Returns:
        ``[batch, q_heads, seq_q, head_dim]`` in ``q.dtype``.

    Raises:
        AhaInputError: malformed shapes, dtypes, devices, window or route (the message names the
            fix), or an ``impl`` that cannot run these inputs (every reason listed).

    Under ``torch.compile`` (and ``torch.export``) a call without gradients is one opaque node
    (``aha::attention``); a call that needs gradients is traced through the C++ kernel's ops
    (see :mod:`aha.kernels.ops`).
    """
    check_inputs(q, k, v, route, window, key_padding_mask, sink, scale)
    if q.shape[2] == 0:  # no queries: the empty output, whatever the implementation
        return q.clone()
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # a window or sink past the last key means every key: clamped, no index arithmetic can overflow
    window, sink = min(window, k.shape[2]), min(sink, k.shape[2])
    if torch.compiler.is_compiling() and not _needs_grad(q, k, v, route):
        mask = padding_mask(key_padding_mask)
        return attention_op(q, k, v, route, mask, window, sink, float(scale), impl, bool(route_is_binary))
    return run_eager(q, k, v, route, window, scale, key_padding_mask, sink, impl, route_is_binary)


__all__ = ["IMPLEMENTATIONS", "AhaInputError", "GateGradient", "KeyPadding", "aha_attention", "choose_impl", "gate_gradient"]
