"""The vLLM plugin (aha/integrations/vllm) on vLLM's CPU build: run in .venv-vllm (``make test`` does).

The engines serve tiny AHA models (Llama, Qwen3, Qwen2; OLMo2 under tensor parallelism) whose converted layers
route all-global, all-local and at random (:func:`vllm_support.mixed_routes_model`), so one engine
checks the three route kinds and an unconverted layer; ``vllm serve`` gets a folder in the released
AHA-OLMO2 layout. Exactness: greedy tokens equal ``aha``'s own ``generate``, and vLLM's
log-probabilities (prompt and generated, top 5) equal ``aha``'s within ``LOGPROB_ATOL``.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytest.importorskip("vllm", reason="the vLLM plugin tests run in .venv-vllm (make vllm-venv)")

from vllm import LLM, SamplingParams
from vllm_support import (
    WORDS,
    greedy_reference,
    mixed_routes_model,
    prompts,
    released_aha_olmo2,
    save,
)

pytestmark = pytest.mark.vllm

#: fp32 everywhere; the kernels differ only in summation order
LOGPROB_ATOL = 1e-4
NEW_TOKENS = 12
#: 4 requests, prompts up to 100 tokens with a 64-token step budget: chunked prefill and mixed
#: prefill/decode steps; window 8 with sink 0 and 1
PROMPTS = prompts(4, (23, 100, 47, 9))
ENGINE = {"dtype": "float32", "max_model_len": 256, "kv_cache_memory_bytes": 64 << 20, "max_num_batched_tokens": 64, "max_num_seqs": 4}

CASES = {
    # case: (family, sink, router layout, compiled); compiled = vLLM's default mode (torch.compile of the whole model)
    "llama-sink0-separate-eager": ("llama", 0, "separate", False),  # the demo's layout
    "qwen3-sink1-separate-eager": ("qwen3", 1, "separate", False),  # QK-norm per head
    "qwen2-sink1-fused-compiled": ("qwen2", 1, "fused", True),  # q_proj with a bias: router rows in it too
}


@pytest.fixture(scope="module", params=list(CASES))
def served(request, tmp_path_factory):
    """(engine, the aha model it serves) for one case; the engine is shut down after the module."""
    family, sink, layout, compiled = CASES[request.param]
    model = mixed_routes_model(sink=sink, layout=layout, family=family)
    folder = save(model, tmp_path_factory.mktemp(request.param))
    llm = LLM(model=str(folder), enforce_eager=not compiled, **ENGINE)
    yield llm, model
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


def assert_matches_aha(llm: LLM, model) -> None:
    """Greedy tokens of :data:`PROMPTS` equal ``aha``'s ``generate``; prompt and step log-probabilities
    (vLLM's top 5) equal ``aha``'s within :data:`LOGPROB_ATOL`."""
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=5, prompt_logprobs=5)
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    for prompt, output in zip(PROMPTS, outputs):
        tokens, step_logprobs = greedy_reference(model, prompt, NEW_TOKENS)
        assert list(output.outputs[0].token_ids) == tokens
        with torch.no_grad():
            prompt_logprobs = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
        # vLLM's prompt_logprobs[i] scores prompt token i given the tokens before it (None for the first)
        expected = [(prompt_logprobs[i - 1], output.prompt_logprobs[i]) for i in range(1, len(prompt))]
        expected += list(zip(step_logprobs, output.outputs[0].logprobs))
        for reference, got in expected:
            for token, logprob in got.items():
                assert logprob.logprob == pytest.approx(reference[token].item(), abs=LOGPROB_ATOL)


def test_greedy_tokens_and_logprobs_equal_aha_generate(served):
    assert_matches_aha(*served)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism over 2 CPU workers needs 2 cores")
def test_tensor_parallel_2_olmo2_splits_routers_with_their_heads(tmp_path, monkeypatch):
    # each worker routes its own 2 of the 4 query heads with its shard of the (fused) router rows,
    # and gathers every head for OLMo2's QK-norm; on a single NUMA node vLLM's automatic thread
    # binding refuses 2 workers, so each gets one core
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    model = mixed_routes_model(sink=1, layout="fused", family="olmo2")
    llm = LLM(model=str(save(model, tmp_path)), enforce_eager=True, tensor_parallel_size=2, **ENGINE)
    try:
        assert_matches_aha(llm, model)
    finally:
        llm.llm_engine.engine_core.shutdown()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


def test_vllm_serve_answers_openai_requests_with_aha_tokens(tmp_path):
    # a folder in the released AHA-OLMO2 layout, served as it is
    folder = tmp_path / "model"
    model = released_aha_olmo2(folder)
    port = _free_port()
    command = [
        sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(folder), "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-bytes", str(64 << 20), "--enforce-eager",
    ]  # fmt: skip
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not start in 300 s"
                time.sleep(1)
        for prompt in PROMPTS[:2]:
            text = " ".join(WORDS[token] for token in prompt)
            answer = _post(
                f"http://127.0.0.1:{port}/v1/completions",
                {"model": str(folder), "prompt": text, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
            )
            tokens, _ = greedy_reference(model, prompt, NEW_TOKENS)
            assert answer["choices"][0]["text"].split() == [WORDS[token] for token in tokens]
    finally:
        server.terminate()
        server.wait(timeout=60)
        log.close()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device and vLLM's CUDA build")
def test_cuda_build_serves_the_same_tokens(tmp_path):
    # the same model class, backend and op on vLLM's CUDA build; the op loops over requests on the
    # host, so CUDA graphs stay off (enforce_eager)
    model = mixed_routes_model(sink=1, layout="fused")
    llm = LLM(model=str(save(model, tmp_path)), enforce_eager=True, **ENGINE)
    try:
        assert_matches_aha(llm, model)
    finally:
        llm.llm_engine.engine_core.shutdown()
