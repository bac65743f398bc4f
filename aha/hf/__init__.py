"""Hugging Face transformers integration: convert a pretrained causal LM to AHA, save, load, generate.

Importing this package (``import aha`` does) registers the ``"aha"`` attention implementation and
mask builder with transformers, and the ``Aha*Config`` / ``Aha*ForCausalLM`` classes with
``AutoConfig`` / ``AutoModelForCausalLM``.
"""

from aha.hf.attention import ATTN_IMPLEMENTATION, register_attention
from aha.hf.control import force_routing, router_logits, routers, track_routing
from aha.hf.kv_cache import GrowingCache
from aha.hf.modeling import (
    AHA_MODEL_CLASSES,
    SUPPORTED_ARCHITECTURES,
    AhaSettings,
    UnsupportedModelError,
    convert,
    from_pretrained,
    is_aha_model,
    register_auto_classes,
)
from aha.hf.projection import (
    FusedRouterQueryProjection,
    RoutedQueryProjection,
    RouterLayout,
    SeparateRouterQueryProjection,
)

register_attention()
register_auto_classes()

__all__ = [
    "AHA_MODEL_CLASSES",
    "ATTN_IMPLEMENTATION",
    "SUPPORTED_ARCHITECTURES",
    "AhaSettings",
    "FusedRouterQueryProjection",
    "GrowingCache",
    "RoutedQueryProjection",
    "RouterLayout",
    "SeparateRouterQueryProjection",
    "UnsupportedModelError",
    "convert",
    "force_routing",
    "from_pretrained",
    "is_aha_model",
    "router_logits",
    "routers",
    "track_routing",
]
