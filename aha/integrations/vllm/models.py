"""AHA model classes for vLLM: vLLM's own Llama / Mistral / Qwen2 / Qwen3 with routed attention.

An ``Aha<Family>ForCausalLM`` is vLLM's ``<Family>ForCausalLM``, built as usual, whose decoder
layers are then made routed (:func:`route_layers`):

* ``self_attn.router``: a ``ColumnParallelLinear(hidden, heads)``, sharded by head like the queries,
  so under tensor parallelism each rank routes its own heads;
* ``self_attn.attn``: an :class:`~aha.integrations.vllm.attention.AhaAttention` (every layer: layers
  the checkpoint left unconverted route all-global), fed the bool route ``sigmoid(logit) > threshold``.

Weights: a ``"separate"`` checkpoint's ``q_proj.router.proj.{weight,bias}`` and the router rows of a
``"fused"`` ``q_proj`` (its last ``heads`` rows) go to ``self_attn.router``; everything else loads
through vLLM's own loader. Settings come from the ``"aha"`` block of ``config.json``, read by
:class:`aha.AhaSettings`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor, nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.linear import ColumnParallelLinear
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM
from vllm.model_executor.models.qwen3 import Qwen3ForCausalLM

from aha.hf.settings import AhaSettings
from aha.integrations.vllm.attention import AhaAttention

_ROUTER_WEIGHT = re.compile(r"^(?P<layer>.*\.layers\.\d+\.self_attn)\.q_proj\.(?:router\.proj\.)?(?P<kind>weight|bias)$")


class RoutedAttentionMixin:
    """The forward of a routed vLLM attention layer (Llama, Mistral, Qwen2 and Qwen3 share it):
    projections, per-head QK-norm where the family has it, RoPE, route, routed attention."""

    qkv_proj: nn.Module
    o_proj: nn.Module
    rotary_emb: nn.Module
    attn: AhaAttention
    router: ColumnParallelLinear | None
    threshold: float
    scaling: float
    q_size: int
    kv_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int

    def forward(self, positions: Tensor, hidden_states: Tensor) -> Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.normalize_qk(q, k)
        q, k = self.rotary_emb(positions, q, k)
        output, _ = self.o_proj(self.attn(q, k, v, self.route(hidden_states)))
        return output

    def normalize_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """QK-norm before RoPE: RMSNorm per head where the family has one (Qwen3, Qwen2 with
        ``qk_norm``), none otherwise (Llama, Mistral)."""
        if getattr(self, "q_norm", None) is None:
            return q, k
        q = self.q_norm(q.view(-1, self.num_heads, self.head_dim)).view(q.shape)
        k = self.k_norm(k.view(-1, self.num_kv_heads, self.head_dim)).view(k.shape)
        return q, k

    def attach_routing(self, vllm_config: VllmConfig, settings: AhaSettings, layer_index: int, prefix: str) -> None:
        """Give the layer (``num_heads`` / ``num_kv_heads`` / ``head_dim`` / ``scaling`` set) its
        :class:`AhaAttention` named ``<prefix>.attn``, its router and its threshold."""
        self.attn = AhaAttention(
            self.num_heads,
            self.head_dim,
            self.scaling,
            num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config,
            prefix=f"{prefix}.attn",
            window=settings.window,
            sink=settings.sink,
        )
        self.router = router(vllm_config.model_config.hf_config, settings, layer_index, prefix)
        self.threshold = settings.threshold

    def route(self, hidden_states: Tensor) -> Tensor:
        """``[tokens, heads]`` bool, True = global: ``sigmoid(logit) > threshold`` as in
        :func:`aha.route_from_logits`; all True in a layer without a router."""
        if self.router is None:
            return torch.ones(hidden_states.shape[0], self.num_heads, dtype=torch.bool, device=hidden_states.device)
        logits, _ = self.router(hidden_states)
        return torch.sigmoid(logits.float()) > self.threshold


_routed_classes: dict[type, type] = {}


def _routed_class(attention_class: type) -> type:
    if attention_class not in _routed_classes:
        _routed_classes[attention_class] = type(f"Aha{attention_class.__name__}", (RoutedAttentionMixin, attention_class), {})
    return _routed_classes[attention_class]


def route_layers(model: nn.Module, vllm_config: VllmConfig) -> None:
    """Make every decoder layer of ``model`` (``model.model.layers``) routed, in place.

    The layer's stock ``Attention`` is replaced by an :class:`AhaAttention` under the same name
    (vLLM keys its KV cache by it); converted layers get a router.
    """
    config = vllm_config.model_config.hf_config
    settings = AhaSettings.from_config(config)
    if getattr(config, "llama_4_scaling", None) is not None:
        raise ValueError("AHA models in vLLM do not support llama_4_scaling")
    layers = model.model.layers
    forward_context = vllm_config.compilation_config.static_forward_context
    for index in range(model.model.start_layer, model.model.end_layer):
        attention = layers[index].self_attn
        del forward_context[attention.attn.layer_name]
        attention.__class__ = _routed_class(type(attention))
        attention.attach_routing(vllm_config, settings, index, attention.attn.layer_name.removesuffix(".attn"))


def router(config, settings: AhaSettings, index: int, prefix: str) -> ColumnParallelLinear | None:
    """The router of decoder layer ``index`` (``hidden -> heads``, sharded by head like the
    queries), or None for a layer the checkpoint left unconverted."""
    if index not in settings.layer_indices(config.num_hidden_layers):
        return None
    return ColumnParallelLinear(
        config.hidden_size, config.num_attention_heads, bias=settings.router_bias, gather_output=False, prefix=f"{prefix}.router"
    )


def split_router_weights(
    model: nn.Module, weights: Iterable[tuple[str, Tensor]], settings: AhaSettings, loaded: set[str]
) -> Iterator[tuple[str, Tensor]]:
    """Load the router weights of ``weights`` into ``model``'s routers (adding their parameter
    names to ``loaded``); yield every other weight, and the query rows of a fused ``q_proj``, for
    vLLM's loader.

    Separate layout: ``<layer>.self_attn.q_proj.router.proj.{weight,bias}``. Fused layout:
    ``<layer>.self_attn.q_proj.{weight,bias}`` with ``heads`` router rows after the query rows
    (a bias on a bias-free family's ``q_proj`` has zero query rows, which are dropped).
    """
    params = dict(model.named_parameters())
    heads = model.config.num_attention_heads
    fused = settings.router_layout == "fused"
    for name, tensor in weights:
        match = _ROUTER_WEIGHT.match(name)
        router_name = match and f"{match['layer']}.router.{match['kind']}"
        # a fused q_proj carries router rows only in converted layers
        if match is None or fused == (".router." in name) or (fused and router_name not in params):
            yield name, tensor
            continue
        if router_name not in params:
            raise ValueError(f"{name}: the checkpoint has a router in a layer its config does not convert")
        layer, kind = match["layer"], match["kind"]
        params[router_name].weight_loader(params[router_name], tensor[-heads:] if fused else tensor)
        loaded.add(router_name)
        if not fused:
            continue
        query_rows = tensor[:-heads]
        if kind == "bias" and f"{layer}.qkv_proj.bias" not in params:
            if torch.any(query_rows != 0):
                raise ValueError(f"{name}: the fused q_proj bias has non-zero query rows but the model's q_proj has no bias")
            continue
        yield name, query_rows


class AhaModelMixin:
    """``Aha<Family>ForCausalLM``: the family's vLLM model, routed (put before the family's class)."""

    config: object

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        route_layers(self, vllm_config)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        routers: set[str] = set()
        loaded = set(super().load_weights(split_router_weights(self, weights, AhaSettings.from_config(self.config), routers)))
        return loaded | routers


class AhaLlamaForCausalLM(AhaModelMixin, LlamaForCausalLM):
    """AHA Llama (SmolLM2, Llama) in vLLM."""


class AhaMistralForCausalLM(AhaModelMixin, MistralForCausalLM):
    """AHA Mistral in vLLM."""


class AhaQwen2ForCausalLM(AhaModelMixin, Qwen2ForCausalLM):
    """AHA Qwen2 in vLLM."""


class AhaQwen3ForCausalLM(AhaModelMixin, Qwen3ForCausalLM):
    """AHA Qwen3 in vLLM."""
