"""The ``"aha"`` attention implementation for transformers' ``AttentionInterface``.

Importing :mod:`aha` registers two functions under the name ``"aha"``:

* :func:`aha_attention_forward` in ``AttentionInterface``: the attention function every decoder
  layer calls (``config._attn_implementation == "aha"``). It reads the router logits that the
  layer's :class:`~aha.hf.projection.RoutedQueryProjection` recorded for the same tokens, turns
  them into routes and calls :func:`aha.aha_attention`. Layers left unconverted run all-global.
* :func:`aha_key_padding_mask` in ``AttentionMaskInterface``: instead of a 4D causal mask, the
  model then passes the attention function the key padding layout
  (:class:`~aha.kernels.masks.KeyPadding`: the ``[batch, kv_len]`` mask, True = real token, with
  its first real keys), built once per forward pass and shared by every layer, or None;
  causality and the window are applied inside :func:`aha.aha_attention`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.masking_utils import (
    AttentionMaskInterface,
    causal_mask_function,
    prepare_padding_mask,
)

from aha.hf.projection import RoutedQueryProjection, find_router
from aha.hf.settings import AhaSettings, UnsupportedModelError
from aha.kernels import AhaInputError, KeyPadding, aha_attention
from aha.kernels.masks import padding_mask

ATTN_IMPLEMENTATION = "aha"


def aha_key_padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = causal_mask_function,
    attention_mask: Tensor | None = None,
    **kwargs: Any,
) -> KeyPadding | Tensor | None:
    """Mask builder for ``attn_implementation="aha"``: the key padding layout, or None.

    Called by ``transformers.masking_utils.create_causal_mask`` with its usual arguments.

    Returns:
        The :class:`~aha.kernels.masks.KeyPadding` of ``attention_mask`` restricted to the keys of
        this call (``[batch, kv_length]`` bool, True = a real key), read once here so that no layer
        reads it again; None when nothing is padded. Inside ``torch.compile`` the plain mask
        (the values cannot be read while tracing; the attention op reads them itself).

    Raises:
        AhaInputError: for masks AHA attention cannot express -- packed sequences (position ids
            that restart inside a row), custom mask overlays, or caches whose keys do not end at
            the current query (static / sliding-window caches).
    """
    if mask_function is not causal_mask_function:
        raise AhaInputError(
            "AHA attention supports plain causal language modelling only; this call asked for a custom mask "
            "(packed sequences with restarting position_ids, or an or/and mask overlay). Pass one sequence per "
            "row with an attention_mask instead of packing"
        )
    if int(q_offset) + q_length != kv_offset + kv_length:
        raise AhaInputError(
            f"AHA attention needs the queries to be the last positions of the keys (got queries at "
            f"{int(q_offset)}..{int(q_offset) + q_length - 1} of {kv_offset + kv_length} keys); use the default "
            "DynamicCache (static and sliding-window caches are not supported)"
        )
    if attention_mask is None:
        return None
    padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)[:, kv_offset : kv_offset + kv_length]
    padding = padding.to(torch.bool)
    if torch.compiler.is_compiling():
        return padding
    return None if bool(padding.all()) else KeyPadding.of(padding)


@torch.compiler.assume_constant_result  # a compiled model bakes them in (torch._dynamo.reset() after editing them)
def _routing_settings(config: Any) -> tuple[int, int, float]:
    """``(window, sink, threshold)`` of an AHA model's config (:meth:`AhaSettings.of`, parsed once)."""
    settings = AhaSettings.of(config)
    return settings.window, settings.sink, settings.threshold


