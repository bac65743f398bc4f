"""``cpp``: the dedicated C++ CPU kernel (``csrc/aha_cpu.cpp``), forward and backward.

Every query row reads one contiguous key range (global: ``[0, p]``, local: ``[p - window + 1, p]``,
plus the ``sink`` first keys when asked);
per (batch, head) the local and the global rows are each tiled in position order, so a tile
reads only the keys its rows need, and masking is inline on the boundary key blocks only. It
never materialises a mask or a ``seq x seq`` score matrix; the backward recomputes the scores
from the saved log-sum-exp. fp32, bf16 and fp16, GQA, a KV prefix longer than the queries, and
left/right key padding are handled in the kernel (a padding mask with holes is refused: the
registry in :mod:`aha.kernels.dispatch` sends it to ``split``). The library is compiled on first
use (see :mod:`aha.kernels._cpp_build`); its ops are registered with ``torch.library`` (fake
kernels and autograd in :mod:`aha.kernels.ops`), so ``torch.compile`` and ``torch.export`` see
them as single nodes.

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
from aha.kernels._cpp_build import load_cpp_kernel
from aha.kernels.cpu_tuning import kernel_settings
from aha.kernels.gating import apply_route_with_kernel
from aha.kernels.masks import KeyPadding, key_start

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.compiler.assume_constant_result  # a compiled graph bakes the answer in instead of tracing the build
def cpp_available() -> bool:
    """True when the C++ kernel is built and loaded (building it on first call)."""
    return load_cpp_kernel()


def kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    hard: Tensor,
    window: int,
    scale: float,
    starts: Tensor,
    sink: int = 0,
    microkernel: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Run the kernel for a bool route ``[B, Hq, Sq]`` (True = global); differentiable in q, k, v.

    Shapes: q ``[B, Hq, Sq, D]``, k/v ``[B, Hkv, Skv, D]`` (last dim contiguous or copied),
    ``starts`` ``[B]`` int32 first real key -> (out ``[B, Hq, Sq, D]``, a 0-dim bool tensor: whether
    every output value is finite). A head_dim that is not a multiple of 16 is zero-padded (scores
    and the kept output columns are unchanged). ``microkernel`` (``"vector"`` / ``"onednn"``; default:
    :func:`~aha.kernels.cpu_tuning.kernel_choice` for this dtype) picks the GEMM back end.
    """
    settings = kernel_settings(q.dtype, microkernel)
    dim = q.shape[-1]
    pad = -dim % 16
    if pad:
        q, k, v = (F.pad(t, (0, pad)) for t in (q, k, v))
    arguments = (_rows_contiguous(q), _rows_contiguous(k), _rows_contiguous(v), hard.contiguous(), starts, window, sink, scale, *settings)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        out, _, finite = torch.ops.aha.forward(*arguments)
    else:
        with torch._C._AutoDispatchBelowAutograd():  # no gradient: skip the Python autograd layer (~10 us per call)
            out, _, finite = torch.ops.aha.forward(*arguments)
    return (out[..., :dim] if pad else out), finite


def _rows_contiguous(t: Tensor) -> Tensor:
    """``t`` itself when its last dim is contiguous (the kernel's only layout need), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def cpp_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    padding: KeyPadding | None = None,
    sink: int = 0,
    microkernel: str | None = None,
    binary: bool | None = None,
) -> Tensor:
    """AHA attention with the C++ kernel (see the module docstring); q ``[B, Hq, Sq, D]``,
    k/v ``[B, Hkv, Skv, D]``, route ``[B, Hq, Sq]`` (True / g = 1 = global), ``padding`` with
    contiguous real keys per row -> ``[B, Hq, Sq, D]``. ``microkernel`` forces one (default:
    the one measured fastest here for the dtype); ``binary`` as in :func:`~aha.kernels.gating.apply_route`.

    When the kernel reports a non-finite output value, the call is redone under the contract of
    :mod:`aha.kernels.nonfinite` (in eager mode: a compiled graph cannot branch on the flag, so
    there NaN and inf follow the kernel's own propagation).
    """
    starts = key_start(padding, q.shape[0], q.device)
    flags = []

    def routed(hard: Tensor, sink: int) -> Tensor:
        out, finite = kernel_attention(q, k, v, hard, window, scale, starts, sink, microkernel)
        flags.append(finite)
        return out

    out = apply_route_with_kernel(route, window >= k.shape[2], routed, sink, binary)
    if torch.compiler.is_compiling() or all(bool(finite) for finite in flags):
        return out
    return nonfinite.enforce(q, k, v, route, window, scale, padding, sink)
