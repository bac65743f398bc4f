"""The three routing modes every evaluation compares, and routing capture helpers.

* ``"full"``: every (token, head) forced global -- the original model's full causal attention;
* ``"local"``: every pair forced local -- pure sliding-window attention at the model's window;
* ``"aha"``: the routes the routers learned.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import Tensor, nn

import aha
from aha.router import route_from_logits

RoutingMode = Literal["full", "local", "aha"]
#: All modes, in the order tables list them.
MODES: tuple[RoutingMode, ...] = get_args(RoutingMode)
_FORCED = {"full": "global", "local": "local", "aha": None}


def check_modes(modes: Iterable[str]) -> list[RoutingMode]:
    """The modes as a list; raises ``ValueError`` naming the valid ones on an unknown mode."""
    modes = list(modes)
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise ValueError(f"unknown routing modes {unknown}; choose from {list(MODES)}")
    return modes  # type: ignore[return-value]


@contextmanager
def routing_mode(model: nn.Module, mode: RoutingMode) -> Iterator[None]:
    """Run the block with ``model`` in routing ``mode`` (see the module docstring)."""
    check_modes([mode])
    with aha.force_routing(model, _FORCED[mode]):
        yield


def converted_layers(model: nn.Module) -> list[int]:
    """Decoder-layer indices that have routers, in order: the rows of routing statistics and captures."""
    return aha.AhaSettings.of(model.config).layer_indices(model.config.num_hidden_layers)


@torch.no_grad()
def capture_routes(model: nn.Module, input_ids: Tensor) -> Tensor:
    """The learned hard routes of one text: ``[num_converted_layers, num_heads, seq]`` bool, True = global.

    Row ``i`` is decoder layer ``converted_layers(model)[i]``.

    Args:
        model: an AHA-converted model.
        input_ids: ``[seq]`` or ``[1, seq]`` token ids.
    """
    ids = input_ids.reshape(1, -1).to(next(model.parameters()).device)
    model(input_ids=ids)
    threshold = aha.AhaSettings.of(model.config).threshold
    return torch.stack([route_from_logits(logits, threshold)[0][0].cpu() for logits in aha.router_logits(model)])
