"""Continuous batching of AHA models: transformers' paged generation keeps the ``"aha"`` attention and
answers exactly as ``model.generate``; packed sequences run their own causal + window + sink attention."""

from __future__ import annotations

import time

import pytest
import torch
from transformers import ContinuousBatchingConfig, GenerationConfig

import aha
from aha.hf.attention import aha_attention_forward
from aha.hf.continuous_batching import AhaContinuousBatchingManager, needed_kv_pairs
from aha.hf.testing import tiny_model


def _routed_tiny():
    return aha.convert(tiny_model("llama"), window=4, sink=1, router_init="random").eval()


def _prompts(seed: int, lengths: tuple[int, ...]) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 128, (length,), generator=generator).tolist() for length in lengths]


def _small_cache(**settings) -> ContinuousBatchingConfig:
    """A paged cache of 8 pages of 256 tokens: room for every test's requests, and a few MB instead of
    a share of the machine's memory."""
    return ContinuousBatchingConfig(num_blocks=8, **settings)


def _greedy(max_new_tokens: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=2, pad_token_id=0)


def _generate_each(model, prompts, config) -> list[list[int]]:
    """``model.generate``'s new tokens for each prompt on its own: what batching must reproduce."""
    return [model.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist() for p in prompts]


def _in_request_order(outputs) -> list[list[int]]:
    """``generate_batch``'s answers in the order of its prompts (its keys end in ``_<index>``)."""
    return [outputs[key].generated_tokens for key in sorted(outputs, key=lambda key: int(key.rsplit("_", 1)[1]))]


def test_batched_generation_equals_generate_per_request() -> None:
    model = _routed_tiny()
    prompts = _prompts(0, (5, 17, 9, 30))
    config = _greedy(12)
    expected = _generate_each(model, prompts, config)
    with aha.track_routing(model) as stats:
        outputs = model.generate_batch(
            prompts, generation_config=config, continuous_batching_config=_small_cache(), progress_bar=False
        )
    answers = _in_request_order(outputs)
    assert answers == expected
    assert 0.2 < stats.global_fraction < 0.8  # the routes were used, not forced one way
    with aha.force_routing(model, "local"):
        local = model.generate_batch(prompts, generation_config=config, continuous_batching_config=_small_cache(), progress_bar=False)
    assert _in_request_order(local) != answers


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


def _answers_in_a_batch(model, prompts, config, batching):
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=batching)
    manager.start()
    try:
        ids = [manager.add_request(prompt) for prompt in prompts]
        results = {}
        while len(results) < len(ids):
            output = manager.get_result(timeout=30)
            assert output is not None, "continuous batching produced no result in 30 s"
            results[output.request_id] = output.generated_tokens
        return [results[request_id] for request_id in ids], manager.kv_reads
    finally:
        manager.stop(block=True)


def test_requests_the_cache_cannot_hold_are_refused_and_the_worker_goes_on() -> None:
    """An empty prompt, or one whose answer could outgrow the whole cache, would stop transformers' worker for good."""
    model = _routed_tiny()
    config = _greedy(4)
    manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=ContinuousBatchingConfig(num_blocks=1))
    manager.start()
    try:
        _wait_for_the_cache(manager)
        capacity = manager.batch_processor.cache.max_tokens_read
        with pytest.raises(ValueError, match="the prompt is empty"):
            manager.add_request([])
        with pytest.raises(ValueError, match=f"paged cache holds {capacity}"):
            manager.add_request(_prompts(1, (20,))[0], max_new_tokens=capacity)
        prompt = _prompts(2, (capacity - 4,))[0]  # exactly the cache: prompt and 4 new tokens
        request = manager.add_request(prompt)
        output = manager.get_result(request_id=request, timeout=60)
        assert output is not None and output.error is None and len(output.generated_tokens) == 4
    finally:
        manager.stop(block=True)


def _wait_for_the_cache(manager: AhaContinuousBatchingManager) -> None:
    """The worker thread builds the paged cache once started."""
    for _ in range(600):
        if manager.batch_processor is not None:
            return
        time.sleep(0.05)
    raise AssertionError("the batching worker built no cache in 30 s")


