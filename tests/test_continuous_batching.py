"""Continuous batching of AHA models: transformers' paged generation keeps the ``"aha"`` attention and
answers exactly as ``model.generate``; packed sequences run their own causal + window + sink attention."""

from __future__ import annotations

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

import aha
from aha.hf.attention import aha_attention_forward
from aha.hf.continuous_batching import AhaContinuousBatchingManager
from aha.hf.testing import tiny_model


def _routed_tiny():
    return aha.convert(tiny_model("llama"), window=4, sink=1, router_init="random").eval()


def test_batched_generation_equals_generate_per_request() -> None:
    model = _routed_tiny()
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 128, (length,), generator=generator).tolist() for length in (5, 17, 9, 30)]
    config = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
    expected = [model.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist() for p in prompts]
    with aha.track_routing(model) as stats:
        outputs = model.generate_batch(
            prompts, generation_config=config, continuous_batching_config=ContinuousBatchingConfig(), progress_bar=False
        )
    answers = [outputs[key].generated_tokens for key in sorted(outputs, key=lambda key: int(key.rsplit("_", 1)[1]))]
    assert answers == expected
    assert 0.2 < stats.global_fraction < 0.8  # the routes were used, not forced one way
    with aha.force_routing(model, "local"):
        local = model.generate_batch(prompts, generation_config=config, progress_bar=False)
    assert [local[key].generated_tokens for key in sorted(local, key=lambda key: int(key.rsplit("_", 1)[1]))] != answers


def test_manager_keeps_aha_attention() -> None:
    model = _routed_tiny()
    manager = model.init_continuous_batching()
    assert isinstance(manager, AhaContinuousBatchingManager)
    assert model.config._attn_implementation == "aha"


def test_packed_sequences_equal_one_call_each() -> None:
    model = _routed_tiny()
    attention = model.model.layers[0].self_attn
    torch.manual_seed(0)
    # two sequences: 3 new queries over 7 keys (a cached prefix of 4), then 5 queries over 5 keys
    query, key, value = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16)
    attention.q_proj.last_logits = torch.randn(1, 4, 8)
    packed, _ = aha_attention_forward(
        attention, query, key, value, None,
        cu_seq_lens_q=torch.tensor([0, 3, 8]), cu_seq_lens_k=torch.tensor([0, 7, 12]),
    )  # fmt: skip
    logits = attention.q_proj.last_logits
    pieces = []
    for (q0, q1), (k0, k1) in [((0, 3), (0, 7)), ((3, 8), (7, 12))]:
        attention.q_proj.last_logits = logits[:, :, q0:q1]
        out, _ = aha_attention_forward(attention, query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1], None)
        pieces.append(out)
    torch.testing.assert_close(packed, torch.cat(pieces, dim=1), rtol=0, atol=1e-6)


def test_packed_sequences_need_their_queries_last() -> None:
    model = _routed_tiny()
    attention = model.model.layers[0].self_attn
    attention.q_proj.last_logits = torch.randn(1, 4, 6)
    with pytest.raises(aha.AhaInputError, match="last positions"):
        aha_attention_forward(
            attention, torch.randn(1, 4, 6, 16), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16), None,
            cu_seq_lens_q=torch.tensor([0, 6]), cu_seq_lens_k=torch.tensor([0, 4]),
        )  # fmt: skip
