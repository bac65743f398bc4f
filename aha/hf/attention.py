"""The ``"aha"`` attention implementation for transformers' ``AttentionInterface``.

Importing :mod:`aha` registers two functions under the name ``"aha"``:

* :func:`aha_attention_forward` in ``AttentionInterface``: the attention function every decoder
  layer calls (``config._attn_implementation == "aha"``). It reads the router logits that the
  layer's :class:`~aha.hf.projection.RoutedQueryProjection` recorded for the same tokens, turns
  them into routes and calls :func:`aha.aha_attention`. Layers left unconverted run all-global.
* :func:`aha_key_padding_mask` in ``AttentionMaskInterface``: instead of a 4D causal mask, the
  model then passes the attention function the ``[batch, kv_len]`` key padding mask (True = real
  token) or None; causality and the window are applied inside :func:`aha.aha_attention`.
"""

from __future__ import annotations

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

from aha.hf.projection import find_router
from aha.hf.settings import AhaSettings
from aha.kernels import AhaInputError, aha_attention

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
) -> Tensor | None:
    """Mask builder for ``attn_implementation="aha"``: the key padding mask, or None.

    Called by ``transformers.masking_utils.create_causal_mask`` with its usual arguments.

    Returns:
        ``[batch, kv_length]`` bool, True = a real key (``attention_mask`` restricted to the keys
        of this call), or None when nothing is padded.

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
    return None if bool(padding.all()) else padding


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
        attention_mask: ``[batch, seq_kv]`` bool key padding mask from :func:`aha_key_padding_mask`.
        scaling: softmax scale.
        dropout: attention dropout; must be 0 (AHA attention has none).

    Returns:
        ``(output [batch, seq_q, q_heads, head_dim], None)`` -- no attention weights.
    """
    if getattr(module.config, "aha", None) is None:
        raise AhaInputError(
            'attn_implementation="aha" needs an AHA model: convert it with aha.convert(model) or load an AHA '
            "checkpoint with aha.from_pretrained"
        )
    if dropout:
        raise AhaInputError(
            f"AHA attention has no attention dropout (got {dropout}); set config.attention_dropout = 0.0"
        )
    if attention_mask is not None and attention_mask.dim() != 2:
        raise AhaInputError(
            f"AHA attention takes a 2D [batch, seq] padding mask, got a {attention_mask.dim()}D mask; pass the "
            "tokenizer's attention_mask instead of a prepared 4D mask"
        )
    settings = AhaSettings.of(module.config)
    router = find_router(module)
    if router is not None:
        route = router.route(settings.threshold, straight_through=module.training)
    else:
        batch, heads, seq_q, _ = query.shape
        route = torch.ones(batch, heads, seq_q, dtype=torch.bool, device=query.device)
    output = aha_attention(
        query, key, value, route, settings.window, scale=scaling, key_padding_mask=attention_mask,
        sink=settings.sink,
    )
    if router is not None and router.route_observers:
        seq_q = query.shape[2]
        valid = None if attention_mask is None else attention_mask[:, -seq_q:]
        for observer in router.route_observers:
            observer(route, key.shape[2] - seq_q, valid)
    return output.transpose(1, 2), None


def register_attention() -> None:
    """Register :func:`aha_attention_forward` and :func:`aha_key_padding_mask` as ``"aha"``."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, aha_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, aha_key_padding_mask)
