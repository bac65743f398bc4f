"""Inspect and steer the routers of a converted model: logits, statistics, forced routes."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from aha.hf.modeling import AhaSettings, decoder_layers, is_aha_model
from aha.hf.projection import (
    FORCE_GLOBAL,
    FORCE_LEARNED,
    FORCE_LOCAL,
    RoutedQueryProjection,
    find_router,
)
from aha.stats import RoutingStats

ForcedRoute = Literal["global", "local"]
_FORCE_CODES: dict[ForcedRoute | None, int] = {"global": FORCE_GLOBAL, "local": FORCE_LOCAL, None: FORCE_LEARNED}


def aha_model(model: nn.Module) -> PreTrainedModel:
    """The AHA model itself, or the one inside a wrapper (a PEFT model, DistributedDataParallel, ...)."""
    found = next((module for module in model.modules() if is_aha_model(module)), None)
    if found is None:
        raise TypeError(f"{type(model).__name__} is not an AHA model; convert it first with aha.convert(model)")
    return found


def routers(model: nn.Module) -> dict[int, RoutedQueryProjection]:
    """The routed query projections of a converted model, keyed by decoder-layer index (ascending)."""
    found = {index: find_router(layer.self_attn) for index, layer in enumerate(decoder_layers(aha_model(model)))}
    return {index: router for index, router in found.items() if router is not None}


def router_logits(model: nn.Module) -> list[Tensor]:
    """Router logits of the last forward pass, one ``[batch, heads, seq]`` tensor per converted layer.

    In layer order (see :func:`routers` for the indices). ``sigmoid(logit) > threshold`` means
    global. The autograd graph is kept when the forward ran with grad enabled, so a sparsity
    penalty such as ``mean(sigmoid(logits))`` can be added to the loss. Each forward overwrites
    them (during generation: the logits of the last step only). With gradient checkpointing keep
    transformers' default ``use_reentrant=False``: reentrant checkpointing runs the forward
    without a graph, so these logits would carry no gradient.

    Raises:
        RuntimeError: before the first forward pass.
    """
    logits = [q_proj.last_logits for q_proj in routers(model).values()]
    if any(item is None for item in logits):
        raise RuntimeError("no router logits yet: run a forward pass of the model first")
    return logits


@contextmanager
def observe_routes(model: nn.Module, observer: Callable[[int, Tensor, int, Tensor | None], None]) -> Iterator[None]:
    """Call ``observer(row, route, first_position, valid)`` after every routed attention call inside the block.

    ``row`` is the index of the layer among the converted layers; ``route`` the hard route
    ``[batch, heads, seq]`` it used (True = global, forced routes included); ``first_position``
    the absolute position of its first query (the KV prefix length); ``valid`` None or a
    ``[batch, seq]`` bool mask, False for padding tokens.
    """
    projections = list(routers(model).values())
    observers = []
    for row, q_proj in enumerate(projections):

        def observe(route: Tensor, first_position: int, valid: Tensor | None, row: int = row) -> None:
            observer(row, route, first_position, valid)

        q_proj.route_observers.append(observe)
        observers.append((q_proj, observe))
    try:
        yield
    finally:
        for q_proj, observe in observers:
            q_proj.route_observers.remove(observe)


@contextmanager
def track_routing(model: nn.Module) -> Iterator[RoutingStats]:
    """Accumulate the hard routes of every forward pass inside the block into a :class:`aha.RoutingStats`.

    Row ``i`` of the statistics is the ``i``-th converted layer (the layer index itself when all
    layers are converted). Padding tokens (False in the ``attention_mask``) are not counted; queries
    decoded against a KV cache count at their cache position (``first_position`` = cache length).
    Forced routes (:func:`force_routing`) are counted as used. Meant for evaluation: under
    gradient checkpointing the backward pass re-runs the forward and would count it twice.

    Yields:
        The statistics object, filled in as the model runs.
    """
    config = aha_model(model).config
    settings = AhaSettings.from_config(config)
    stats = RoutingStats(
        window=settings.window, num_layers=len(routers(model)), num_heads=config.num_attention_heads, sink=settings.sink
    )
    with observe_routes(model, stats.update):
        yield stats


@contextmanager
def force_routing(
    model: nn.Module,
    route: ForcedRoute | None,
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
) -> Iterator[None]:
    """Override the learned routes inside the block (ablations); restored on exit.

    Args:
        route: ``"global"`` (full causal attention), ``"local"`` (sliding window) or None (the
            learned routes, undoing an enclosing override).
        layers: decoder-layer indices to override (must be converted); None for all converted layers.
        heads: query-head indices to override; None for all heads.

    Forced (token, head) pairs carry no gradient to the router.
    """
    if route not in _FORCE_CODES:
        raise ValueError(f"route must be 'global', 'local' or None, got {route!r}")
    by_layer = routers(model)
    chosen = list(by_layer) if layers is None else list(layers)
    missing = [index for index in chosen if index not in by_layer]
    if missing:
        raise ValueError(f"layers {missing} are not converted to AHA; converted layers: {list(by_layer)}")
    num_heads = aha_model(model).config.num_attention_heads
    head_index = torch.arange(num_heads) if heads is None else torch.as_tensor(list(heads), dtype=torch.long)
    if head_index.numel() and not bool(((head_index >= 0) & (head_index < num_heads)).all()):
        raise ValueError(f"heads must be in 0..{num_heads - 1}, got {list(head_index.tolist())}")

    saved = {index: by_layer[index].forced_route for index in chosen}
    try:
        for index in chosen:
            q_proj = by_layer[index]
            base = q_proj.forced_route if q_proj.forced_route is not None else torch.full((num_heads,), FORCE_LEARNED)
            forced = base.clone().to(torch.int8)
            forced[head_index] = _FORCE_CODES[route]
            q_proj.forced_route = None if bool((forced == FORCE_LEARNED).all()) else forced
        yield
    finally:
        for index, previous in saved.items():
            by_layer[index].forced_route = previous