def aha_attention_forward(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """Attention function registered as ``"aha"`` (transformers' attention-function signature).

    Args:
        module: the attention layer; ``module.config.aha`` holds the AHA settings and
            ``module.q_proj`` the router (see :func:`~aha.hf.projection.find_router`; layers left
            unconverted run all-global).
        query: ``[batch, q_heads, seq_q, head_dim]`` (after RoPE).
        key, value: ``[batch, kv_heads, seq_kv, head_dim]`` (the whole cache when decoding).
        attention_mask: the key padding layout from :func:`aha_key_padding_mask` (or a
            ``[batch, seq_kv]`` bool mask).
        scaling: softmax scale.
        dropout: attention dropout; must be 0 (AHA attention has none).
        kwargs: with ``cu_seq_lens_q`` and ``cu_seq_lens_k`` (continuous batching, packed
            training), the batch is one row of packed sequences, each attending only within
            itself (see :func:`_packed_attention`).

    Returns:
        ``(output [batch, seq_q, q_heads, head_dim], None)`` -- no attention weights.
    """
    try:
        window, sink, threshold = _routing_settings(module.config)
    except UnsupportedModelError:
        raise AhaInputError(
            'attn_implementation="aha" needs an AHA model: convert it with aha.convert(model) or load an AHA '
            "checkpoint with aha.from_pretrained"
        ) from None
    if dropout:
        raise AhaInputError(
            f"AHA attention has no attention dropout (got {dropout}); set config.attention_dropout = 0.0"
        )
    if isinstance(attention_mask, Tensor) and attention_mask.dim() != 2:
        raise AhaInputError(
            f"AHA attention takes a 2D [batch, seq] padding mask, got a {attention_mask.dim()}D mask; pass the "
            "tokenizer's attention_mask instead of a prepared 4D mask"
        )
    router = find_router(module)
    if router is not None:
        route = router.route(threshold, straight_through=module.training)
    else:
        batch, heads, seq_q, _ = query.shape
        route = torch.ones(batch, heads, seq_q, dtype=torch.bool, device=query.device)
    cu_seq_lens_q, cu_seq_lens_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_seq_lens_q is not None and cu_seq_lens_k is not None:
        output = _packed_attention(
            query, key, value, route, cu_seq_lens_q, cu_seq_lens_k, window, scaling, sink, router
        )
        return output.transpose(1, 2), None
    output = aha_attention(
        query, key, value, route, window, scale=scaling, key_padding_mask=attention_mask,
        sink=sink, route_is_binary=True,  # routes come from route_from_logits: bool or the 0/1 STE gate
    )
    if router is not None and router.route_observers:
        seq_q = query.shape[2]
        mask = padding_mask(attention_mask)
        _notify_observers(router, route, key.shape[2] - seq_q, None if mask is None else mask[:, -seq_q:])
    return output.transpose(1, 2), None


def _notify_observers(router: RoutedQueryProjection | None, route: Tensor, first_position: int, valid: Tensor | None) -> None:
    """Hand the route a layer used to its router's observers (see :func:`aha.track_routing`)."""
    if router is not None:
        for observer in router.route_observers:
            observer(route, first_position, valid)


def _packed_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    route: Tensor,
    cu_seq_lens_q: Tensor,
    cu_seq_lens_k: Tensor,
    window: int,
    scaling: float | None,
    sink: int,
    router: RoutedQueryProjection | None,
) -> Tensor:
    """AHA attention over sequences packed into one row (continuous batching, packed training).

    Args:
        query: ``[1, q_heads, total_q, head_dim]``; sequence ``i`` holds queries
            ``cu_seq_lens_q[i]:cu_seq_lens_q[i + 1]``, which are the last positions of its keys
            ``cu_seq_lens_k[i]:cu_seq_lens_k[i + 1]`` of ``key``/``value``
            ``[1, kv_heads, total_k, head_dim]`` (its cached prefix, then the new tokens).
        route: ``[1, q_heads, total_q]`` (True / 1 = global).

    Returns:
        ``[1, q_heads, total_q, head_dim]``; rows past ``cu_seq_lens_q[-1]`` (padding) are zero.
    """
    if query.shape[0] != 1:
        raise AhaInputError(f"packed sequences (cu_seq_lens_q/k) come in one row, got a batch of {query.shape[0]}")
    starts_q, starts_k = cu_seq_lens_q.tolist(), cu_seq_lens_k.tolist()
    if len(starts_q) != len(starts_k):
        raise AhaInputError(
            f"cu_seq_lens_q and cu_seq_lens_k describe {len(starts_q) - 1} and {len(starts_k) - 1} sequences"
        )
    outputs = []
    for (q_start, q_end), (k_start, k_end) in zip(itertools.pairwise(starts_q), itertools.pairwise(starts_k)):
        if q_end == q_start:
            continue
        if k_end - k_start < q_end - q_start:
            raise AhaInputError(
                f"a packed sequence has {q_end - q_start} queries but only {k_end - k_start} keys; its queries "
                "must be the last positions of its keys"
            )
        sequence_route = route[:, :, q_start:q_end]
        outputs.append(aha_attention(
            query[:, :, q_start:q_end], key[:, :, k_start:k_end], value[:, :, k_start:k_end], sequence_route,
            window, scale=scaling, sink=sink, route_is_binary=True,
        ))  # fmt: skip
        _notify_observers(router, sequence_route, (k_end - k_start) - (q_end - q_start), None)
    padding = query.shape[2] - starts_q[-1]
    if padding:
        outputs.append(query.new_zeros(*query.shape[:2], padding, query.shape[3]))
    return torch.cat(outputs, dim=2)


def register_attention() -> None:
    """Register :func:`aha_attention_forward` and :func:`aha_key_padding_mask` as ``"aha"``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, aha_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, aha_key_padding_mask)
