"""Query projections that also emit the AHA router logits (one per query head per token).

A converted attention layer keeps its ``q_proj`` name; the module becomes a
:class:`RoutedQueryProjection`, which returns the queries exactly as before and records the
router logits of the same input in :attr:`RoutedQueryProjection.last_logits`. The ``"aha"``
attention function (:mod:`aha.hf.attention`) turns them into routes.

Two weight layouts:

* ``"separate"`` (:class:`SeparateRouterQueryProjection`): ``q_proj.weight`` / ``q_proj.bias``
  unchanged, plus a :class:`aha.Router` at ``q_proj.router`` (``q_proj.router.proj.weight``
  ``[heads, hidden]``, ``q_proj.router.proj.bias`` ``[heads]``).
* ``"fused"`` (:class:`FusedRouterQueryProjection`): the released AHA-OLMO2 layout.
  ``q_proj.weight`` is ``[heads * head_dim + heads, hidden]``: the query rows, then one router row
  per head; a bias, when present, is widened the same way. The split happens right after the
  projection, before any QK-norm or RoPE.

Polarity: ``sigmoid(logit) > threshold`` means **global** (full causal attention).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn

from aha.router import Router, RouterInit, route_from_logits

RouterLayout = Literal["separate", "fused"]
RouteObserver = Callable[[Tensor, int, "Tensor | None"], None]
"""Called after every routed attention call as ``observer(route, first_position, valid)``."""

#: Values of :attr:`RoutedQueryProjection.forced_route`.
FORCE_LEARNED, FORCE_LOCAL, FORCE_GLOBAL = -1, 0, 1


class RoutedQueryProjection(nn.Linear):
    """Base class: an ``nn.Linear`` query projection that also computes router logits.

    Attributes:
        num_heads: query heads (one router logit each).
        query_features: width of the returned queries (``num_heads * head_dim``).
        last_logits: router logits ``[batch, heads, seq]`` of the last forward pass (graph kept
            when grad is enabled), or None before the first one.
        forced_route: None, or an int8 tensor ``[heads]`` overriding the learned routes per
            head: ``-1`` learned, ``0`` forced local, ``1`` forced global (see
            :func:`aha.force_routing`).
        route_observers: callbacks notified with every route used (see :func:`aha.track_routing`).
    """

    num_heads: int
    query_features: int

    def _init_routing_state(self, num_heads: int, query_features: int) -> None:
        self.num_heads = num_heads
        self.query_features = query_features
        self.last_logits: Tensor | None = None
        self.forced_route: Tensor | None = None
        self.route_observers: list[RouteObserver] = []
        self._bool_route: tuple[Tensor, Tensor | None, float, Tensor] | None = None

    def route(self, threshold: float, *, straight_through: bool) -> Tensor:
        """The route for :func:`aha.aha_attention` from :attr:`last_logits`, overrides applied.

        Returns:
            ``[batch, heads, seq]``: bool (True = global) or, with ``straight_through``, the
            STE float gate ``g_hard + (g_soft - g_soft.detach())`` (exactly 0/1 forward).
        """
        if self.last_logits is None:
            raise RuntimeError("the router has not run yet: call the model's forward first")
        if straight_through:  # carries the gate's gradient: made afresh for each caller
            return self._make_route(self.last_logits, threshold, straight_through=True)
        # one bool route per forward however many read it (under continuous batching, the paged
        # cache's K/V reads and the attention): reused while the logits and overrides are the same objects
        cached = self._bool_route
        if cached is not None and cached[0] is self.last_logits and cached[1] is self.forced_route and cached[2] == threshold:
            return cached[3]
        route = self._make_route(self.last_logits, threshold, straight_through=False)
        self._bool_route = (self.last_logits, self.forced_route, threshold, route)
        return route

    def _make_route(self, logits: Tensor, threshold: float, *, straight_through: bool) -> Tensor:
        route, _ = route_from_logits(logits, threshold, straight_through=straight_through)
        if self.forced_route is None:
            return route
        forced = self.forced_route.to(route.device)[None, :, None]
        return torch.where(forced == FORCE_LEARNED, route, (forced == FORCE_GLOBAL).to(route.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_heads={self.num_heads}"


class SeparateRouterQueryProjection(RoutedQueryProjection):
    """``q_proj`` unchanged plus a :class:`aha.Router` child (``router.proj``: ``hidden -> heads``)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_heads: int,
        *,
        bias: bool,
        router_init: RouterInit,
        router_bias: bool,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_routing_state(num_heads, out_features)
        self.router = Router(in_features, num_heads, init=router_init, bias=router_bias).to(device=device, dtype=dtype)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """``[batch, seq, hidden]`` -> queries ``[batch, seq, heads * head_dim]``; records the logits."""
        self.last_logits = self.router(hidden_states)
        return super().forward(hidden_states)


