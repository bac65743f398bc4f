"""Route and gate semantics shared by the fast implementations.

An implementation supplies three attention functions over the same q, k, v: ``routed(hard)``
for a bool route ``[batch, q_heads, seq_q]`` (True = global), and ``full()`` / ``local()``, the
dense branches for every query. :func:`apply_route` turns any route the operator accepts into
calls to them:

* bool routes and binary float gates (the STE's forward values) run ``routed`` only (a caller
  that knows its gate is binary passes ``binary=True``; otherwise its values are read);
* a float gate that requires grad also gets ``d out / d g = full - local`` at every pair, from
  both dense branches computed without grad (the price of the STE: full attention per step; the
  estimators of :mod:`aha.kernels.gate_estimators`, which the dispatcher applies before an
  implementation sees the gate, avoid it);
* soft gates (values strictly between 0 and 1) mix both dense branches, ``g * full + (1 - g) * local``;
* a window that covers every key makes both branches full attention.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from aha.kernels._checks import is_binary


def apply_route(
    route: Tensor,
    window_covers_keys: bool,
    routed: Callable[[Tensor], Tensor],
    full: Callable[[], Tensor],
    local: Callable[[], Tensor],
    binary: bool | None = None,
) -> Tensor:
    """AHA output ``[batch, q_heads, seq_q, head_dim]`` for ``route`` (bool, True = global, or float gate g = 1 global).

    ``binary`` says whether a float gate's values are all 0 or 1 (None: unknown; read here in eager
    mode). Inside a compiled graph an unknown gate cannot be read, so it takes the form that is exact
    for every gate, ``routed(g > 0.5) + (g - [g > 0.5]) * (full - local)``, which pays both dense
    branches with their gradients; producers that know their gate is binary (the STE) say so.
    """
    gate_needs_grad = route.dtype != torch.bool and route.requires_grad
    if window_covers_keys:
        out = full()
        if gate_needs_grad:
            out = out + 0.0 * route[..., None].to(out.dtype)  # keeps the graph; d out / d g = 0
        return out
    if route.dtype == torch.bool:
        return routed(route)
    if binary is None and not torch.compiler.is_compiling():
        binary = is_binary(route)
    hard = route > 0.5
    if binary is False:
        g = route[..., None]
        full_out = full()
        g = g.to(full_out.dtype)
        return g * full_out + (1 - g) * local()
    out = routed(hard)
    if binary is None:
        g = route[..., None].to(out.dtype)
        return out + (g - hard[..., None].to(out.dtype)) * (full() - local())
    if gate_needs_grad:
        with torch.no_grad():
            branch_gap = full() - local()
        out = with_gate_gradient(out, route, branch_gap)
    return out


class _StraightThroughGate(torch.autograd.Function):
    """Identity on ``out`` whose backward also gives the gate ``sum_d(grad * difference) * weight``."""

    @staticmethod
    def forward(ctx, out: Tensor, gate: Tensor, difference: Tensor, weight: Tensor | None) -> Tensor:
        ctx.save_for_backward(difference, weight)
        ctx.gate_dtype = gate.dtype
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None, None]:
        difference, weight = ctx.saved_tensors
        grad_gate = (grad * difference).sum(-1)
        if weight is not None:
            grad_gate = grad_gate.to(weight.dtype) * weight
        return grad, grad_gate.to(ctx.gate_dtype), None, None


def with_gate_gradient(out: Tensor, gate: Tensor, difference: Tensor, weight: Tensor | None = None) -> Tensor:
    """``out + (g - g.detach()) * difference * weight[..., None]`` without the full-size arithmetic:
    ``out`` ``[batch, q_heads, seq_q, head_dim]`` unchanged in value, with ``d out / d gate`` =
    ``difference * weight`` (the straight-through gate's gradient, ``full - local`` or an estimate of it).

    Args:
        out: the routed output ``[B, Hq, Sq, D]``.
        gate: the float gate ``[B, Hq, Sq]`` (1 = global) that receives the gradient.
        difference: ``[B, Hq, Sq, D]`` in ``out``'s dtype, computed without grad.
        weight: optional ``[B, Hq, Sq]`` factor on ``difference`` (a sign, a rescaling, 0 where
            unsampled), applied to the gate's gradient in its own dtype (fp32 keeps ``1 / fraction`` exact).
    """
    return _StraightThroughGate.apply(out, gate, difference, weight)


def apply_route_with_kernel(
    route: Tensor, window_covers_keys: bool, routed: Callable[[Tensor, int], Tensor], sink: int, binary: bool | None = None
) -> Tensor:
    """:func:`apply_route` for an implementation whose routed kernel also computes the dense
    branches: ``routed(hard, sink)`` on the route itself, on an all-global route (full attention,
    no sink) and on an all-local route (sliding window)."""

    if route.dtype == torch.bool and not window_covers_keys:  # the common inference call, without the closures
        return routed(route, sink)

    def every(value: bool) -> Tensor:
        return torch.full(route.shape, value, dtype=torch.bool, device=route.device)

    return apply_route(
        route,
        window_covers_keys,
        routed=lambda hard: routed(hard, sink),
        full=lambda: routed(every(True), 0),
        local=lambda: routed(every(False), sink),
        binary=binary,
    )
