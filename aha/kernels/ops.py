"""The operator's ``torch.library`` registrations: what ``torch.compile`` and ``torch.export`` see.

* ``aha::forward`` / ``aha::backward`` -- the C++ kernel's ops (defined in ``csrc/aha_cpu.cpp``):
  fake kernels for shape inference and the forward's autograd formula (the backward op recomputes
  the scores from the saved log-sum-exp), as FlashAttention's ``flash_attn_interface.py`` does
  with ``register_fake`` and ``register_autograd``. A compiled graph calls them as single nodes,
  in training too.
* ``aha::attention`` -- the whole operator as one opaque node for calls that need no gradient
  (evaluation, generation): its implementation is the eager dispatcher, which reads route values
  and padding layouts freely (choosing an implementation, the NaN contract) where a graph could
  not. Its fake kernel gives the output's shape, so the graph around it compiles and exports.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor

_registered: set[str] = set()
_lock = threading.Lock()


def register_kernel_ops(namespace: str = "aha") -> None:
    """Register fake kernels and autograd for ``torch.ops.<namespace>.forward`` / ``backward``
    (once the C++ library is loaded; idempotent)."""
    with _lock:
        if namespace in _registered:
            return
        _registered.add(namespace)
    ops = getattr(torch.ops, namespace)

    @torch.library.register_fake(f"{namespace}::forward")
    def _forward_fake(q, k, v, route, key_start, window, sink, scale, local_rows, global_rows, microkernel):
        lse = q.new_empty(q.shape[:3], dtype=torch.float32)
        return q.new_empty(q.shape), lse, q.new_empty((), dtype=torch.bool)

    @torch.library.register_fake(f"{namespace}::decode_paged")
    def _decode_paged_fake(q, kv_cache, blocks, lengths, route, window, sink, scale):
        return q.new_empty(q.shape), q.new_empty((), dtype=torch.bool)

    @torch.library.register_fake(f"{namespace}::backward")
    def _backward_fake(dout, q, k, v, out, lse, route, key_start, window, sink, scale, local_rows, global_rows, microkernel):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def setup_context(ctx, inputs, output) -> None:
        q, k, v, route, key_start, *settings = inputs
        out, lse, _ = output
        ctx.save_for_backward(q, k, v, route, key_start, out, lse)
        ctx.settings = settings
        ctx.set_materialize_grads(True)

    def backward(ctx, dout, _dlse, _dfinite):
        q, k, v, route, key_start, out, lse = ctx.saved_tensors
        dq, dk, dv = ops.backward(dout, q, k, v, out, lse, route, key_start, *ctx.settings)
        return dq, dk, dv, None, None, None, None, None, None, None, None

    torch.library.register_autograd(f"{namespace}::forward", backward, setup_context=setup_context)


@torch.library.custom_op("aha::attention", mutates_args=())
def attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    route: Tensor,
    key_padding_mask: Tensor | None,
    window: int,
    sink: int,
    scale: float,
    impl: str,
    binary: bool,
) -> Tensor:
    """:func:`aha.aha_attention` without gradients, as one node; shapes as there. ``binary``: the
    caller guarantees a float route holds only 0 and 1 (its values are not checked)."""
    from aha.kernels import run_eager

    out = run_eager(q, k, v, route, window, scale, key_padding_mask, sink, impl, True if binary else None)
    return out.contiguous()


@attention_op.register_fake
def _attention_fake(q, k, v, route, key_padding_mask, window, sink, scale, impl, binary):
    return q.new_empty(q.shape)