class FusedRouterQueryProjection(RoutedQueryProjection):
    """One ``nn.Linear`` with ``heads * head_dim + heads`` outputs: queries, then router logits."""

    def __init__(
        self,
        in_features: int,
        query_features: int,
        num_heads: int,
        *,
        bias: bool,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__(in_features, query_features + num_heads, bias=bias, device=device, dtype=dtype)
        self._init_routing_state(num_heads, query_features)

    def reset_router_parameters(self, init: RouterInit) -> None:
        """(Re-)initialise only the router rows with :class:`aha.Router`'s ``init`` scheme."""
        fresh = Router(self.in_features, self.num_heads, init=init, bias=self.bias is not None)
        with torch.no_grad():
            self.weight[self.query_features :].copy_(fresh.proj.weight)
            if self.bias is not None:
                self.bias[self.query_features :].copy_(fresh.proj.bias)

    def forward(self, hidden_states: Tensor) -> Tensor:
        """``[batch, seq, hidden]`` -> queries ``[batch, seq, heads * head_dim]``; records the logits."""
        queries, logits = super().forward(hidden_states).split([self.query_features, self.num_heads], dim=-1)
        self.last_logits = logits.transpose(1, 2).contiguous()  # a copy: does not pin the whole projection output
        return queries


def find_router(attention: nn.Module) -> RoutedQueryProjection | None:
    """The :class:`RoutedQueryProjection` of an attention layer, or None if the layer is not converted.

    Looks inside ``attention.q_proj`` too, so wrappers that keep the original module as a child
    (PEFT's LoRA layers keep it as ``base_layer``) still route.
    """
    q_proj = attention.q_proj
    if isinstance(q_proj, RoutedQueryProjection):  # the converted layer itself: no module walk (every decode step)
        return q_proj
    return next((m for m in q_proj.modules() if isinstance(m, RoutedQueryProjection)), None)


def routed_query_projection(
    q_proj: nn.Linear,
    num_heads: int,
    *,
    layout: RouterLayout,
    router_init: RouterInit,
    router_bias: bool,
) -> RoutedQueryProjection:
    """Build the routed replacement of ``q_proj``; its query output equals ``q_proj``'s exactly.

    The query weights are shared (separate layout) or copied into a new trainable parameter
    (fused layout); the router weights get ``router_init``. Works on meta tensors too
    (transformers' deferred loading).
    """
    device, dtype = q_proj.weight.device, q_proj.weight.dtype
    if layout == "separate":
        routed = SeparateRouterQueryProjection(
            q_proj.in_features,
            q_proj.out_features,
            num_heads,
            bias=q_proj.bias is not None,
            router_init=router_init,
            router_bias=router_bias,
            device=device,
            dtype=dtype,
        )
        routed.weight = q_proj.weight
        routed.bias = q_proj.bias
        return routed
    if layout != "fused":
        raise ValueError(f"unknown router layout {layout!r}; use 'separate' or 'fused'")
    routed = FusedRouterQueryProjection(
        q_proj.in_features,
        q_proj.out_features,
        num_heads,
        bias=q_proj.bias is not None or router_bias,
        device=device,
        dtype=dtype,
    )
    with torch.no_grad():
        routed.weight[: q_proj.out_features].copy_(q_proj.weight)
        if q_proj.bias is not None:
            routed.bias[: q_proj.out_features].copy_(q_proj.bias)
        elif routed.bias is not None:  # a router bias on a bias-free q_proj: the query rows stay zero
            routed.bias[: q_proj.out_features].zero_()
    routed.reset_router_parameters(router_init)
    return routed
