"""Routed attention inside vLLM: a backend whose KV cache the plugin owns, and one registered op.

How a step runs (one decoder layer of an AHA model):

1. The model computes the router logits of the attention input and the bool route
   ``sigmoid(logit) > threshold`` (True = global), ``[tokens, heads]``, inside vLLM's compiled graph.
2. It calls ``torch.ops.aha_vllm.routed_attention(query, key, value, route, output, layer_name)``: one
   opaque node of the graph that receives the route as a tensor argument (nothing is read from
   module state). The op writes the new keys and values into the layer's cache and runs
   :func:`aha.aha_attention` (the C++ kernel on CPU: sink keys, tiles sized by route, local rows
   reading only their window) once per request with several new tokens (prefill), and
   :func:`aha.kernels.paged.paged_decode_attention` once for all requests with one new token
   (decode: one call and one parallel region for the whole batch).

The KV cache. vLLM hands every layer a ``[blocks, kv_heads, block_size, 2 * head_dim]`` view (keys in
the first ``head_dim`` channels, values in the rest; the strides follow the KV-cache layout vLLM
resolved). This backend writes it itself (plain values: vLLM's CPU op packs keys per ISA, which no
other kernel can read) and asks for blocks that hold a whole sequence (:func:`one_block_per_request`),
so a request's keys are one strided view ``[kv_heads, seq_len, head_dim]`` that the kernel reads in
place, without a gather. The price: a request holds ``max_model_len`` tokens of cache from its
first step, and prefix caching only matches whole sequences (docs/serving.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor
from vllm.config import VllmConfig
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.attention.attention import get_attention_context
from vllm.utils.torch_utils import (
    LayerNameType,
    _encode_layer_name,
    _resolve_layer_name,
    direct_register_custom_op,
)
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadata,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from aha.kernels import aha_attention
from aha.kernels.paged import paged_decode_attention

#: The name of the backend in vLLM's attention-backend registry (``register()`` adds it).
BACKEND_NAME = "AHA"


def one_block_per_request(vllm_config: VllmConfig) -> None:
    """Make vLLM's KV blocks as long as the longest sequence (``max_model_len``, rounded up to 32).

    Every request then lives in one block, and the attention kernel reads its keys as one strided
    view. Called through vLLM's per-architecture config hook, before the platform picks its default
    block size. A smaller ``--block-size`` asked for by the user is refused with the fix named.
    """
    cache_config = vllm_config.cache_config
    needed = -(-vllm_config.model_config.max_model_len // 32) * 32
    if cache_config.user_specified_block_size and cache_config.block_size < needed:
        raise ValueError(
            f"AHA models keep each request in one KV block of max_model_len tokens, but --block-size "
            f"{cache_config.block_size} < {needed}: omit --block-size (or pass {needed})"
        )
    cache_config.block_size = max(needed, cache_config.block_size or 0)
    cache_config.user_specified_block_size = True  # keeps the CPU platform from resetting it to 128


@dataclass
class AhaAttentionMetadata(AttentionMetadata):
    """One step's batch, built once per step and read by every layer.

    ``requests``: per request with several new tokens ``(first query token, end query token, keys =
    seq_len, block id)``; its queries are the last ``end - first`` of its ``seq_len`` positions.
    ``decode_tokens`` / ``decode_blocks`` / ``decode_lengths``: ``[decodes]`` int64, the one query
    token, block and key count of each request with one new token. ``slot_mapping``: ``[tokens]``
    cache slot (``block * block_size + position``) of each new token, ``-1`` for padding.
    """

    num_actual_tokens: int
    requests: list[tuple[int, int, int, int]]
    decode_tokens: Tensor
    decode_blocks: Tensor
    decode_lengths: Tensor
    slot_mapping: Tensor


class AhaAttentionMetadataBuilder(AttentionMetadataBuilder[AhaAttentionMetadata]):
    """Turns vLLM's batch description into :class:`AhaAttentionMetadata` (host-side lists)."""

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.block_size = kv_cache_spec.block_size

    def build(
        self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False
    ) -> AhaAttentionMetadata:
        meta = common_attn_metadata
        num_reqs = meta.num_reqs
        starts = meta.query_start_loc_cpu[: num_reqs + 1].tolist()
        seq_lens = meta.seq_lens[:num_reqs].cpu().tolist()
        if max(seq_lens, default=0) > self.block_size:
            raise RuntimeError(
                f"a sequence of {max(seq_lens)} tokens does not fit one KV block of {self.block_size}: "
                "the AHA plugin sets the block size to max_model_len (aha.integrations.vllm.attention.one_block_per_request)"
            )
        blocks = meta.block_table_tensor[:num_reqs, 0].cpu().tolist()
        spans = [(starts[i], starts[i + 1], seq_lens[i], blocks[i]) for i in range(num_reqs) if starts[i + 1] > starts[i]]
        decodes = [span for span in spans if span[1] - span[0] == 1]
        tokens, lengths, decode_blocks = (torch.tensor([span[i] for span in decodes], dtype=torch.int64) for i in (0, 2, 3))
        prefills = [span for span in spans if span[1] - span[0] > 1]
        return AhaAttentionMetadata(meta.num_actual_tokens, prefills, tokens, decode_blocks, lengths, meta.slot_mapping)


