"""A KV cache for generation that appends in place instead of re-concatenating every step.

transformers' :class:`~transformers.DynamicLayer` grows by ``torch.cat([keys, new])``: every
decode step copies the whole cache of every layer. On CPU that copy is a large share of a step
(it reads every cached key, which is the work AHA's local heads exist to skip). :class:`GrowingLayer`
keeps the keys in a buffer with spare room along the sequence and writes each new token into it;
the layer's ``keys``/``values`` are views of the filled part, so everything that reads a
``DynamicLayer`` (masks, ``get_seq_length``, ``crop``, beam reordering) reads it unchanged.

``generate`` on an AHA model builds a :class:`GrowingCache` sized for the call where it would
have built a ``DynamicCache`` (:meth:`aha.hf.modeling.AhaModelMixin._prepare_cache_for_generation`);
that holds for every ``attn_implementation``, so ``"aha"`` and ``"sdpa"`` on the same weights
compare attention, not caches.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor
from transformers import DynamicCache, PretrainedConfig
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A :class:`~transformers.DynamicLayer` that writes new keys and values into spare capacity.

    ``keys`` and ``values`` are ``[batch, kv_heads, seq, head_dim]`` views of buffers with room for
    ``capacity`` positions. When a write would overflow, the buffers are reallocated at
    ``max(needed, min(capacity_hint, 2 * needed))`` positions: one allocation when the final length
    is known up front, amortised doubling when it is not.

    Args:
        capacity_hint: the length the layer is expected to reach (e.g. prompt + new tokens); None
            when unknown.
    """

    def __init__(self, capacity_hint: int | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.capacity_hint = capacity_hint
        self._key_buffer: Tensor | None = None
        self._value_buffer: Tensor | None = None

    def _views_own_buffers(self) -> bool:
        """Whether ``keys``/``values`` are still the leading part of this layer's buffers (a reorder,
        batch selection or reset replaces them with other tensors, which are then adopted)."""
        buffers = (self._key_buffer, self._value_buffer)
        tensors = (self.keys, self.values)
        return all(
            buffer is not None and tensor is not None and tensor.dim() == 4 and tensor.data_ptr() == buffer.data_ptr()
            and tensor.shape[:2] == buffer.shape[:2] and tensor.stride() == buffer.stride()
            for buffer, tensor in zip(buffers, tensors)
        )  # fmt: skip

    def _reallocate(self, key_states: Tensor, value_states: Tensor, needed: int) -> None:
        capacity = max(needed, 2 * needed if self.capacity_hint is None else min(self.capacity_hint, 2 * needed))
        length = self.get_seq_length()
        buffers = []
        for old, new in ((self.keys, key_states), (self.values, value_states)):
            buffer = new.new_empty(*new.shape[:2], capacity, new.shape[3])
            if length:
                buffer[:, :, :length].copy_(old)
            buffers.append(buffer)
        self._key_buffer, self._value_buffer = buffers

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append ``[batch, kv_heads, new, head_dim]`` keys and values; return the whole cache (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[2]
        if not (length and self._views_own_buffers()) or needed > self._key_buffer.shape[2]:
            self._reallocate(key_states, value_states, needed)
        self._key_buffer[:, :, length:needed].copy_(key_states)
        self._value_buffer[:, :, length:needed].copy_(value_states)
        self.keys, self.values = self._key_buffer[:, :, :needed], self._value_buffer[:, :, :needed]
        return self.keys, self.values

    def reset(self) -> None:
        """Drop the cache and its buffers."""
        self._key_buffer = self._value_buffer = None
        super().reset()


class GrowingCache(DynamicCache):
    """A :class:`~transformers.DynamicCache` whose full-attention layers are :class:`GrowingLayer`.

    Sliding-window layers of the config (and layers of other types) are kept as transformers
    builds them.

    Args:
        config: the model config (as for ``DynamicCache``).
        capacity_hint: the length the cache is expected to reach (see :class:`GrowingLayer`).
    """

    def __init__(self, config: PretrainedConfig, capacity_hint: int | None = None):
        super().__init__(config=config)
        self.layers = [
            GrowingLayer(capacity_hint) if type(layer) is DynamicLayer else layer for layer in self.layers
        ]


def growing_cache_for(cache: Any, config: PretrainedConfig, capacity_hint: int) -> Any:
    """The cache ``generate`` should use: a :class:`GrowingCache` in place of the plain, empty
    ``DynamicCache`` it builds by default; anything else (offloaded, quantized, static, a
    user's own cache) unchanged."""
    if type(cache) is DynamicCache and not cache.offloading and cache.get_seq_length() == 0:
        return GrowingCache(config, capacity_hint)
    return cache


__all__ = ["GrowingCache", "GrowingLayer"]
