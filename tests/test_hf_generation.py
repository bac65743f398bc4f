"""Generation with transformers' cache on converted models: cache == no cache, chunked prefill, left padding."""

import pytest
import torch
from transformers import DynamicCache

import aha
import aha.kernels
from aha.hf.testing import TINY, tiny_model
from aha.kernels.dispatch import PRIORITY

WINDOW = 5
PROMPT = 12
NEW = 14  # prompt + new tokens span several windows


def tokens(batch: int = 1, seq: int = PROMPT, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def routed_model(family: str = "llama", sink: int = 0):
    return aha.convert(tiny_model(family), window=WINDOW, sink=sink, router_init="random")


def generate(model, ids, **kwargs):
    settings = {"max_new_tokens": NEW, "min_new_tokens": NEW, "do_sample": False, "return_dict_in_generate": True, "output_logits": True}
    return model.generate(ids, **(settings | kwargs))


@pytest.mark.parametrize("family", ["llama", "qwen2", "olmo2"])
@pytest.mark.parametrize("route", [None, "local"])
@pytest.mark.parametrize("sink", [0, 2])
def test_greedy_generation_with_cache_equals_generation_without(family, route, sink):
    model = routed_model(family, sink)
    ids = tokens()
    with aha.force_routing(model, route):
        cached = generate(model, ids)
        uncached = generate(model, ids, use_cache=False)
    assert cached.sequences.shape == (1, PROMPT + NEW)
    assert cached.sequences.tolist() == uncached.sequences.tolist()
    torch.testing.assert_close(torch.stack(cached.logits), torch.stack(uncached.logits), rtol=1e-4, atol=1e-5)


def test_sampling_generation_with_cache_equals_generation_without():
    model = routed_model()
    ids = tokens()
    torch.manual_seed(3)
    cached = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, top_k=20)
    torch.manual_seed(3)
    uncached = model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=True, top_k=20, use_cache=False)
    assert cached.tolist() == uncached.tolist()


def test_decoding_runs_through_the_decode_path(monkeypatch):
    """Generation steps reach the dispatcher as decode steps (one query against the whole cache) and
    run on an implementation of the device's decode priority list."""
    calls = []
    select = aha.kernels.select

    def spy(inputs, impl="auto"):
        chosen = select(inputs, impl)
        if inputs.decode_step:
            calls.append((inputs.k.shape[2], chosen.name))
        return chosen

    monkeypatch.setattr(aha.kernels, "select", spy)
    model = routed_model()
    model.generate(tokens(), max_new_tokens=3, min_new_tokens=3, do_sample=False)
    layers = TINY["num_hidden_layers"]
    assert [length for length, _ in calls] == [PROMPT + step for step in (1, 2) for _ in range(layers)]
    assert {name for _, name in calls} <= set(PRIORITY["cpu", "decode"])


def test_chunked_prefill_equals_one_shot_prefill():
    model = routed_model("qwen3")
    ids = tokens(batch=2, seq=30)
    with torch.no_grad():
        one_shot = model(ids).logits
        cache = DynamicCache(config=model.config)
        chunks = [model(ids[:, start:stop], cache=cache, use_cache=True).logits for start, stop in ((0, 9), (9, 10), (10, 23), (23, 30))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), one_shot, rtol=1e-4, atol=1e-5)


def test_batched_generation_with_left_padding_equals_one_prompt_at_a_time():
    model = routed_model()
    prompts = [tokens(seq=PROMPT, seed=4)[0], tokens(seq=PROMPT - 5, seed=5)[0]]
    batch = torch.full((2, PROMPT), TINY["pad_token_id"])
    mask = torch.zeros(2, PROMPT, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        batch[row, PROMPT - len(prompt) :] = prompt
        mask[row, PROMPT - len(prompt) :] = 1
    together = generate(model, batch, attention_mask=mask).sequences[:, PROMPT:]
    alone = [generate(model, prompt[None]).sequences[0, len(prompt) :] for prompt in prompts]
    assert together.tolist() == [item.tolist() for item in alone]


def test_track_routing_during_generation_counts_every_position_once():
    model = routed_model()
    with aha.track_routing(model) as stats:
        model.generate(tokens(), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    positions = PROMPT + NEW - 1  # the last generated token is never fed back
    heads, layers = TINY["num_attention_heads"], TINY["num_hidden_layers"]
    assert stats.position_total.tolist() == [heads * layers] * positions
    assert stats.total_pairs.sum() == positions * heads * layers
    assert 0.0 < stats.global_fraction < 1.0


def test_the_padding_layout_is_read_once_per_forward_and_shared_by_every_layer(monkeypatch):
    """The mask builder reads the padding once; no layer reads mask values again."""
    reads = []
    of = aha.kernels.KeyPadding.of.__func__

    def counting(cls, mask):
        if mask is not None and not isinstance(mask, cls):
            reads.append(mask.shape)
        return of(cls, mask)

    monkeypatch.setattr(aha.kernels.KeyPadding, "of", classmethod(counting))
    model = routed_model()
    ids = tokens(batch=2)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert len(reads) == 1
