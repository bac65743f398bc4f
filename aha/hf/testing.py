"""Tiny randomly initialised models of every supported family, for tests and examples (built offline)."""

from __future__ import annotations

from typing import Any

import torch
from transformers import PreTrainedModel

from aha.hf.modeling import AHA_MODEL_CLASSES

#: Family name -> base causal-LM class (the keys of :data:`aha.hf.modeling.AHA_MODEL_CLASSES`).
FAMILIES: dict[str, type[PreTrainedModel]] = {cls.config_class.model_type: cls for cls in AHA_MODEL_CLASSES}

TINY = {
    "vocab_size": 128,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention
    "max_position_embeddings": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_model(family: str, *, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A tiny random ``*ForCausalLM`` of ``family`` (``"llama"``, ``"mistral"``, ``"qwen2"``, ``"qwen3"``, ``"olmo2"``), in eval mode.

    4 query heads sharing 2 KV heads (head_dim 16), 2 layers, vocab 128, fp32, no sliding window.
    ``overrides`` replace config fields.
    """
    model_class = FAMILIES[family]
    settings = {**TINY, **overrides}
    if family == "mistral":
        settings.setdefault("sliding_window", None)
    torch.manual_seed(seed)
    return model_class(model_class.config_class(**settings)).eval()
