"""Continuous batching (transformers' paged-attention generation) for AHA models.

transformers' ``ContinuousBatchingManager`` runs only ``"sdpa"``, ``"paged|eager"`` and flash
attention. An AHA model keeps ``"aha"``: the paged KV cache gathers each request's keys (its
cached prefix, then its new tokens) into one packed row, and the ``"aha"`` attention function
runs every request's own causal + window + sink attention over them, split by ``cu_seq_lens_q``
and ``cu_seq_lens_k`` (see :func:`aha.hf.attention.aha_attention_forward`). No 4D mask is built.

**Windowed KV reads.** For SDPA the paged cache gathers every request's whole prefix, for every
layer and KV head, into the packed row at every step. For an AHA layer :class:`WindowedKVReads`
replaces that read: a KV head whose query heads are all local for every query of a request gets
only the keys those queries read (the union of their windows, and the sink), and the other
positions of its rows keep what an earlier read left there (finite values, never read: the
attention of a local head stops at its window). KV heads with a global query head get the whole
prefix; under grouped-query attention a KV head is read whole as soon as one of its query heads
is global.

**Requests that cannot run.** transformers' worker stops for good, failing every request after it,
when a request's prompt is empty or its prompt and answer need more KV cache than the whole paged
cache ("No requests can be scheduled"). :meth:`AhaContinuousBatchingManager.add_request` refuses
those with a ValueError instead.

**The cache's size on CPU.** transformers sizes the paged cache from a share of the device's
memory (90% when nothing is set), which on CPU is the machine's whole RAM less this process's,
however much other processes use, and fills it with zeros up front. For a model on the CPU whose
config sets neither ``num_blocks`` nor ``max_memory_percent``, :func:`init_continuous_batching`
asks for at most :data:`CPU_CACHE_SHARE_OF_AVAILABLE` of the memory available when it is called.

Not covered: the decode fast path on block tables (CUDA flash kernels) and prefix sharing are
left as transformers runs them (the fast path reads through the block table; prefix sharing is
untested with AHA).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import ContinuousBatchingConfig, GenerationConfig, PreTrainedModel
from transformers.generation.continuous_batching import ContinuousBatchingManager
from transformers.generation.continuous_batching.cache import PagedAttentionCache
from transformers.generation.continuous_batching.cache_allocators.full_attention import (
    FullAttentionCacheAllocator,
)
from transformers.generation.continuous_batching.requests import GenerationOutput

from aha.hf.attention import ATTN_IMPLEMENTATION
from aha.hf.control import routers
from aha.hf.projection import RoutedQueryProjection
from aha.hf.settings import AhaSettings

FinishedListener = Callable[[GenerationOutput], None]
BatchListener = Callable[["list[str] | None"], None]


class AhaContinuousBatchingManager(ContinuousBatchingManager):
    """transformers' continuous batching manager, keeping the ``"aha"`` attention implementation.

    Attributes:
        finished_listeners: called with the output of every request that finished (or failed) as
            :meth:`get_result` hands it out, e.g. for serving telemetry.
        batch_listeners: called, in the generation thread, before every forward pass with the
            request ids of its packed sequences in packing order (sequence ``i`` of the
            ``cu_seq_lens`` the attention function sees is request ``i``), or None where the batch
            processor does not expose them (transformers' asynchronous batching).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self.finished_listeners: list[FinishedListener] = []
        self.batch_listeners: list[BatchListener] = []
        super().__init__(*args, **kwargs)

    def _generation_step(self) -> None:
        """transformers' step, after telling :attr:`batch_listeners` which requests it packs."""
        if self.batch_listeners:
            scheduled = getattr(getattr(self.batch_processor, "inputs_and_outputs", None), "requests_in_batch", None)
            request_ids = None if scheduled is None else [future.state.request_id for future in scheduled]
            for listener in self.batch_listeners:
                listener(request_ids)
        super()._generation_step()

    def switch_to_cb_friendly_attn(self, model: Any, auto_switch_to_flash: bool = True) -> None:
        """Keep ``"aha"`` (it reads the packed sequences itself); other implementations as transformers does."""
        if model.config._attn_implementation == ATTN_IMPLEMENTATION:
            return
        super().switch_to_cb_friendly_attn(model, auto_switch_to_flash)

    def _create_batch_processor(self) -> Any:
        """transformers' batch processor; with ``"aha"`` attention its paged cache reads windowed K/V."""
        processor = super()._create_batch_processor()
        if self.model.config._attn_implementation == ATTN_IMPLEMENTATION and not isinstance(
            processor.cache.update, WindowedKVReads
        ):
            processor.cache.update = WindowedKVReads(processor.cache, self.model)
        return processor

    @property
    def kv_reads(self) -> WindowedKVReads | None:
        """The windowed reads of the running batch processor's cache (None before it exists or without AHA)."""
        processor = getattr(self, "batch_processor", None)
        update = getattr(getattr(processor, "cache", None), "update", None)
        return update if isinstance(update, WindowedKVReads) else None

    def add_request(
        self, input_ids: list[int], request_id: str | None = None, max_new_tokens: int | None = None, **kwargs: Any
    ) -> str | None:
        """transformers' ``add_request``, refusing what would stop the batching worker for every request.

        Raises:
            ValueError: the prompt is empty, or the prompt and ``max_new_tokens`` together need more
                KV cache than the paged cache holds (such a request can neither run nor wait).
        """
        if len(input_ids) == 0:
            raise ValueError("the prompt is empty: continuous batching needs at least one prompt token")
        processor = self.batch_processor
        new_tokens = self.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if processor is not None and new_tokens is not None and len(input_ids) + new_tokens > processor.cache.max_tokens_read:
            raise ValueError(
                f"the request needs up to {len(input_ids) + new_tokens} tokens of KV cache ({len(input_ids)} of prompt, "
                f"{new_tokens} new), but the paged cache holds {processor.cache.max_tokens_read}: ask for fewer tokens, "
                "or give the cache more (ContinuousBatchingConfig.num_blocks, aha serve --kv-cache-tokens)"
            )
        return super().add_request(input_ids, request_id=request_id, max_new_tokens=max_new_tokens, **kwargs)

    def get_result(self, request_id: str | None = None, timeout: float | None = None) -> GenerationOutput | None:
        """transformers' ``get_result``; a finished request's output also goes to :attr:`finished_listeners`."""
        output = super().get_result(request_id=request_id, timeout=timeout)
        if output is not None and output.is_finished():
            for listener in self.finished_listeners:
                listener(output)
        return output


#: On CPU, the share of the memory available at start-up that the paged cache may take by default.
CPU_CACHE_SHARE_OF_AVAILABLE = 0.5


def _cpu_cache_config(config: ContinuousBatchingConfig) -> ContinuousBatchingConfig:
    """``config`` with ``max_memory_percent`` set so that the cache takes at most
    :data:`CPU_CACHE_SHARE_OF_AVAILABLE` of the available memory, unless the caller sized it."""
    if config.num_blocks is not None or config.max_memory_percent is not None:
        return config
    import psutil  # transformers needs it to size a CPU cache at all; accelerate depends on it

    memory = psutil.virtual_memory()
    sized_from = memory.total - psutil.Process().memory_info().rss  # what transformers takes a share of
    share = min(0.9, CPU_CACHE_SHARE_OF_AVAILABLE * memory.available / sized_from)
    return dataclasses.replace(config, max_memory_percent=share)


def init_continuous_batching(
    model: PreTrainedModel,
    generation_config: GenerationConfig | None = None,
    continuous_batching_config: ContinuousBatchingConfig | None = None,
    workload_hints: Any = None,
) -> AhaContinuousBatchingManager:
    """An :class:`AhaContinuousBatchingManager` for ``model`` (``init_continuous_batching`` of AHA models).

    On CPU, a cache left unsized gets at most half the memory available now (see the module docstring).
    """
    generation_config = generation_config if generation_config is not None else model.generation_config
    if generation_config.eos_token_id is None:
        generation_config.eos_token_id = -1  # as transformers does: no end-of-sequence token
    config = continuous_batching_config or ContinuousBatchingConfig()
    if model.device.type == "cpu":
        config = _cpu_cache_config(config)
    return AhaContinuousBatchingManager(
        model=model, generation_config=generation_config, continuous_batching_config=config, workload_hints=workload_hints
    )


class WindowedKVReads:
    """``PagedAttentionCache.update`` for AHA layers: write the new K/V, then read per KV head only
    the positions its query heads need (see the module docstring).

    Installed on a cache instance (``cache.update = WindowedKVReads(cache, model)``); layers of
    other kinds, batches without cache reads and the block-table decode path run transformers'
    own ``update``.

    Attributes:
        pairs_read: (key position, KV head) pairs gathered so far.
        pairs_full: pairs a whole-prefix read would have gathered.
    """

    def __init__(self, cache: PagedAttentionCache, model: nn.Module):
        self.cache = cache
        self.original = cache.update
        settings = AhaSettings.of(model.config)
        self.window, self.sink, self.threshold = settings.window, settings.sink, settings.threshold
        self.routers: dict[int, RoutedQueryProjection] = routers(model)
        self.buffers: dict[int, tuple[Tensor, Tensor]] = {}  # per allocator: rows gathered for one layer
        self.pairs_read = self.pairs_full = 0

    def __call__(self, key_states: Tensor, value_states: Tensor, layer_idx: int, kwargs: dict[str, Any]) -> tuple[Tensor, Tensor]:
        """Same contract as ``PagedAttentionCache.update``: key/value ``[1, kv_heads, new, head_dim]``
        in, ``[1, kv_heads, read, head_dim]`` out; ``kwargs`` updated in place."""
        allocator = self.cache.layer_to_allocator[layer_idx]
        router = self.routers.get(layer_idx)
        if router is None or not isinstance(allocator, FullAttentionCacheAllocator) or kwargs.get("block_table") is not None:
            return self.original(key_states, value_states, layer_idx, kwargs)
        read_indices = kwargs["read_index"]
        read_index = read_indices[allocator.index]
        if read_index.numel() == 0:
            return self.original(key_states, value_states, layer_idx, kwargs)
        # transformers' own update with nothing to read: it writes the new tokens and selects this
        # layer type's cu_seq_lens_k / max_length_k in kwargs; the read is done here
        kwargs["read_index"] = [read_index[:0] if index == allocator.index else other for index, other in enumerate(read_indices)]
        self.original(key_states, value_states, layer_idx, kwargs)
        kwargs["read_index"] = read_indices
        k_cache, v_cache = allocator._kv_token_views[layer_idx]  # [tokens, kv_heads, head_dim]
        route = router.route(self.threshold, straight_through=False)[0]  # [q_heads, total_q], True = global
        needed = needed_kv_pairs(
            route, kwargs["cu_seq_lens_q"], kwargs["cu_seq_lens_k"], k_cache.shape[1], self.window, self.sink
        )
        keys, values = self.gather(allocator.index, k_cache, v_cache, read_index, needed)
        return keys.transpose(0, 1)[None], values.transpose(0, 1)[None]

    def gather(self, group: int, k_cache: Tensor, v_cache: Tensor, read_index: Tensor, needed: Tensor) -> tuple[Tensor, Tensor]:
        """Rows ``read_index`` of the caches, ``[read, kv_heads, head_dim]``, filled only where ``needed``
        (positions past the packed keys are not filled either)."""
        total_k, kv_heads = needed.shape
        self.pairs_full += total_k * kv_heads
        if bool(needed.all()):
            self.pairs_read += total_k * kv_heads
            return torch.index_select(k_cache, 0, read_index), torch.index_select(v_cache, 0, read_index)
        rows = read_index.numel()
        buffers = self.buffers.get(group)
        if buffers is None or buffers[0].shape[0] < rows:
            shape = (max(rows, 2 * (0 if buffers is None else buffers[0].shape[0])), *k_cache.shape[1:])
            buffers = self.buffers[group] = (k_cache.new_zeros(shape), v_cache.new_zeros(shape))
        keys, values = buffers[0][:rows], buffers[1][:rows]
        for head in range(kv_heads):
            positions = needed[:, head].nonzero()[:, 0]
            self.pairs_read += len(positions)
            sources = read_index[positions]
            keys[positions, head] = k_cache[sources, head]
            values[positions, head] = v_cache[sources, head]
        return keys, values


def needed_kv_pairs(
    route: Tensor, cu_seq_lens_q: Tensor, cu_seq_lens_k: Tensor, kv_heads: int, window: int, sink: int
) -> Tensor:
    """Which (packed key position, KV head) pairs some query of a packed batch reads.

    Args:
        route: ``[q_heads, total_q]`` bool (True = global); query head ``h`` uses KV head
            ``h // (q_heads // kv_heads)``. Columns past ``cu_seq_lens_q[-1]`` (padding) are ignored.
        cu_seq_lens_q, cu_seq_lens_k: ``[requests + 1]`` offsets of each request's queries and keys;
            a request's queries are the last positions of its keys.

    Returns:
        ``[cu_seq_lens_k[-1], kv_heads]`` bool. A key of a request with ``L`` keys and ``q`` queries
        is read by a local query when it lies in the union of their windows, positions
        ``L - q - window + 1 .. L - 1``, or among the first ``sink``; by a global query always.
    """
    device = route.device
    query_lengths, key_lengths = cu_seq_lens_q.diff().long(), cu_seq_lens_k.diff().long()
    requests = torch.arange(len(key_lengths), device=device)
    query_request = requests.repeat_interleave(query_lengths)
    key_request = requests.repeat_interleave(key_lengths)
    total_q, total_k = len(query_request), len(key_request)
    opened = route[:, :total_q].reshape(kv_heads, -1, total_q).any(1).T.float()  # [total_q, kv_heads]
    opened_by_request = torch.zeros(len(key_lengths), kv_heads, device=device).index_add_(0, query_request, opened) > 0
    position = torch.arange(total_k, device=device) - cu_seq_lens_k[:-1].long()[key_request]
    first_near = (key_lengths - query_lengths - window + 1)[key_request]
    near = (position >= first_near) | (position < sink)
    return near[:, None] | opened_by_request[key_request]
