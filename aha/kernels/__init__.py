"""The AHA attention operator: one signature, several implementations, one dispatcher.

Implementations (all share :data:`AttentionImpl`'s signature):

* ``reference`` -- dense masked attention, the ground truth (O(seq_q * seq_kv) memory).
* ``cpp`` -- the CPU fast path: a C++ flash-style kernel in which every query reads one
  contiguous key range, tiled by route so it only computes what each query needs; forward and
  backward, on hand-written AVX-512/AVX2 GEMMs or on oneDNN's micro-GEMMs (AMX), whichever
  :mod:`aha.kernels.cpu_tuning` measured faster here; compiled on first use (``make install``
  builds and calibrates it ahead).
* ``split`` -- the pure-PyTorch CPU path (fallback when the C++ kernel is unavailable, and above
  the measured crossover global fraction, where SDPA's kernel is faster): dense
  kernel for the majority branch, packed queries for the minority branch, merged per
  (token, head); differentiable.
* ``decode`` -- one query per head against a long cache; local heads read only the window.
* ``flex`` -- FlexAttention with queries sorted by route so tiles are skipped (GPU; CPU forward only).
* ``triton`` -- Triton kernels over the same sorted queries, with global tiles split over the
  keys; forward and backward (GPU; needs Triton).

Models, training, evaluation and the CLI call :func:`aha_attention`, never an implementation.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, Literal

import torch
from torch import Tensor

from aha.kernels._checks import AhaInputError, check_inputs, is_binary
from aha.kernels.cpp import cpp_attention, cpp_supports
from aha.kernels.cpu_tuning import KernelChoice, kernel_choice
from aha.kernels.decode import decode_attention
from aha.kernels.reference import reference_attention
from aha.kernels.split import split_attention

AttentionImpl = Callable[[Tensor, Tensor, Tensor, Tensor, int, float, "Tensor | None", int], Tensor]
ImplName = Literal["auto", "reference", "cpp", "cpp:vector", "cpp:onednn", "split", "decode", "flex", "triton"]

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


def _global_fraction(route: Tensor) -> float:
    """Share of (token, head) pairs whose routed work is full attention; soft gates and gates that
    need a gradient count as 1 (their dense full branch runs for every pair)."""
    if route.dtype == torch.bool:
        return float(route.float().mean())
    if route.requires_grad or not is_binary(route):
        return 1.0
    return float((route > 0.5).float().mean())


def choose_impl(q: Tensor, k: Tensor, route: Tensor, window: int, key_padding_mask: Tensor | None = None) -> str:
    """The implementation ``impl="auto"`` uses for these inputs.

    Decode steps (one query, hard routes, no grad) use ``decode``; CUDA inputs use ``flex`` when
    it is importable; CPU inputs use ``cpp`` when the C++ kernel is built and covers them
    (fp32/bf16/fp16, padding without holes), else ``split``. On CPU the choice between ``cpp``
    and ``split`` (which runs SDPA's kernel for a global majority) is measured once per machine
    and dtype (:mod:`aha.kernels.cpu_tuning`): above the measured crossover global fraction, where
    SDPA would be faster than the C++ kernel, ``split`` runs. On the CPUs measured so far (AMD
    Zen 4, Intel Xeon with AMX) the C++ kernel was faster than SDPA causal even at fraction 1.
    ``triton`` (CUDA) is opt-in until it has been timed on a GPU against ``flex``.
    """
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or route.requires_grad)
    if q.shape[2] == 1 and not needs_grad and is_binary(route):
        return "decode"
    if q.is_cuda and _flex_available(q, needs_grad):
        return "flex"
    if cpp_supports(q, key_padding_mask):
        crossover = kernel_choice(q.dtype).crossover(k.shape[2], training=needs_grad)
        if crossover < 1.0 and _global_fraction(route) > crossover:
            return "split"
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
        impl: ``"auto"`` (see :func:`choose_impl`) or one of :data:`IMPLEMENTATIONS`;
            ``"cpp:vector"`` / ``"cpp:onednn"`` run the C++ kernel on the given microkernel
            (hand-written AVX GEMMs / oneDNN's micro-GEMMs) instead of the measured choice.
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
    check_inputs(q, k, v, route, window, key_padding_mask, sink, scale)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    # a window or sink past the last key means every key: clamped, no index arithmetic can overflow
    window, sink = min(window, k.shape[2]), min(sink, k.shape[2])
    name = choose_impl(q, k, route, window, key_padding_mask) if impl == "auto" else impl
    name, _, microkernel = name.partition(":")
    if name not in IMPLEMENTATIONS or (microkernel and (name != "cpp" or microkernel not in ("vector", "onednn"))):
        raise AhaInputError(
            f"unknown impl {impl!r}; choose one of {['auto', *IMPLEMENTATIONS, 'cpp:vector', 'cpp:onednn']}"
        )
    run = IMPLEMENTATIONS[name]
    if microkernel:
        run = functools.partial(cpp_attention, choice=KernelChoice(microkernel=microkernel))
    if name == "decode" and (q.shape[2] != 1 or not is_binary(route)):
        raise AhaInputError("impl='decode' needs seq_q == 1 and a hard (bool or 0/1) route")
    if name == "decode" and route.dtype != torch.bool:
        route = route > 0.5
    out = run(q, k, v, route, window, scale, key_padding_mask, sink)
    if key_padding_mask is not None:
        query_valid = key_padding_mask[:, None, k.shape[2] - q.shape[2] :, None]
        out = out.masked_fill(~query_valid, 0.0)
    return out


__all__ = ["AhaInputError", "IMPLEMENTATIONS", "aha_attention", "choose_impl"]