@pytest.mark.parametrize("forced", [None, "local"])
@pytest.mark.parametrize(
    ("seed", "lengths", "new_tokens", "batching"),
    [
        (3, (21, 6, 33), 10, _small_cache()),
        # 16 tokens per batch: the 40-token prompt is prefilled in chunks, new queries over a cached prefix
        (5, (40, 23, 7), 8, _small_cache(max_batch_tokens=16)),
    ],
)
def test_windowed_kv_reads_answer_as_generate(forced, seed, lengths, new_tokens, batching) -> None:
    model = _routed_tiny()
    prompts = _prompts(seed, lengths)
    config = _greedy(new_tokens)
    with aha.force_routing(model, forced):
        expected = _generate_each(model, prompts, config)
        answers, reads = _answers_in_a_batch(model, prompts, config, batching)
    assert answers == expected
    assert reads is not None and reads.pairs_full > 0
    if forced == "local":  # windows of 4 + 1 sink key out of prefixes of up to 48 keys
        assert reads.pairs_read < 0.5 * reads.pairs_full
    else:
        assert reads.pairs_read < reads.pairs_full  # some KV heads had only local query heads


def test_needed_pairs_are_the_keys_some_query_reads() -> None:
    cu_q, cu_k = torch.tensor([0, 1, 4, 5]), torch.tensor([0, 9, 12, 20])  # decode, a 3-token prefill, decode
    kv_heads, group = 2, 2
    route = torch.rand(kv_heads * group, 5, generator=torch.Generator().manual_seed(0)) > 0.7
    needed = needed_kv_pairs(route, cu_q, cu_k, kv_heads, window=4, sink=1)
    for request in range(3):
        q0, q1, k0, k1 = cu_q[request], cu_q[request + 1], cu_k[request], cu_k[request + 1]
        length = int(k1 - k0)
        for head in range(kv_heads):
            for position in range(length):
                read = False
                for query in range(int(q0), int(q1)):
                    p = length - int(q1 - query)
                    for q_head in range(head * group, (head + 1) * group):
                        if route[q_head, query]:
                            read |= position <= p
                        else:
                            read |= p - 4 < position <= p or position < 1
                assert bool(needed[int(k0) + position, head]) == read, (request, head, position)


def test_telemetry_credits_each_packed_request_its_own_routes(monkeypatch: pytest.MonkeyPatch) -> None:
    from aha.serving.telemetry import Telemetry

    model = _routed_tiny()
    Telemetry(model).install()
    finished = []
    monkeypatch.setattr(Telemetry, "finished", staticmethod(lambda prompt, generated, _seconds, routes: finished.append((prompt, generated, routes))))
    # 16 tokens per batch: prompts are prefilled in chunks, packed beside other requests' decode steps
    _answers_in_a_batch(model, _prompts(7, (21, 6, 33)), _greedy(6), _small_cache(max_batch_tokens=16))
    assert sorted(prompt for prompt, _, _ in finished) == [6, 21, 33]
    pairs_per_token = model.config.num_hidden_layers * model.config.num_attention_heads
    for prompt, generated, routes in finished:
        assert routes.pairs == pairs_per_token * (prompt + generated - 1)  # every token it fed, none of the others'
        assert routes.full_scores == pairs_per_token * sum(range(1, prompt + generated))
        assert 0 < routes.global_fraction < 1  # random routers


def test_each_layer_makes_one_route_per_step_under_batching(monkeypatch: pytest.MonkeyPatch) -> None:
    """The paged cache's K/V reads and the attention share the layer's route of the step (not one each)."""
    model = _routed_tiny()
    calls = {"routes": 0, "forwards": 0}
    make_route = aha.hf.projection.route_from_logits

    def counted(*args, **kwargs):
        calls["routes"] += 1
        return make_route(*args, **kwargs)

    monkeypatch.setattr(aha.hf.projection, "route_from_logits", counted)
    model.register_forward_hook(lambda *_: calls.__setitem__("forwards", calls["forwards"] + 1))
    config = _greedy(6)
    answers, reads = _answers_in_a_batch(model, _prompts(7, (12, 5)), config, _small_cache())
    assert reads is not None and reads.pairs_full > 0  # the K/V reads asked for routes too
    assert calls["forwards"] > 0 and calls["routes"] == calls["forwards"] * len(aha.hf.routers(model))
    assert answers == _generate_each(model, _prompts(7, (12, 5)), config)


def test_an_unsized_cache_on_cpu_takes_at_most_half_the_available_memory() -> None:
    import psutil

    from aha.hf.continuous_batching import _cpu_cache_config

    memory, rss = psutil.virtual_memory(), psutil.Process().memory_info().rss
    share = _cpu_cache_config(ContinuousBatchingConfig()).max_memory_percent
    assert share * (memory.total - rss) <= 0.5 * memory.available * 1.05  # transformers takes share x (total - rss)
    assert share * (memory.total - rss) >= 0.5 * memory.available * 0.95 or share == 0.9
    assert _cpu_cache_config(ContinuousBatchingConfig(num_blocks=8)).max_memory_percent is None  # sized by the caller
    assert _cpu_cache_config(ContinuousBatchingConfig(max_memory_percent=0.2)).max_memory_percent == 0.2
