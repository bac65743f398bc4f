"""Rich tables of the evaluation results (what ``aha eval`` and the demo print)."""

from __future__ import annotations

import math

from rich.table import Table

from aha.evaluation.passkey import PasskeyResult
from aha.evaluation.perplexity import PerplexityReport
from aha.evaluation.routing import MODES

MODE_LABELS = {"full": "full attention", "local": "sliding window", "aha": "AHA (routed)"}


def _percent(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1%}"


def perplexity_table(report: PerplexityReport, *, title: str | None = None) -> Table:
    """One row per mode: perplexity (overall and per position bucket) and routing statistics."""
    table = Table(title=title or f"Held-out perplexity and routing (window {report.window}, {report.sequences} x {report.seq_len} tokens)")
    table.add_column("mode")
    table.add_column("perplexity", justify="right")
    table.add_column("vs full", justify="right")
    first = next(iter(report.results.values()))
    for bucket in first.buckets:
        table.add_column(f"ppl @{bucket.start}-{bucket.end - 1}", justify="right")
    table.add_column("global fraction", justify="right")
    table.add_column("ops replaced", justify="right")
    table.add_column("compute ratio", justify="right")
    for mode, result in report.results.items():
        vs_full = f"{report.relative_to_full(mode):+.2%}" if "full" in report.results and mode != "full" else ""
        table.add_row(
            MODE_LABELS.get(mode, mode),
            f"{result.perplexity:.3f}",
            vs_full,
            *(f"{bucket.perplexity:.3f}" for bucket in result.buckets),
            _percent(result.routing.global_fraction),
            _percent(result.routing.operations_replaced),
            _percent(result.routing.compute_ratio),
        )
    return table


def passkey_table(result: PasskeyResult, *, title: str | None = None) -> Table:
    """Exact-match accuracy per mode: by context length, and split by needle distance vs window."""
    lengths = sorted({t.context_length for t in result.trials})
    modes = sorted({t.mode for t in result.trials}, key=MODES.index)
    table = Table(title=title or f"Passkey retrieval, exact match (window {result.window})")
    table.add_column("mode")
    for n in lengths:
        table.add_column(f"{n} tok", justify="right")
    table.add_column("needle < window", justify="right")
    table.add_column("needle >= window", justify="right")
    table.add_column("all", justify="right")
    for mode in modes:
        table.add_row(
            MODE_LABELS[mode],
            *(_percent(result.accuracy(mode, context_length=n)) for n in lengths),
            _percent(result.accuracy(mode, beyond_window=False)),
            _percent(result.accuracy(mode, beyond_window=True)),
            _percent(result.accuracy(mode)),
        )
    if result.answer_stats is not None and result.prompt_stats is not None:
        table.caption = (
            f"AHA global fraction: {result.answer_stats.global_fraction:.1%} at the answer steps vs "
            f"{result.prompt_stats.global_fraction:.1%} over the prompts"
        )
    return table
