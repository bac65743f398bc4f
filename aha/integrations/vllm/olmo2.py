"""AHA OLMo2 for vLLM: vLLM 0.32 has no OLMo2 class of its own (it serves OLMo2 through its
Transformers backend), so this module builds one from vLLM's layers, routed from the start.

OLMo2 differs from Llama in two places: no norm before attention or MLP but one after each
(``post_attention_layernorm``, ``post_feedforward_layernorm``, added to the residual), and QK-norm
over the whole query / key projection (all heads together), before RoPE. Under tensor parallelism
that norm needs every head: the shards are gathered, normalised and split again. The router reads
the attention input (the residual stream) and, in the fused layout (the released AHA-OLMO2's),
its rows are the last ``heads`` rows of ``q_proj``, split off before the QK-norm.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor, nn
from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import (
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    tensor_model_parallel_all_gather,
)
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.models.llama import LlamaMLP, LlamaModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    extract_layer_index,
    make_layers,
    maybe_prefix,
)

from aha.hf.settings import AhaSettings
from aha.integrations.vllm.models import RoutedAttentionMixin, split_router_weights


class AhaOlmo2Attention(RoutedAttentionMixin, nn.Module):
    """OLMo2 attention with a router and :class:`AhaAttention` (shapes as in vLLM's layers)."""

    def __init__(self, vllm_config: VllmConfig, settings: AhaSettings, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.tp_size, self.tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
        total_heads, total_kv_heads = config.num_attention_heads, config.num_key_value_heads
        if total_heads % self.tp_size or (total_kv_heads % self.tp_size and self.tp_size % total_kv_heads):
            raise ValueError(f"{total_heads} heads / {total_kv_heads} KV heads do not split over {self.tp_size} ranks")
        self.num_heads = total_heads // self.tp_size
        self.num_kv_heads = max(1, total_kv_heads // self.tp_size)
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // total_heads
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.scaling = self.head_dim**-0.5
        bias = getattr(config, "attention_bias", False)
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, total_heads, total_kv_heads, bias=bias, prefix=f"{prefix}.qkv_proj"
        )
        self.q_norm = RMSNorm(total_heads * self.head_dim, eps=config.rms_norm_eps)
        self.k_norm = RMSNorm(total_kv_heads * self.head_dim, eps=config.rms_norm_eps)
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings, rope_parameters=getattr(config, "rope_parameters", None)
        )
        self.attach_routing(vllm_config, settings, extract_layer_index(prefix), prefix)
        self.o_proj = RowParallelLinear(total_heads * self.head_dim, config.hidden_size, bias=bias, prefix=f"{prefix}.o_proj")

    def normalize_qk(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        """RMSNorm over all heads at once (gathered from every rank under tensor parallelism)."""
        if self.tp_size > 1:
            q, k = tensor_model_parallel_all_gather(q.contiguous()), tensor_model_parallel_all_gather(k.contiguous())
        q, k = self.q_norm(q), self.k_norm(k)
        if self.tp_size > 1:
            q, k = q.chunk(self.tp_size, dim=-1)[self.tp_rank], k.chunk(self.tp_size, dim=-1)[self.tp_rank]
        return q, k


class AhaOlmo2DecoderLayer(nn.Module):
    def __init__(self, vllm_config: VllmConfig, settings: AhaSettings, prefix: str):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.self_attn = AhaOlmo2Attention(vllm_config, settings, f"{prefix}.self_attn")
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size, config.hidden_act, prefix=f"{prefix}.mlp")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: Tensor, hidden_states: Tensor) -> Tensor:
        hidden_states = hidden_states + self.post_attention_layernorm(self.self_attn(positions, hidden_states))
        return hidden_states + self.post_feedforward_layernorm(self.mlp(hidden_states))


@support_torch_compile(dynamic_arg_dims={"input_ids": {0: "b"}, "positions": {0: "b"}})
class AhaOlmo2Model(nn.Module):
    hf_to_vllm_mapper = LlamaModel.hf_to_vllm_mapper  # the same q/k/v and gate/up projections to stack

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        settings = AhaSettings.from_config(config)
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: AhaOlmo2DecoderLayer(vllm_config, settings, prefix),
            prefix=f"{prefix}.layers",
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: Tensor | None, positions: Tensor, intermediate_tensors=None, inputs_embeds: Tensor | None = None) -> Tensor:
        hidden_states = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        for layer in self.layers:
            hidden_states = layer(positions, hidden_states)
        return self.norm(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        return AutoWeightsLoader(self).load_weights(weights, mapper=self.hf_to_vllm_mapper)


class AhaOlmo2ForCausalLM(nn.Module):
    """AHA OLMo2 in vLLM (our ``aha_olmo2`` conversions; separate or fused routers)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config = vllm_config.model_config.hf_config
        self.config = config
        self.model = AhaOlmo2Model(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, prefix=maybe_prefix(prefix, "lm_head"))
        if config.tie_word_embeddings:
            self.lm_head = self.lm_head.tie_weights(self.model.embed_tokens)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        return self.model.embed_tokens(input_ids)

    def forward(self, input_ids: Tensor | None, positions: Tensor, intermediate_tensors=None, inputs_embeds: Tensor | None = None) -> Tensor:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: Tensor) -> Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]]) -> set[str]:
        routers: set[str] = set()
        weights = split_router_weights(self, weights, AhaSettings.from_config(self.config), routers)
        return set(AutoWeightsLoader(self).load_weights(weights)) | routers