@functools.cache
def _load_kernel(dtype: torch.dtype) -> None:
    """One small :func:`aha.aha_attention` call in ``dtype`` while the model is built: the kernel is
    compiled and loaded, and its one-time self-checks (which take gradients) run here, outside the
    inference mode vLLM serves in, instead of on the first request."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 8, 32, generator=generator, dtype=dtype) for _ in range(3))
    route = torch.tensor([True, False]).repeat_interleave(8).view(1, 2, 8)
    with torch.inference_mode(False), torch.no_grad():
        aha_attention(q, k, v, route, 4, sink=1)


class AhaAttentionImpl(AttentionImpl[AhaAttentionMetadata]):
    """The routed attention of one layer: cache writes, one :func:`aha.aha_attention` per prefilling
    request, and one :func:`~aha.kernels.paged.paged_decode_attention` for all decoding requests."""

    def __init__(
        self,
        num_heads: int,
        head_size: int,
        scale: float,
        num_kv_heads: int,
        alibi_slopes: list[float] | None,
        sliding_window: int | None,
        kv_cache_dtype: str,
        logits_soft_cap: float | None = None,
        attn_type: str = AttentionType.DECODER,
        kv_sharing_target_layer_name: str | None = None,
        *,
        window: int,
        sink: int,
    ) -> None:
        unsupported = {
            "ALiBi": alibi_slopes is not None,
            "a model-level sliding window": sliding_window is not None,
            "logit soft-capping": bool(logits_soft_cap),
            "a quantized KV cache": kv_cache_dtype != "auto",
            "non-decoder attention": attn_type != AttentionType.DECODER,
            "KV-cache sharing between layers": kv_sharing_target_layer_name is not None,
        }
        named = [name for name, present in unsupported.items() if present]
        if named:
            raise ValueError(f"AHA attention in vLLM does not support {', '.join(named)}")
        self.num_heads, self.head_size, self.num_kv_heads = num_heads, head_size, num_kv_heads
        self.scale = float(scale)
        self.window, self.sink = window, sink
        _load_kernel(torch.get_default_dtype())

    def forward(self, *args, **kwargs) -> Tensor:
        raise RuntimeError("AHA layers run through torch.ops.aha_vllm.routed_attention (they need the route)")

    def routed_forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        route: Tensor,
        kv_cache: Tensor,
        metadata: AhaAttentionMetadata,
        output: Tensor,
    ) -> None:
        """Write ``key``/``value`` into ``kv_cache`` and fill ``output`` with routed attention.

        Shapes: query/output ``[tokens, heads, head_dim]``, key/value ``[tokens, kv_heads, head_dim]``,
        route ``[tokens, heads]`` bool (True = global), kv_cache ``[blocks, kv_heads, block_size,
        2 * head_dim]`` (any strides).
        """
        tokens = metadata.num_actual_tokens
        dim = self.head_size
        slots = metadata.slot_mapping[:tokens].long()
        block_size = kv_cache.shape[2]
        kv_cache[slots // block_size, :, slots % block_size] = torch.cat([key[:tokens], value[:tokens]], dim=-1)
        if metadata.decode_tokens.numel():
            rows = metadata.decode_tokens
            output[rows] = paged_decode_attention(
                query[rows], kv_cache, metadata.decode_blocks, metadata.decode_lengths, route[rows], self.window,
                scale=self.scale, sink=self.sink,
            )  # fmt: skip
        for first, end, seq_len, block in metadata.requests:
            cached = kv_cache[block, :, :seq_len].unsqueeze(0)  # [1, kv_heads, seq_len, 2 * head_dim], no copy
            out = aha_attention(
                query[first:end].transpose(0, 1).unsqueeze(0),
                cached[..., :dim],
                cached[..., dim:],
                route[first:end].t().unsqueeze(0),  # [1, heads, queries]; no copy for a decode step
                self.window,
                scale=self.scale,
                sink=self.sink,
                route_is_binary=True,
            )
            output[first:end] = out[0].transpose(0, 1)


class AhaAttentionBackend(AttentionBackend):
    """vLLM's view of AHA attention: full-attention KV spec (never a sliding window, so no block
    is ever freed early), any KV layout, the plugin's own cache writes."""

    forward_includes_kv_cache_update: bool = True
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float32, torch.bfloat16, torch.float16]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto"]

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @staticmethod
    def get_impl_cls() -> type[AhaAttentionImpl]:
        return AhaAttentionImpl

    @staticmethod
    def get_builder_cls() -> type[AhaAttentionMetadataBuilder]:
        return AhaAttentionMetadataBuilder


