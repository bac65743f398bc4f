"""What NaN and inf in q, k and v do: IEEE arithmetic over the keys each row reads, nothing else.

The contract every implementation keeps (the dense reference defines it): a row's output is what
a dense computation over the keys that row reads gives -- a NaN or +inf score makes it NaN, a -inf
score gives that key no weight, a non-finite value of a key it reads makes it non-finite -- and a
non-finite value in a key a row does not read never reaches that row. Fast kernels break this two
ways: a GEMM over a block of keys spreads a NaN value to every row of the block (``0 * NaN =
NaN``), and a max that skips NaN (PyTorch's CPU flash kernel) hides it.

The contract is about outputs. Gradients of rows that read a non-finite input are non-finite too
(never hidden), but the backward passes, dense like SDPA's, may spread NaN to other rows' gradients.

So implementations run as usual and check cheaply whether anything non-finite is involved: the
C++ kernel, which propagates NaN itself, reports a non-finite output for free; ``split`` and the
SDPA decode path sum their inputs and output (:func:`checked`). Only then the call is redone by :func:`enforce`:
the dense reference over chunks of query rows (each reading only its key prefix).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from aha.kernels.masks import KeyPadding
from aha.kernels.reference import reference_attention

#: Scores per chunk of :func:`enforce` (query rows x key prefix x query heads): bounds its memory.
CHUNK_SCORES = 1 << 24


def checked(attention: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Decorate an implementation built on SDPA (shared signature ``(q, k, v, route, window, scale,
    padding, sink, **options)``), whose kernels hide a NaN query or key and spread a NaN value
    across a block: on CPU the inputs and the output are checked with one summation each and the
    call is redone by :func:`enforce` when one is not finite (on CUDA the check would stall the
    device, and in a compiled graph it cannot branch, so it is skipped there)."""

    @functools.wraps(attention)
    def run(q, k, v, route, window, scale, padding=None, sink=0, **options):
        out = attention(q, k, v, route, window, scale, padding, sink, **options)
        return settled(out, (k, v), q, k, v, route, window, scale, padding, sink)

    return run


def settled(
    out: Tensor,
    read: Sequence[Tensor],
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    padding: KeyPadding | None,
    sink: int,
) -> Tensor:
    """``out`` of an SDPA-based call when it, ``q`` and the K/V tensors the call ``read`` look finite
    (or the check cannot run: CUDA, a compiled graph), else the call redone by :func:`enforce`."""
    if q.device.type != "cpu" or torch.compiler.is_compiling() or looks_finite(out, q, *read):
        return out
    return enforce(q, k, v, route, window, scale, padding, sink)


def looks_finite(*tensors: Tensor) -> bool:
    """A cheap check: one summation per tensor (no NaN or inf => a finite sum, barring overflow,
    which only costs a needless :func:`enforce`)."""
    return all(bool(torch.isfinite(t.detach().sum(dtype=torch.float32))) for t in tensors)


def enforce(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    window: int,
    scale: float,
    padding: KeyPadding | None,
    sink: int,
) -> Tensor:
    """AHA attention under the contract, from the dense reference in chunks of query rows; the
    arguments and result are those of :func:`aha.aha_attention` (``[B, Hq, Sq, D]``)."""
    batch, q_heads, seq_q, _ = q.shape
    seq_kv = k.shape[2]
    rows = max(1, CHUNK_SCORES // max(1, batch * q_heads * seq_kv))
    chunks = []
    for first in range(0, seq_q, rows):
        last = min(seq_q, first + rows)
        end = seq_kv - seq_q + last  # the chunk's queries are the last positions of this key prefix
        prefix = None if padding is None else padding.prefix(end)
        chunks.append(
            reference_attention(
                q[:, :, first:last], k[:, :, :end], v[:, :, :end], route[:, :, first:last], window, scale, prefix, sink
            )
        )
    return torch.cat(chunks, dim=2)
