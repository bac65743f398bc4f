"""The ``serve`` group of ``aha bench``: a bounded load test of ``aha serve`` over loopback.

Two servers of the same weights run side by side, the routed model (``aha``) and the dense
baseline (``--dense``: PyTorch SDPA), and each load point -- N concurrent clients, each sending
one prompt of P tokens and asking for ``serve_max_tokens`` tokens -- runs on one, then on the
other, after one short warm-up request to each (``--serve-rounds R``: R times on each, alternating
which goes first). A prompt longer than the model's context leaves room for is cut to fit (8192
tokens of context and 64 to generate: an "8K" prompt has 8112 tokens). The servers idle while the
other is measured (nothing else should run meanwhile).

What a row reports, so that its columns agree with each other:

* throughput: generated tokens over the point's wall time, per server and round; a round's
  speedup is its aha tokens/s over its sdpa tokens/s (the two servers run back to back, so drift
  hits both alike). The row shows the round of the median speedup (the lower middle one for an
  even count): its two tokens/s, their ratio as ``speedup``, and the smallest and largest
  speedup of all rounds;
* latency: each request's end-to-end time, in the same round, over the requests that generated
  the same number of tokens on both servers (``latency_requests`` of them). A model that ends an
  answer early finishes that request sooner, which would bias its latency; with several clients
  a request also waits for the others, whose lengths may still differ (sequential generation);
* ``aha_generated`` / ``sdpa_generated``: the tokens each server generated in that round.
A plain model is served converted at the first ``--window`` with ``--sink``: open routers, so
every head is global until trained; serve a trained AHA model folder to measure the gain.
"""

from __future__ import annotations

import concurrent.futures
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from aha.benchmarking import BenchConfig, Column, Section, register_group


def _prompts(tokenizer: Any, clients: int, tokens: int) -> list[str]:
    """``clients`` different texts of about ``tokens`` tokens (the passkey haystack, from different offsets)."""
    from aha.benchmarking.model import benchmark_tokens

    ids = benchmark_tokens(tokenizer, tokens + 97 * clients)[0]
    return [tokenizer.decode(ids[97 * client : 97 * client + tokens]) for client in range(clients)]


def _load_point(url: str, model: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    """All ``prompts`` at once, one client each; returns the throughput and, in the order of ``prompts``,
    each request's latency and token counts."""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=3600)

    def one(prompt: str) -> dict[str, Any]:
        start = time.perf_counter()
        response = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        return {"latency_s": time.perf_counter() - start, "tokens": response.usage.completion_tokens,
                "prompt_tokens": response.usage.prompt_tokens}  # fmt: skip

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        requests = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    generated = sum(request["tokens"] for request in requests)
    return {"wall_s": wall, "tokens_per_s": generated / wall, "generated": generated, "requests": requests}


def _percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank ``share`` percentile of ``values`` (None when empty)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))] if ordered else None


def _summarise(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, Any]:
    """One row's numbers from its rounds (``{"aha": point, "sdpa": point}`` each; see the module docstring)."""
    speedups = [r["aha"]["tokens_per_s"] / r["sdpa"]["tokens_per_s"] for r in rounds]
    chosen = rounds[speedups.index(statistics.median_low(speedups))]
    aha, sdpa = chosen["aha"], chosen["sdpa"]
    equal = [(a["latency_s"], s["latency_s"]) for a, s in zip(aha["requests"], sdpa["requests"], strict=True) if a["tokens"] == s["tokens"]]
    row: dict[str, Any] = {
        "aha_tokens_per_s": aha["tokens_per_s"], "sdpa_tokens_per_s": sdpa["tokens_per_s"],
        "speedup": aha["tokens_per_s"] / sdpa["tokens_per_s"], "speedup_min": min(speedups), "speedup_max": max(speedups),
        "aha_generated": aha["generated"], "sdpa_generated": sdpa["generated"],
        "prompt_tokens": statistics.mean(request["prompt_tokens"] for request in aha["requests"]),
        "latency_requests": len(equal),
    }  # fmt: skip
    for index, name in enumerate(("aha", "sdpa")):
        row[f"{name}_p50_s"] = _percentile([pair[index] for pair in equal], 0.5)
        row[f"{name}_p99_s"] = _percentile([pair[index] for pair in equal], 0.99)
    return row


