"""``cpp``: the dedicated C++ CPU kernel (``csrc/aha_cpu.cpp``), forward and backward.

Every query row reads one contiguous key range (global: ``[0, p]``, local: ``[p - window + 1, p]``,
plus the ``sink`` first keys when asked);
per (batch, head) the local and the global rows are each tiled in position order, so a tile
reads only the keys its rows need, and masking is inline on the boundary key blocks only. It
never materialises a mask or a ``seq x seq`` score matrix; the backward recomputes the scores
from the saved log-sum-exp. fp32, bf16 and fp16, GQA, a KV prefix longer than the queries, and
left/right key padding are handled in the kernel; a padding mask with holes falls back to
``split``. The library is compiled on first use (see :mod:`aha.kernels._cpp_build`).

The GEMMs run on one of two microkernels behind one tile loop: hand-written AVX-512/AVX2 code
(``vector``; bf16 multiplied as bf16 pairs with AVX512-BF16, else widened to fp32) or oneDNN's
micro-GEMMs through ``at::native::cpublas::brgemm`` (``onednn``; AMX tiles for bf16 where the
CPU has them, fp16 widened to fp32). :mod:`aha.kernels.cpu_tuning` picks the faster one per
machine and dtype; one-token decode steps take a split-KV dot-product path on either.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from aha.kernels import nonfinite
from aha.kernels._checks import AhaInputError
from aha.kernels._cpp_build import cpp_kernel_error, load_cpp_kernel
from aha.kernels.cpu_tuning import KernelChoice, kernel_choice, microkernel_name
from aha.kernels.gating import apply_route_with_kernel
from aha.kernels.reference import first_key
from aha.kernels.split import split_attention

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def cpp_available() -> bool:
    """True when the C++ kernel is built and loaded (building it on first call)."""
    return load_cpp_kernel()


def key_start(key_padding_mask: Tensor | None, batch: int, device: torch.device) -> Tensor | None:
    """First real key per batch row ``[batch]`` int32, or None when a row's real keys are not
    one contiguous run (the kernel needs ``False* True* False*``: left and/or right padding)."""
    first = first_key(key_padding_mask, batch, device)
    if key_padding_mask is not None:
        count = key_padding_mask.sum(1)
        positions = torch.arange(key_padding_mask.shape[1], device=device)
        run = (positions >= first[:, None]) & (positions < (first + count)[:, None])
        if not torch.equal(run, key_padding_mask):
            return None
    return first.to(torch.int32)


def cpp_supports(q: Tensor, key_padding_mask: Tensor | None) -> bool:
    """Whether the kernel itself (rather than the ``split`` fallback) computes these inputs."""
    if q.device.type != "cpu" or q.dtype not in KERNEL_DTYPES or not cpp_available():
        return False
    return key_padding_mask is None or key_start(key_padding_mask, q.shape[0], q.device) is not None


class _KernelFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, route, starts, window, sink, scale, settings):  # type: ignore[override]
        out, lse, finite = torch.ops.aha.forward(q, k, v, route, starts, window, sink, scale, *settings)
        ctx.save_for_backward(q, k, v, route, starts, out, lse)
        ctx.window, ctx.sink, ctx.scale, ctx.settings = window, sink, scale, settings
        ctx.mark_non_differentiable(finite)
        return out, finite

    @staticmethod
    def backward(ctx, dout, _):  # type: ignore[override]
        q, k, v, route, starts, out, lse = ctx.saved_tensors
        dq, dk, dv = torch.ops.aha.backward(
            dout, q, k, v, out, lse, route, starts, ctx.window, ctx.sink, ctx.scale, *ctx.settings
        )
        return dq, dk, dv, None, None, None, None, None, None


def kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hard: Tensor,
    window: int,
    scale: float,
    starts: Tensor,
    sink: int = 0,
    choice: KernelChoice | None = None,
) -> tuple[Tensor, bool]:
    """Run the kernel for a bool route ``[B, Hq, Sq]`` (True = global); differentiable in q, k, v.

    Shapes: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` (last dim contiguous or copied),
    ``starts`` ``[B]`` int32 first real key -> (out ``[B, Hq, Sq, D]``, whether every output
    value is finite). A head_dim that is not a multiple of 16 is zero-padded (scores and the kept
    output columns are unchanged). ``choice`` (default: :func:`~aha.kernels.cpu_tuning.kernel_choice`
    for this dtype) picks the microkernel.
    """
    choice = choice or kernel_choice(q.dtype)
    if choice.microkernel == "onednn" and not torch.backends.mkldnn.enabled:
        choice = KernelChoice()  # oneDNN switched off since the choice was measured: the built-in rule
    settings = (*choice.tile_rows, choice.code)
    dim = q.shape[-1]
    pad = -dim % 16
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    hard = hard.contiguous()
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        out, finite = _KernelFunction.apply(q, k, v, hard, starts, window, sink, scale, settings)
    else:
        out, _, finite = torch.ops.aha.forward(q, k, v, hard, starts, window, sink, scale, *settings)
    return (out[..., :dim] if pad else out), bool(finite)


def cpp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    key_padding_mask: Tensor | None = None,
    sink: int = 0,
    choice: KernelChoice | None = None,
) -> Tensor:
    """AHA attention with the C++ kernel (see the module docstring); q ``[B, Hq, Sq, D]``,
    k/v ``[B, Hkv, Skv, D]``, route ``[B, Hq, Sq]`` (True / g = 1 = global) -> ``[B, Hq, Sq, D]``.
    ``choice`` forces a microkernel (default: the one measured fastest here for the dtype). When
    the kernel reports a non-finite output value, the call is redone under the contract of
    :mod:`aha.kernels.nonfinite`.

    Raises:
        AhaInputError: the kernel is not built (the message says why), the inputs are not on CPU,
            or the forced microkernel does not run this dtype here.
    """
    if q.device.type != "cpu":
        raise AhaInputError(f"impl='cpp' runs on CPU tensors; these are on {q.device}. Use impl='auto'")
    if not cpp_available():
        raise AhaInputError(f"impl='cpp' is unavailable: {cpp_kernel_error()}")
    starts = key_start(key_padding_mask, q.shape[0], q.device)
    if q.dtype not in KERNEL_DTYPES or starts is None:
        return split_attention(q, k, v, route, window, scale, key_padding_mask, sink)
    if choice is not None and microkernel_name(q.dtype, choice.microkernel) is None:
        raise AhaInputError(
            f"impl='cpp:{choice.microkernel}' does not run {q.dtype} on this CPU; use impl='cpp:vector' or 'auto'"
        )
    all_finite = True

    def routed(hard: Tensor, sink: int) -> Tensor:
        nonlocal all_finite
        out, finite = kernel_attention(q, k, v, hard, window, scale, starts, sink, choice)
        all_finite &= finite
        return out

    out = apply_route_with_kernel(route, window >= k.shape[2], routed, sink)
    if all_finite:
        return out
    return nonfinite.enforce(q, k, v, route, window, scale, key_padding_mask, sink)