class AhaAttention(Attention):
    """vLLM's ``Attention`` layer (KV spec, cache binding, forward context) with routed attention:
    ``forward(query, key, value, route)`` -> ``[tokens, heads * head_dim]``."""

    def __init__(self, num_heads: int, head_size: int, scale: float, *, window: int, sink: int, **kwargs):
        super().__init__(num_heads, head_size, scale, attn_backend=AhaAttentionBackend, window=window, sink=sink, **kwargs)
        self._encoded_name = _encode_layer_name(self.layer_name)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, route: Tensor) -> Tensor:  # type: ignore[override]
        """query ``[tokens, heads * head_dim]``, key/value ``[tokens, kv_heads * head_dim]``, route
        ``[tokens, heads]`` bool (True = global)."""
        output = torch.empty_like(query).view(-1, self.num_heads, self.head_size)
        torch.ops.aha_vllm.routed_attention(
            query.view(-1, self.num_heads, self.head_size),
            key.view(-1, self.num_kv_heads, self.head_size),
            value.view(-1, self.num_kv_heads, self.head_size),
            route,
            output,
            self._encoded_name,
        )
        return output.view(-1, self.num_heads * self.head_size)


def routed_attention(
    query: Tensor, key: Tensor, value: Tensor, route: Tensor, output: Tensor, layer_name: LayerNameType
) -> None:
    """The registered op (``torch.ops.aha_vllm.routed_attention``): see :class:`AhaAttentionImpl`."""
    metadata, layer, kv_cache, _ = get_attention_context(_resolve_layer_name(layer_name))
    if metadata is None:  # vLLM's profiling and warm-up runs carry no batch
        return
    layer.impl.routed_forward(query, key, value, route, kv_cache, metadata, output)


def _routed_attention_fake(query, key, value, route, output, layer_name) -> None:
    return None


_library = torch.library.Library("aha_vllm", "FRAGMENT")
direct_register_custom_op(
    op_name="routed_attention",
    op_func=routed_attention,
    mutates_args=["output"],
    fake_impl=_routed_attention_fake,
    target_lib=_library,
)
