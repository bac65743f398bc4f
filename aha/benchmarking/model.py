"""The ``model`` benchmark group: a real converted LLM, AHA routing against full SDPA attention.

The same model runs the same tokens twice per round: with ``attn_implementation="aha"`` (its
routes) and with ``"sdpa"`` (full causal attention, i.e. the original model; the router logits are
still computed, a negligible extra matmul). Two numbers per phase:

* **attention**: seconds spent inside the attention functions, added up by wrappers installed in
  transformers' ``AttentionInterface`` -- what routing can speed up;
* **end to end**: the whole forward pass (prefill) or one generated token (decode), which also
  pays for embeddings, projections and MLPs that routing does not touch. Decode steps append to
  the :class:`~aha.hf.kv_cache.GrowingCache` that ``generate`` uses, for both implementations.

Routes: a trained AHA checkpoint uses its learned routes (``model_global_heads=None``). An
untrained model (open routers: everything global) would show no difference, so by default the
first ``model_global_heads`` query heads of every layer are forced global and the rest local.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import aha
from aha.benchmarking import BenchConfig, Column, Section, register_group
from aha.benchmarking.timing import Samples, measure_round_robin, median_ratio
from aha.hf.attention import ATTN_IMPLEMENTATION
from aha.hf.kv_cache import GrowingCache
from aha.stats import ideal_cost_ratio

FULL_ATTENTION = "sdpa"


@contextlib.contextmanager
def attention_timer(names: tuple[str, ...] = (ATTN_IMPLEMENTATION, FULL_ATTENTION)) -> Iterator[dict[str, float]]:
    """Add up the wall seconds spent in the attention functions registered under ``names``.

    Yields a dict ``name -> seconds`` that grows while the block runs; the original functions
    are restored on exit.
    """
    seconds = {name: 0.0 for name in names}
    originals = {name: ALL_ATTENTION_FUNCTIONS[name] for name in names}

    def timed(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            result = function(*args, **kwargs)
            if result[0].is_cuda:
                torch.cuda.synchronize()
            seconds[name] += time.perf_counter() - start
            return result

        return call

    for name, function in originals.items():
        AttentionInterface.register(name, timed(name, function))
    try:
        yield seconds
    finally:
        for name, function in originals.items():
            AttentionInterface.register(name, function)


@contextlib.contextmanager
def benchmark_routes(model: nn.Module, global_heads: int | None) -> Iterator[None]:
    """Learned routes (``None``), or the first ``global_heads`` heads of every layer global, the rest local."""
    if global_heads is None:
        yield
        return
    heads = model.config.num_attention_heads
    if not 0 <= global_heads <= heads:
        raise ValueError(f"model_global_heads must be in 0..{heads}, got {global_heads}")
    with aha.force_routing(model, "local"), aha.force_routing(model, "global", heads=list(range(global_heads))):
        yield


def _attention_impl(model: nn.Module, name: str) -> None:
    if model.config._attn_implementation != name:
        model.set_attn_implementation(name)


def benchmark_tokens(tokenizer: Any, n: int) -> Tensor:
    from aha.data.passkey import load_haystack

    ids = tokenizer(load_haystack(), add_special_tokens=False, return_tensors="pt").input_ids[:, :n]
    if ids.shape[1] < n:
        ids = ids.repeat(1, -(-n // ids.shape[1]))[:, :n]
    return ids


def _phase_row(
    phase: str,
    n: int,
    window: int,
    fraction: float,
    samples: dict[str, Samples],
    attention: dict[str, float],
    calls: dict[str, int],
    tokens_per_call: int,
) -> dict[str, Any]:
    aha_attn = attention[ATTN_IMPLEMENTATION] / max(1, calls[ATTN_IMPLEMENTATION])
    full_attn = attention[FULL_ATTENTION] / max(1, calls[FULL_ATTENTION])
    ideal = ideal_cost_ratio(fraction, window, n) if phase == "prefill" else fraction + (1 - fraction) * min(1.0, window / n)
    return {
        "phase": phase,
        "n": n,
        "window": window,
        "global_fraction": fraction,
        "attention_ms": aha_attn * 1e3,
        "sdpa_attention_ms": full_attn * 1e3,
        "attention_speedup": full_attn / aha_attn if aha_attn else None,
        "ideal_attention_speedup": 1.0 / ideal,
        "ms": samples["aha"].median * 1e3,
        "sdpa_ms": samples["sdpa"].median * 1e3,
        "speedup": 1.0 / median_ratio(samples["aha"], samples["sdpa"]),
        "tokens_per_s": tokens_per_call / samples["aha"].median,
        "sdpa_tokens_per_s": tokens_per_call / samples["sdpa"].median,
        "noise": max(max(samples["aha"].noise), max(samples["sdpa"].noise)),
    }


@torch.no_grad()
def measure_model(
    model: nn.Module,
    tokenizer: Any,
    seq_lens: list[int],
    cfg: BenchConfig,
    *,
    decode_tokens: int = 8,
) -> list[dict[str, Any]]:
    """Prefill and decode timings of an AHA model against the same model on SDPA (rows of the ``model`` table).

    Args:
        model: an AHA model (``aha.convert`` or a saved AHA checkpoint), eval mode.
        seq_lens: prompt lengths (tokens of the PG essays).
        cfg: timing policy and ``model_global_heads`` (see the module docstring).
        decode_tokens: greedy tokens generated per decode sample, on a cache of ``n`` tokens.
    """
    window = aha.AhaSettings.from_config(model.config).window
    rows = []
    with benchmark_routes(model, cfg.model_global_heads), attention_timer() as attention:
        for n in seq_lens:
            ids = benchmark_tokens(tokenizer, n)
            _attention_impl(model, ATTN_IMPLEMENTATION)
            with aha.track_routing(model) as stats:
                model(ids)
            fraction = stats.global_fraction
            calls = {ATTN_IMPLEMENTATION: 0, FULL_ATTENTION: 0}

            def prefill(name: str) -> Callable[[], None]:
                def run() -> None:
                    _attention_impl(model, name)
                    model(ids)
                    calls[name] += 1

                return run

            for name in calls:
                attention[name] = 0.0
            samples = measure_round_robin({"aha": prefill(ATTN_IMPLEMENTATION), "sdpa": prefill(FULL_ATTENTION)}, cfg.timing)
            rows.append(_phase_row("prefill", n, window, fraction, samples, attention, calls, n))

            caches = {}
            for name in calls:
                _attention_impl(model, name)
                caches[name] = GrowingCache(model.config, n + decode_tokens)  # the cache generate builds
                prefilled = model(ids, cache=caches[name], use_cache=True)
            first_token = prefilled.logits[:, -1:].argmax(-1)

            def decode(name: str) -> Callable[[], None]:
                def run() -> None:
                    _attention_impl(model, name)
                    cache = caches[name]
                    if cache.get_seq_length() > n:
                        cache.crop(n - cache.get_seq_length())  # back to the prompt (a negative count removes)
                    token = first_token
                    for _ in range(decode_tokens):
                        token = model(token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1)
                    calls[name] += decode_tokens

                return run

            for name in calls:
                attention[name] = 0.0
                calls[name] = 0
            with aha.track_routing(model) as decode_stats:
                decode(ATTN_IMPLEMENTATION)()
            for name in calls:
                attention[name] = 0.0
                calls[name] = 0
            samples = measure_round_robin({"aha": decode(ATTN_IMPLEMENTATION), "sdpa": decode(FULL_ATTENTION)}, cfg.timing)
            row = _phase_row("decode", n, window, decode_stats.global_fraction, samples, attention, calls, decode_tokens)
            rows.append(row)
    _attention_impl(model, ATTN_IMPLEMENTATION)
    return rows


MODEL_COLUMNS = [
    Column("phase", "phase"),
    Column("n", "n"),
    Column("global_fraction", "global", ".3f"),
    Column("attention_ms", "attn ms", ".1f"),
    Column("sdpa_attention_ms", "SDPA attn ms", ".1f"),
    Column("attention_speedup", "attn speedup", ".2f"),
    Column("ideal_attention_speedup", "ideal", ".2f"),
    Column("ms", "model ms", ".1f"),
    Column("sdpa_ms", "SDPA model ms", ".1f"),
    Column("speedup", "e2e speedup", ".2f"),
    Column("tokens_per_s", "tok/s", ".0f"),
    Column("noise", "noise", ".2f"),
]


@register_group("model")
def model_benchmarks(cfg: BenchConfig) -> list[Section]:
    """End to end on a real model (default: the offline SmolLM2-135M; see the module docstring)."""
    model, tokenizer = aha.load_model(cfg.model)
    if not aha.is_aha_model(model):
        aha.convert(model, window=cfg.windows[0])
    model.eval()
    routes = "learned routes" if cfg.model_global_heads is None else f"first {cfg.model_global_heads} heads of every layer global, the rest local"
    section = Section(
        name="model",
        title=f"{cfg.model}: prefill (n tokens) and decode (one token on an n-token cache), AHA vs SDPA",
        columns=MODEL_COLUMNS,
        notes=[
            f"routes: {routes}; window {aha.AhaSettings.from_config(model.config).window}",
            "attn = time inside the attention functions per forward (prefill) or per token (decode); "
            "model/e2e = the whole forward; ideal = 1 / (rho + (1-rho)*2w/n) for prefill, 1 / (rho + (1-rho)*w/n) for decode",
        ],
    )
    section.rows = measure_model(model, tokenizer, cfg.model_seq_lens, cfg)
    return [section]
