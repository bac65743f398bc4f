"""aha -- All-or-Here Attention.

Every attention head of every layer routes each token either to full causal attention
("All", ``g = 1`` / True) or to causal sliding-window attention over the last ``window``
keys ("Here", ``g = 0`` / False). See :func:`aha_attention` for the operator and
:class:`Router` for the per-head router.
"""

from aha.hf import (
    SUPPORTED_ARCHITECTURES,
    AhaSettings,
    GrowingCache,
    UnsupportedModelError,
    convert,
    force_routing,
    from_pretrained,
    is_aha_model,
    router_logits,
    track_routing,
)
from aha.kernels import IMPLEMENTATIONS, AhaInputError, GateGradient, aha_attention, choose_impl, gate_gradient
from aha.models import load_model, load_smollm2
from aha.router import OPEN_BIAS, Router, RouterInit, route_from_logits
from aha.stats import RoutingStats, ideal_cost_ratio

__version__ = "0.1.0"

__all__ = [
    "IMPLEMENTATIONS",
    "OPEN_BIAS",
    "SUPPORTED_ARCHITECTURES",
    "AhaInputError",
    "AhaSettings",
    "GateGradient",
    "GrowingCache",
    "Router",
    "RouterInit",
    "RoutingStats",
    "UnsupportedModelError",
    "aha_attention",
    "choose_impl",
    "convert",
    "force_routing",
    "from_pretrained",
    "gate_gradient",
    "ideal_cost_ratio",
    "is_aha_model",
    "load_model",
    "load_smollm2",
    "route_from_logits",
    "router_logits",
    "track_routing",
]