@register_group("serve")
def serve_benchmarks(cfg: BenchConfig) -> list[Section]:
    """Throughput and latency of ``aha serve`` against the same weights served with SDPA."""
    import openai
    from transformers import AutoTokenizer

    from aha.serving.loader import model_folder
    from aha.serving.process import running_server

    folder = model_folder(cfg.model)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    context = config.get("max_position_embeddings") or 1 << 62
    limit = context - cfg.serve_max_tokens - 16  # room to generate, and a margin for re-tokenizing the text
    flags: tuple[str, ...] = ()
    if cfg.serve_continuous_batching:  # both servers get the same cache, sized for the largest load point
        cache_tokens = max(cfg.serve_clients) * (min(max(cfg.serve_prompt_lens), limit) + cfg.serve_max_tokens + 16)
        flags = ("--continuous-batching", "--kv-cache-tokens", str(cache_tokens))
    routing = () if _is_aha_config(config) else ("--window", str(cfg.windows[0]), "--sink", str(cfg.sink))
    rows = []
    with (
        tempfile.TemporaryDirectory(prefix="aha-bench-serve-") as logs,
        running_server(cfg.model, *flags, *routing, log=Path(logs) / "aha.log") as routed,
        running_server(cfg.model, *flags, "--dense", log=Path(logs) / "sdpa.log") as dense,
    ):
        for server in (routed, dense):  # first-request costs (kernel loading, allocations) are not a load point's
            _load_point(server.url, cfg.model, _prompts(tokenizer, 1, 64), 4)
        for prompt_tokens in (min(length, limit) for length in cfg.serve_prompt_lens):
            for clients in cfg.serve_clients:
                prompts = _prompts(tokenizer, clients, prompt_tokens)
                before = routed.metrics()
                row: dict[str, Any] = {"clients": clients, "prompt_len": prompt_tokens}
                rounds: list[dict[str, dict[str, Any]]] = []
                try:
                    for round_index in range(cfg.serve_rounds):  # alternate who goes first: drift hits both alike
                        order = (("aha", routed), ("sdpa", dense))[:: 1 if round_index % 2 == 0 else -1]
                        rounds.append({name: _load_point(server.url, cfg.model, prompts, cfg.serve_max_tokens) for name, server in order})
                except openai.APIError as error:  # the other points still run
                    rows.append({**row, "error": f"{type(error).__name__}: {error}"})
                    continue
                after = routed.metrics()
                row.update(_summarise(rounds), rounds=cfg.serve_rounds, round_points=rounds)
                row["global_fraction"] = _delta_ratio(before, after, 'aha_route_decisions_total{route="global"}',
                                                      'aha_route_decisions_total{route="local"}')  # fmt: skip
                rows.append(row)
    mode = "continuous batching" if cfg.serve_continuous_batching else "one request at a time (sequential generate)"
    columns = [
        Column("prompt_len", "prompt"), Column("clients", "clients"), Column("global_fraction", "global", ".3f"),
        Column("aha_tokens_per_s", "aha tok/s", ".2f"), Column("sdpa_tokens_per_s", "sdpa tok/s", ".2f"),
        Column("speedup", "speedup", ".2f"),
        *((Column("speedup_min", "min", ".2f"), Column("speedup_max", "max", ".2f")) if cfg.serve_rounds > 1 else ()),
        Column("aha_generated", "aha tokens"), Column("sdpa_generated", "sdpa tokens"), Column("latency_requests", "latency n"),
        Column("aha_p50_s", "aha p50 s", ".1f"), Column("sdpa_p50_s", "sdpa p50 s", ".1f"),
        Column("aha_p99_s", "aha p99 s", ".1f"), Column("sdpa_p99_s", "sdpa p99 s", ".1f"),
    ]  # fmt: skip
    notes = [
        (f"model {cfg.model}, {cfg.serve_max_tokens} generated tokens per request, {mode}; each client sends one "
         "request; aha and sdpa serve the same weights in two servers, measured one after the other per point"
         + (f", {cfg.serve_rounds} rounds alternating which goes first; the row is the round of the median speedup "
            "(min / max: all rounds' speedups)" if cfg.serve_rounds > 1 else "")),
        "speedup = aha tok/s / sdpa tok/s of the row's round; tokens = tokens generated; latency: over the latency n "
        "requests that generated as many tokens on both servers (an answer that ends early would bias it)",
        "global = share of (token, head) pairs routed global during the aha point (prompt and generated tokens)",
        *(f"failed: {row['clients']} clients x {row['prompt_len']} tokens: {row['error']}" for row in rows if "error" in row),
    ]
    return [Section("serve_load", "aha serve load test over loopback (tokens/s and end-to-end latency)", columns, rows, notes)]


def _is_aha_config(config: dict[str, Any]) -> bool:
    """Whether a ``config.json`` is a saved AHA model's (else the routed server converts it with open routers)."""
    from aha.hf.modeling import RELEASED_AHA_OLMO2_MODEL_TYPE

    return config.get("aha") is not None or config.get("model_type") == RELEASED_AHA_OLMO2_MODEL_TYPE


def _delta_ratio(before: dict[str, float], after: dict[str, float], part: str, rest: str) -> float:
    """``part / (part + rest)`` of the counters' growth between two ``/metrics`` reads."""
    grown_part = after.get(part, 0.0) - before.get(part, 0.0)
    grown_rest = after.get(rest, 0.0) - before.get(rest, 0.0)
    return grown_part / (grown_part + grown_rest) if grown_part + grown_rest else float("nan")
