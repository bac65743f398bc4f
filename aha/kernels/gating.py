"""Route and gate semantics shared by the fast implementations.

An implementation supplies three attention functions over the same q, k, v: ``routed(hard)``
for a bool route ``[batch, q_heads, seq_q]`` (True = global), and ``full()`` / ``local()``, the
dense branches for every query. :func:`apply_route` turns any route the operator accepts into
calls to them:

* bool routes and binary float gates (the STE's forward values) run ``routed`` only;
* a float gate that requires grad also gets ``d out / d g = full - local`` at every pair, from
  both dense branches computed without grad (the price of the STE: full attention per step);
* soft gates (values strictly between 0 and 1) mix both dense branches, ``g * full + (1 - g) * local``;
* a window that covers every key makes both branches full attention.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from aha.kernels._checks import is_binary


def apply_route(
    route: Tensor,
    window_covers_keys: bool,
    routed: Callable[[Tensor], Tensor],
    full: Callable[[], Tensor],
    local: Callable[[], Tensor],
) -> Tensor:
    """AHA output ``[batch, q_heads, seq_q, head_dim]`` for ``route`` (bool, True = global, or float gate g = 1 global)."""
    gate_needs_grad = route.dtype != torch.bool and route.requires_grad
    if window_covers_keys:
        out = full()
        if gate_needs_grad:
            out = out + 0.0 * route[..., None].to(out.dtype)  # keeps the graph; d out / d g = 0
        return out
    if not is_binary(route):
        g = route[..., None]
        full_out = full()
        g = g.to(full_out.dtype)
        return g * full_out + (1 - g) * local()
    hard = route if route.dtype == torch.bool else route > 0.5
    out = routed(hard)
    if gate_needs_grad:
        with torch.no_grad():
            branch_gap = full() - local()
        g = route[..., None].to(out.dtype)
        out = out + (g - g.detach()) * branch_gap
    return out


def apply_route_with_kernel(
    route: Tensor, window_covers_keys: bool, routed: Callable[[Tensor, int], Tensor], sink: int
) -> Tensor:
    """:func:`apply_route` for an implementation whose routed kernel also computes the dense
    branches: ``routed(hard, sink)`` on the route itself, on an all-global route (full attention,
    no sink) and on an all-local route (sliding window)."""
    every = torch.ones(route.shape, dtype=torch.bool, device=route.device)
    return apply_route(
        route,
        window_covers_keys,
        routed=lambda hard: routed(hard, sink),
        full=lambda: routed(every, 0),
        local=lambda: routed(~every, sink),
    )
