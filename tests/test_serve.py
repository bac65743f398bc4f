"""``aha serve``: OpenAI-compatible answers equal ``model.generate``, under concurrency and continuous
batching; bad requests, disconnects and SIGTERM are handled; ``/metrics`` counts the routes.

Servers run as ``aha serve`` subprocesses on loopback ports, on a tiny routed model (window 4, one
sink key, random routers: about half the (token, head) pairs local) with SmolLM2's tokenizer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import pytest
import torch
from transformers import AutoTokenizer, GenerationConfig

import aha
from aha.hf.testing import tiny_model
from aha.models import smollm2_path
from aha.serving.checks import request_problem
from aha.serving.process import ServerProcess, running_server

CONTEXT = 256
PROMPTS = [
    "Once upon a time",
    "The capital of France is Paris, and the capital of Italy is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "In 1969 the first humans landed on the",
]


def _save_tiny_served_model(folder: Path, context: int) -> Path:
    """A tiny routed Llama (window 4, sink 1, random routers) of ``context`` positions, saved with SmolLM2's tokenizer.

    Its end-of-text logit is always 0 while the largest of the other random logits is far above
    it, so greedy answers run to ``max_tokens`` on every CPU: how long a request stays in flight
    does not ride on where one CPU's rounding happens to produce end-of-text.
    """
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    model = tiny_model(
        "llama", vocab_size=len(tokenizer), max_position_embeddings=context, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    with torch.no_grad():
        model.get_output_embeddings().weight[tokenizer.eos_token_id] = 0
    aha.convert(model, window=4, sink=1, router_init="random")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_tiny_served_model(tmp_path_factory.mktemp("served") / "tiny", CONTEXT)


def _client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def sequential_server(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_server(str(tiny_folder), log=tmp_path_factory.mktemp("logs") / "serve.log") as server:
        yield server


@pytest.fixture(scope="module")
def batching_server(tiny_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("logs") / "serve-cb.log"
    with running_server(str(tiny_folder), "--continuous-batching", "--kv-cache-tokens", "4096", log=log) as server:
        yield server


@pytest.fixture(scope="module")
def reference(tiny_folder: Path):
    """Greedy ``model.generate`` answers of the tiny model, as text: ``reference(prompt, max_tokens, chat)``."""
    model, tokenizer = aha.load_model(tiny_folder)
    config = GenerationConfig(do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def answer(prompt: str, max_tokens: int, chat: bool = False) -> str:
        if chat:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
        else:
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            generated = model.generate(ids, generation_config=config, max_new_tokens=max_tokens)
        return tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)

    return answer


def _complete(server: ServerProcess, prompt: str, max_tokens: int, *, chat: bool = False, stream: bool = False) -> str:
    client = _client(server)
    if chat:
        messages = [{"role": "user", "content": prompt}]
        response = client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=max_tokens, temperature=0, stream=stream
        )
        if stream:
            return "".join(chunk.choices[0].delta.content or "" for chunk in response if chunk.choices)
        return response.choices[0].message.content
    response = client.completions.create(
        model=server.model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=stream
    )
    if stream:
        return "".join(chunk.choices[0].text for chunk in response if chunk.choices)
    return response.choices[0].text


@pytest.mark.slow
@pytest.mark.parametrize("chat", [False, True], ids=["completion", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_served_answers_equal_generate(sequential_server: ServerProcess, reference, chat: bool, stream: bool) -> None:
    for prompt in PROMPTS[:2]:
        assert _complete(sequential_server, prompt, 12, chat=chat, stream=stream) == reference(prompt, 12, chat)


@pytest.mark.slow
@pytest.mark.parametrize("batching", [False, True], ids=["sequential", "continuous-batching"])
def test_concurrent_answers_equal_generate(request: pytest.FixtureRequest, reference, batching: bool) -> None:
    server = request.getfixturevalue("batching_server" if batching else "sequential_server")
    jobs = [(prompt, 8 + 4 * index, index % 2 == 1) for index, prompt in enumerate(PROMPTS * 2)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda job: _complete(server, job[0], job[1], chat=job[2], stream=job[1] % 8 == 0), jobs))
    assert answers == [reference(prompt, max_tokens, chat) for prompt, max_tokens, chat in jobs]


@pytest.mark.slow
@pytest.mark.parametrize("batching", [False, True], ids=["sequential", "continuous-batching"])
def test_metrics_count_routes_and_requests(request: pytest.FixtureRequest, batching: bool) -> None:
    server = request.getfixturevalue("batching_server" if batching else "sequential_server")
    before = server.metrics()
    _complete(server, PROMPTS[2], 16)
    deadline = time.monotonic() + 20  # continuous batching reports routes every 5 s
    while time.monotonic() < deadline:
        after = server.metrics()
        if after.get('aha_route_decisions_total{route="global"}', 0) > before.get('aha_route_decisions_total{route="global"}', 0):
            break
        time.sleep(1)
    assert after["aha_requests_total"] == before.get("aha_requests_total", 0) + 1
    assert after["aha_generated_tokens_total"] - before.get("aha_generated_tokens_total", 0) == 16
    assert after['aha_route_decisions_total{route="local"}'] > before.get('aha_route_decisions_total{route="local"}', 0)
    assert 0 < after["aha_global_fraction"] < 1  # random routers: about half the pairs go global
    assert 0 < after["aha_attention_compute_ratio"] < 1
    assert after["aha_requests_in_flight"] == 0


@pytest.mark.slow
def test_bad_requests_get_clear_errors_and_the_server_goes_on(sequential_server: ServerProcess) -> None:
    url, model = f"{sequential_server.url}/v1/completions", sequential_server.model
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        (json.dumps({"model": "other", "prompt": "x"}).encode(), 404, "serves the model"),
        (json.dumps({"model": model, "prompt": "x", "max_tokens": -3}).encode(), 400, ">= 1"),
        (json.dumps({"model": model, "prompt": "x", "max_tokens": 10**9}).encode(), 400, "context of 256"),
        (json.dumps({"model": model, "prompt": "word " * (CONTEXT + 20), "max_tokens": 4}).encode(), 400, "at most 256"),
    ]
    for body, status, message in cases:
        response = httpx2.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code == status, response.text
        assert message in response.text
    assert _complete(sequential_server, PROMPTS[0], 4)  # still serving


@pytest.mark.slow
def test_a_client_leaving_mid_stream_frees_its_slot(sequential_server: ServerProcess) -> None:
    body = {"model": sequential_server.model, "prompt": PROMPTS[1], "max_tokens": 200, "stream": True}
    with httpx2.stream("POST", f"{sequential_server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first event, then hang up
    start = time.monotonic()
    assert _complete(sequential_server, PROMPTS[0], 4)
    assert time.monotonic() - start < 30
    assert sequential_server.metrics()["aha_requests_in_flight"] == 0


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight(tmp_path: Path) -> None:
    # 3000 tokens to generate (seconds on any CPU): still in flight when uvicorn starts its drain
    folder = _save_tiny_served_model(tmp_path / "tiny", context=4096)
    with running_server(str(folder), log=tmp_path / "serve.log") as server:
        stream = _client(server).completions.create(
            model=server.model, prompt=PROMPTS[1], max_tokens=3000, temperature=0, stream=True
        )
        next(stream)  # generation has started: the request is in flight
        server.process.send_signal(signal.SIGTERM)
        last = [chunk for chunk in stream if chunk.choices][-1]
        assert last.choices[0].finish_reason == "length"  # answered in full, not cut off
        assert server.process.wait(60) == 0
    assert "Waiting for connections to close" in (tmp_path / "serve.log").read_text()


def test_request_problems_name_the_fix() -> None:
    assert request_problem(b'{"model": "m", "max_tokens": 5}', "m", 256) is None
    assert request_problem(b'{"max_tokens": true}', "m", 256)[0] == 400
    assert request_problem(b'{"max_completion_tokens": 2.5}', "m", 256)[0] == 400
    assert request_problem(b'{"max_tokens": 255}', "m", None) is None
    status, message = request_problem(b'{"model": "x"}', "m", 256)
    assert status == 404 and "'m'" in message


def test_serve_settings_refuse_bad_flags() -> None:
    from aha.serving import ServeSettings

    with pytest.raises(ValueError, match="--window must be >= 1"):
        ServeSettings(window=0)
    with pytest.raises(ValueError, match="drop --window"):
        ServeSettings(window=64, dense=True)
    with pytest.raises(ValueError, match="--port"):
        ServeSettings(port=70000)
    with pytest.raises(ValueError, match="--kv-cache-tokens sizes the cache of --continuous-batching"):
        ServeSettings(kv_cache_tokens=4096)
    with pytest.raises(ValueError, match="--kv-cache-tokens"):
        ServeSettings(kv_cache_tokens=0, continuous_batching=True)


@pytest.mark.slow
def test_serve_benchmark_group_measures_both_servers(tiny_folder: Path) -> None:
    from aha.benchmarking import BenchConfig, run_benchmarks

    config = dataclasses.replace(BenchConfig.quick_config(), model=str(tiny_folder), serve_rounds=2)
    report = run_benchmarks(config, ["serve"])
    rows = report["groups"]["serve"][0]["rows"]
    assert [(row["prompt_len"], row["clients"]) for row in rows] == [(128, 1), (128, 2)]
    for row in rows:  # the sdpa server is aha serve --dense: the same weights, unrouted
        for name in ("aha", "sdpa"):
            assert 0 < row[f"{name}_generated"] <= 8 * row["clients"]
            assert row[f"{name}_p50_s"] <= row[f"{name}_p99_s"]
        assert 0 < row["global_fraction"] < 1
        assert row["rounds"] == 2 and row["speedup_min"] <= row["speedup"] <= row["speedup_max"]


@pytest.mark.real_model
@pytest.mark.slow
def test_smollm2_answers_an_openai_client(tmp_path: Path) -> None:
    model, tokenizer = aha.load_smollm2()
    aha.convert(model, window=64, sink=1).eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        generated = model.generate(ids, do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True)
    with running_server("smollm2-135m", "--window", "64", "--sink", "1", log=tmp_path / "serve.log") as server:
        response = _client(server).chat.completions.create(
            model="smollm2-135m", messages=messages, max_tokens=12, temperature=0
        )
        assert [entry.id for entry in _client(server).models.list()] == ["smollm2-135m"]
    assert response.choices[0].message.content == expected
    assert "Paris" in expected


@pytest.mark.parametrize("padded", [False, True])
def test_route_tally_counts_as_routing_stats_do(padded: bool) -> None:
    from aha.serving.telemetry import RouteTally
    from aha.stats import RoutingStats

    generator = torch.Generator().manual_seed(0)
    stats, tally = RoutingStats(window=8, num_layers=1, num_heads=4, sink=1), RouteTally(8, 1)
    valid = torch.tensor([[False] * 3 + [True] * 17, [True] * 20]) if padded else None
    calls = [(0, 20, valid), (20, 1, None), (21, 1, None)] if padded else [(0, 20, None), (20, 1, None), (21, 1, None)]
    for first, seq, mask in calls:
        route = torch.rand(2, 4, seq, generator=generator) > 0.5
        stats.update(0, route, first, mask)
        tally.add(route, first, mask)
    assert tally.global_fraction == pytest.approx(stats.global_fraction)
    assert (tally.computed_scores, tally.full_scores) == (stats.computed_scores, stats.full_scores)
