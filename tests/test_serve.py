"""``aha serve``: OpenAI-compatible answers equal ``model.generate``, under concurrency and continuous
batching; bad requests, disconnects and SIGTERM are handled; requests stay within the limits; only the
documented endpoints answer, same-origin and with the API key; a dead model's process is restarted;
``/metrics`` counts the routes.

Servers run as ``aha serve`` subprocesses on loopback ports, on a tiny routed model (window 4, one
sink key, random routers: about half the (token, head) pairs local) with SmolLM2's tokenizer.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import openai
import psutil
import pytest
import torch
from transformers import AutoTokenizer, ContinuousBatchingConfig, GenerationConfig

import aha
from aha.hf.testing import tiny_model
from aha.models import smollm2_path
from aha.serving.access import access_problem, exposure_warning
from aha.serving.checks import MAX_STOP_STRINGS, RequestRules, TokenLimit, request_problem
from aha.serving.engine import batching_problem, bound_answer
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
        (json.dumps({"model": model, "prompt": "x", "max_tokens": 10**9}).encode(), 400, "limit of 256 tokens per request"),
        (json.dumps({"model": model, "prompt": "word " * (CONTEXT + 20), "max_tokens": 4}).encode(), 400, "at most 256"),
        (json.dumps({"prompt": "", "max_tokens": 3}).encode(), 400, "prompt must be a non-empty string"),
        (json.dumps({"max_tokens": 3}).encode(), 400, "prompt must be a non-empty string"),
        (b'{"prompt": "x", "temperature": NaN}', 400, "temperature must be a number"),
        (json.dumps({"prompt": "x", "top_p": 2}).encode(), 400, "top_p must be a number"),
        (json.dumps({"prompt": "x", "stop": ["a"] * 1000}).encode(), 400, f"at most {MAX_STOP_STRINGS}"),
        (json.dumps({"prompt": "x", "generation_config": "[1]"}).encode(), 400, "JSON object"),
        (json.dumps({"prompt": "x", "generation_config": json.dumps({"max_new_tokens": 2000})}).encode(), 400, "limit of 256"),
        (json.dumps({"prompt": "x", "generation_config": json.dumps({"max_length": 1500})}).encode(), 400, "limit of 256"),
        (json.dumps({"prompt": "x", "generation_config": json.dumps({"do_sample": True, "top_p": math.nan})}).encode(), 400, "top_p"),
        # 1 + 100 * 1 tokens of prompt: with 200 new ones, past the 256 the tiny model takes
        (json.dumps({"prompt": "hello " * 100, "max_tokens": 200}).encode(), 400, "ask for at most"),
        (json.dumps({"prompt": "hello " * 100, "max_tokens": 200, "stream": True}).encode(), 400, "ask for at most"),
    ]
    chat_url = f"{sequential_server.url}/v1/chat/completions"
    chat_cases = [
        ({"max_tokens": 3}, "messages must be a non-empty list"),
        ({"messages": "hello", "max_tokens": 3}, "messages must be a non-empty list"),
        ({"messages": [], "max_tokens": 3}, "messages must be a non-empty list"),
        ({"messages": [{"role": "user", "content": 5}], "max_tokens": 3}, "content must be a string"),
        ({"messages": [{"content": "hi"}], "max_tokens": 3}, "string role"),
        ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"chat_template": "{{ 'PWNED' }}"}},
         "--allow-request-chat-template"),
        ({"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"tokenize": False}}, "template variables"),
    ]
    requests = [(url, body) for body, _, _ in cases] + [(chat_url, json.dumps(body).encode()) for body, _ in chat_cases]
    expected = [(status, message) for _, status, message in cases] + [(400, message) for _, message in chat_cases]
    for (target, body), (status, message) in zip(requests, expected, strict=True):
        response = httpx2.post(target, content=body, headers={"content-type": "application/json"}, timeout=60)
        assert (response.status_code, message in response.text) == (status, True), (body, response.text)
    assert _complete(sequential_server, PROMPTS[0], 4)  # still serving
    assert sequential_server.metrics()["aha_model_process_up"] == 1


@pytest.mark.slow
@pytest.mark.parametrize("batching", [False, True], ids=["sequential", "continuous-batching"])
def test_answers_without_a_length_fill_the_context_and_no_more(request: pytest.FixtureRequest, batching: bool) -> None:
    server = request.getfixturevalue("batching_server" if batching else "sequential_server")
    client = _client(server)
    answer = client.completions.create(model=server.model, prompt="hi", temperature=0)
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens == CONTEXT  # the tiny model never ends early
    assert answer.choices[0].finish_reason == "length"
    answer = client.completions.create(
        model=server.model, prompt="hi", extra_body={"generation_config": json.dumps({"max_length": 10})}
    )
    assert answer.usage.prompt_tokens + answer.usage.completion_tokens == 10


@pytest.mark.slow
def test_oversized_bodies_get_a_413_naming_the_limit(sequential_server: ServerProcess) -> None:
    url = f"{sequential_server.url}/v1/completions"
    body = b"x" * (16 * 2**20 + 1)
    declared = httpx2.post(url, content=body, headers={"content-type": "application/json"}, timeout=60)
    chunked = httpx2.post(url, content=(body[i : i + 2**20] for i in range(0, len(body), 2**20)), timeout=60)
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert "16 MiB" in response.text and "--max-request-mb" in response.text
    assert _complete(sequential_server, PROMPTS[0], 4)


@pytest.mark.slow
def test_only_documented_endpoints_answer_and_only_same_origin_posts(sequential_server: ServerProcess) -> None:
    url = sequential_server.url
    for path in ("/reset", "/load_model", "/v1/responses", "/v1/systemone", "/v1/audio/transcriptions"):
        assert httpx2.post(f"{url}{path}", json={"model": sequential_server.model}, timeout=30).status_code == 404, path
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx2.get(f"{url}{path}", timeout=30).status_code == 404, path
    body = {"prompt": PROMPTS[0], "max_tokens": 2}
    form_post = httpx2.post(f"{url}/v1/completions", content=json.dumps(body), timeout=60,
                            headers={"origin": "https://evil.example", "content-type": "text/plain"})  # fmt: skip
    assert form_post.status_code == 403 and "cross-origin" in form_post.text
    own_origin = httpx2.post(f"{url}/v1/completions", json=body, headers={"origin": url}, timeout=60)
    assert own_origin.status_code == 200, own_origin.text
    assert httpx2.get(f"{url}/health", timeout=30).json() == {"status": "ok"}


@pytest.mark.slow
def test_a_client_leaving_mid_stream_frees_its_slot(sequential_server: ServerProcess) -> None:
    aborted = sequential_server.metrics().get("aha_requests_aborted_total", 0)
    body = {"model": sequential_server.model, "prompt": PROMPTS[1], "max_tokens": 200, "stream": True}
    with httpx2.stream("POST", f"{sequential_server.url}/v1/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        next(response.iter_lines())  # the first event, then hang up
    start = time.monotonic()
    assert _complete(sequential_server, PROMPTS[0], 4)
    assert time.monotonic() - start < 30
    metrics = sequential_server.metrics()
    assert metrics["aha_requests_in_flight"] == 0
    assert metrics["aha_requests_aborted_total"] == aborted + 1


@pytest.mark.slow
def test_a_cache_smaller_than_a_request_limits_requests_instead_of_stopping_the_worker(tmp_path: Path) -> None:
    # 1024 positions, a paged cache of one 256-token page: a full-length request does not fit
    folder = _save_tiny_served_model(tmp_path / "tiny", context=1024)
    log = tmp_path / "serve.log"
    with running_server(str(folder), "--continuous-batching", "--kv-cache-tokens", "256", log=log) as server:
        assert "requests are limited to 256 tokens" in server.log_tail()
        url, client = f"{server.url}/v1/completions", _client(server)
        unbounded = client.completions.create(model=server.model, prompt=PROMPTS[0])  # no max_tokens: fills the cache
        assert unbounded.usage.prompt_tokens + unbounded.usage.completion_tokens == 256
        too_long = httpx2.post(url, json={"prompt": "hello " * 100, "max_tokens": 200}, timeout=60)
        assert too_long.status_code == 400 and "--kv-cache-tokens" in too_long.text, too_long.text
        for body, message in [
            ({"prompt": "", "max_tokens": 3}, "non-empty"),
            ({"prompt": "x", "max_tokens": 3, "generation_config": json.dumps({"do_sample": True})}, "cannot turn sampling on"),
            ({"prompt": "x", "max_tokens": 3, "stop": ["\n"]}, "does not apply stop"),
        ]:
            response = httpx2.post(url, json=body, timeout=60)
            assert response.status_code == 400 and message in response.text, response.text
        assert httpx2.get(f"{server.url}/health", timeout=30).status_code == 200
        assert _complete(server, PROMPTS[1], 6)  # the batching worker still runs


def _model_process(server: ServerProcess) -> psutil.Process:
    """The model's process of a server (its spawned child that is not multiprocessing's resource tracker)."""
    children = [child for child in psutil.Process(server.process.pid).children() if "resource_tracker" not in " ".join(child.cmdline())]
    assert len(children) == 1, [child.cmdline() for child in children]
    return children[0]


def _wait_for(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


@pytest.mark.slow
def test_a_dead_model_process_is_restarted_then_the_server_stops(tiny_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AHA_API_KEY", "the-key")
    server = ServerProcess(str(tiny_folder), "--max-restarts", "1", log=tmp_path / "serve.log")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="the-key", max_retries=0, timeout=120)
        headers = {"authorization": "Bearer the-key"}
        refused = httpx2.post(f"{server.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
        assert refused.status_code == 401 and "Authorization: Bearer" in refused.text
        assert client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=3).choices[0].text
        _model_process(server).kill()
        _wait_for(lambda: httpx2.get(f"{server.url}/health", timeout=30).status_code == 503)
        _wait_for(lambda: httpx2.get(f"{server.url}/health", timeout=30).status_code == 200)
        assert client.completions.create(model=server.model, prompt=PROMPTS[0], max_tokens=3).choices[0].text
        metrics = httpx2.get(f"{server.url}/metrics", headers=headers, timeout=30).text
        assert "aha_model_process_restarts_total 1.0" in metrics and "aha_model_process_up 1.0" in metrics
        _model_process(server).kill()
        assert server.process.wait(120) == 1  # restarted once already: the server stops, for its supervisor
        log = server.log_tail(20000)
        assert "restarting the model's process (restart 1 of at most 1)" in log
        assert "restarted 1 times already (--max-restarts 1): stopping the server" in log
    finally:
        server.stop()


def test_the_cpu_kernel_is_prepared_while_the_model_loads(
    tiny_folder: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from aha.kernels import cpu_tuning
    from aha.serving import loader as loading

    prepared = []
    monkeypatch.setattr(cpu_tuning, "kernel_choice", lambda dtype: prepared.append(dtype))
    monkeypatch.setattr(loading, "configure_logging", lambda level: None)  # the model's process's own log set-up
    with caplog.at_level("INFO", logger="aha.serve"):
        loading.AhaModelLoader(window=None, sink=None, dense=False, dtype="float32", device="cpu")._load_model(str(tiny_folder))
    assert prepared == [torch.float32]
    assert "CPU attention kernel for torch.float32 ready in" in caplog.text
    loading.AhaModelLoader(window=None, sink=None, dense=True, dtype="float32", device="cpu")._load_model(str(tiny_folder))
    assert prepared == [torch.float32]  # SDPA runs no aha kernel


@pytest.mark.slow
def test_sigterm_drains_requests_in_flight(tmp_path: Path) -> None:
    # 3000 tokens to generate (seconds on any CPU): still in flight when uvicorn starts its drain
    folder = _save_tiny_served_model(tmp_path / "tiny", context=4096)
    # a drain as long as the answer takes, however busy the machine: what is checked is that it is answered in full
    with running_server(str(folder), "--graceful-shutdown-seconds", "600", log=tmp_path / "serve.log") as server:
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
    rules = RequestRules("m", TokenLimit(256, "the model's context"), template_parameters=frozenset({"chat_template", "tokenize"}))
    unlimited = dataclasses.replace(rules, token_limit=None)
    chat = "/v1/chat/completions"

    def problem(body: dict | bytes, path: str = "/v1/completions", within: RequestRules = rules) -> tuple[int, str] | None:
        if isinstance(body, dict):
            body = json.dumps({"prompt": "x", **body} if path == "/v1/completions" else body).encode()
        return request_problem(path, body, within)

    assert problem({"model": "m", "max_tokens": 5}) is None
    assert problem({"max_tokens": True})[0] == 400
    assert problem({"max_completion_tokens": 2.5})[0] == 400
    assert problem({"max_tokens": 255}, within=unlimited) is None
    status, message = problem({"model": "x"})
    assert status == 404 and "'m'" in message
    assert problem({"prompt": ""}) == (400, "prompt must be a non-empty string, got ''")
    assert problem({"prompt": ["x"]})[0] == 400
    for value in (-0.5, 2.5, math.inf, math.nan, "hot", True):
        assert "temperature must be a number from 0 to 2" in problem({"temperature": value})[1], value
    for value in (-0.5, 1.5, math.inf, math.nan, "high", True):
        assert "top_p must be a number from 0 to 1" in problem({"top_p": value})[1], value
    assert problem({"temperature": 0, "top_p": 1}) is None
    assert "n must be 1" in problem({"n": 5})[1]
    assert problem({"stop": "\n"}) is None and problem({"stop": ["a", "b"]}) is None
    assert "at most 4" in problem({"stop": ["a"] * 5})[1]
    assert "at most 64 characters" in problem({"stop": ["a" * 65]})[1]
    assert "non-empty string" in problem({"stop": [""]})[1]
    assert "JSON object" in problem({"generation_config": "[1]"})[1]
    assert "string holding a JSON object" in problem({"generation_config": {"max_new_tokens": 3}})[1]
    assert "limit of 256" in problem({"generation_config": json.dumps({"max_new_tokens": 256})})[1]
    assert "limit of 256" in problem({"generation_config": json.dumps({"max_length": 257})})[1]
    assert problem({"generation_config": json.dumps({"max_length": 256, "do_sample": True, "top_k": 5})}) is None
    assert "top_p" in problem({"generation_config": json.dumps({"top_p": math.nan})})[1]
    assert "top_k must be a whole number >= 0" in problem({"generation_config": json.dumps({"top_k": -5})})[1]
    assert "at most 4" in problem({"generation_config": json.dumps({"stop_strings": ["a"] * 9})})[1]
    hello = [{"role": "user", "content": "hello"}]
    assert problem({"messages": hello}, chat) is None
    assert problem({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}, chat) is None
    assert problem({"messages": [{"role": "assistant", "content": None}]}, chat) is None
    for messages in (None, "hello", [], ["hello"], [{"role": 1, "content": "x"}], [{"role": "user", "content": 5}],
                     [{"role": "user", "content": [{"type": "text", "text": 5}]}], [{"role": "user", "content": [3]}]):  # fmt: skip
        assert problem({"messages": messages}, chat)[0] == 400, messages
    template = {"chat_template": "{{ 'PWNED' }}"}
    assert "--allow-request-chat-template" in problem({"messages": hello, "chat_template_kwargs": template}, chat)[1]
    allowed = dataclasses.replace(rules, allow_chat_template=True)
    assert problem({"messages": hello, "chat_template_kwargs": template}, chat, allowed) is None
    assert "not tokenize" in problem({"messages": hello, "chat_template_kwargs": {"tokenize": False}}, chat)[1]
    assert problem({"messages": hello, "chat_template_kwargs": {"enable_thinking": False}}, chat) is None
    assert "template variables" in problem({"messages": hello, "chat_template_kwargs": "x"}, chat)[1]


def test_answers_are_bounded_by_prompt_plus_answer() -> None:
    limit = TokenLimit(256, "--max-model-len")

    def bounded(prompt: int, **kwargs) -> int:
        settings = {"max_new_tokens": None, **kwargs}
        bound_answer(prompt, settings, limit)
        assert "max_length" not in settings
        return settings["max_new_tokens"]

    assert bounded(31) == 225  # no length asked: the room left
    assert bounded(31, max_new_tokens=225) == 225
    assert bounded(31, max_length=100) == 69
    assert bounded(31, max_new_tokens=10, max_length=100) == 10
    for kwargs, message in [({"max_new_tokens": 226}, "ask for at most 225"), ({"max_length": 31}, "leaves no room")]:
        with pytest.raises(ValueError, match=message):
            bounded(31, **kwargs)
    with pytest.raises(ValueError, match=r"requests hold at most 256, prompt and answer \(--max-model-len\)"):
        bounded(256)
    with pytest.raises(ValueError, match="the prompt is empty"):
        bounded(0)
    settings = {"max_new_tokens": None}
    bound_answer(5, settings, None)
    assert settings["max_new_tokens"] >= 1


def test_continuous_batching_refuses_settings_it_would_ignore() -> None:
    greedy = GenerationConfig(do_sample=False)
    sampling = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=50)

    def settings(config: GenerationConfig, **changes) -> dict:
        base = {name: getattr(config, name) for name in ("max_new_tokens", "eos_token_id", "do_sample", "temperature", "top_k", "top_p")}
        return {**base, **changes}

    assert batching_problem(settings(greedy), greedy) is None
    assert batching_problem(settings(greedy, temperature=0.5, seed=3), greedy) is None  # greedy either way, as generate
    assert "cannot turn sampling on" in batching_problem(settings(greedy, do_sample=True, temperature=0.8), greedy)
    assert "does not apply stop" in batching_problem(settings(greedy, stop_strings=["x"]), greedy)
    assert "frequency_penalty" in batching_problem(settings(greedy, repetition_penalty=1.3), greedy)
    assert batching_problem(settings(greedy, repetition_penalty=1.0, stop_strings=[]), greedy) is None  # no-op values
    assert "generation_config num_beams" in batching_problem(settings(greedy, num_beams=4), greedy)
    assert batching_problem(settings(sampling, temperature=1.2, top_p=0.5, top_k=10), sampling) is None
    assert batching_problem(settings(sampling, temperature=0), sampling) is None  # greedy through top_k 1
    no_top_p = GenerationConfig(do_sample=True, temperature=0.7)
    assert "sets top_p per request only" in batching_problem(settings(no_top_p, top_p=0.5), no_top_p)
    no_top_k = GenerationConfig(do_sample=True, temperature=0.7, top_k=0)
    assert "sets top_k per request only" in batching_problem(settings(no_top_k, temperature=0), no_top_k)


def test_per_request_sampling_is_what_the_batching_manager_takes() -> None:
    from aha.serving.engine import per_request_sampling

    model = aha.convert(tiny_model("llama"), window=4, sink=1).eval()
    for config in (GenerationConfig(do_sample=False, temperature=0.7), GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9),
                   GenerationConfig(do_sample=True, temperature=0.7, top_k=0), GenerationConfig(do_sample=True, top_k=50),
                   GenerationConfig(do_sample=True)):  # fmt: skip
        manager = model.init_continuous_batching(
            generation_config=config, continuous_batching_config=ContinuousBatchingConfig(num_blocks=1, per_request_processors=True)
        )
        assert per_request_sampling(config) == set(manager.logit_processor.supported_keys), config


def test_access_needs_the_api_key_and_the_servers_own_origin() -> None:
    from starlette.datastructures import Headers

    def problem(method: str, path: str, key: str | None, **headers: str) -> int | None:
        found = access_problem(method, path, Headers(headers={"host": "127.0.0.1:8000", **headers}), key)
        return None if found is None else found[0]

    assert problem("POST", "/v1/completions", None) is None
    assert problem("POST", "/v1/completions", "k", authorization="Bearer k") is None
    assert problem("POST", "/v1/completions", "k", authorization="bearer k") is None
    for header in ({}, {"authorization": "Bearer wrong"}, {"authorization": "k"}, {"authorization": "Basic k"}):
        assert problem("POST", "/v1/completions", "k", **header) == 401, header
    assert problem("GET", "/metrics", "k") == 401
    assert problem("GET", "/health", "k") is None
    assert problem("POST", "/v1/completions", None, origin="https://evil.example") == 403
    assert problem("POST", "/v1/completions", None, origin="null") == 403
    assert problem("POST", "/v1/completions", None, origin="http://127.0.0.1:9999") == 403
    assert problem("POST", "/v1/completions", None, origin="http://127.0.0.1:8000") is None
    assert problem("GET", "/v1/models", None, origin="https://evil.example") is None  # changes nothing, reads nothing cross-origin


def test_binding_beyond_loopback_without_a_key_is_warned_about() -> None:
    assert "AHA_API_KEY" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("my-host.example", None) is not None
    assert exposure_warning("0.0.0.0", "key") is None
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host, None) is None, host


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
    with pytest.raises(ValueError, match="--max-restarts must be >= 0"):
        ServeSettings(max_restarts=-1)
    with pytest.raises(ValueError, match="--max-request-mb must be > 0"):
        ServeSettings(max_request_mb=0)
    assert "secret" not in repr(ServeSettings(api_key="secret"))


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
