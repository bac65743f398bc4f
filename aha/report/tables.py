"""Rich tables of the evaluation results (what ``aha eval`` and the demo print)."""

from __future__ import annotations

import math
from typing import Any

from aha._optional import reraise_missing

try:
    from rich.table import Table
except ImportError as error:
    raise reraise_missing(error, "the report's console tables") from error

from aha.evaluation.passkey import PasskeyResult
from aha.evaluation.perplexity import PerplexityReport
from aha.evaluation.routing import MODES
from aha.report.markdown import HEADLINE_COLUMNS

#: Printed under every table: what the three rows are.
MODES_NOTE = "full = every pair global; local = every pair local (sliding window); aha = learned routes"


def _percent(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.1%}"


def perplexity_table(report: PerplexityReport, *, title: str | None = None) -> Table:
    """One row per mode: held-out perplexity, its change vs full attention, and the routing statistics."""
    table = Table(title=title or f"Held-out perplexity and routing (window {report.window}, {report.sequences} x {report.seq_len} tokens)")
    for name in ("mode", "perplexity", "vs full", "global", "ops replaced", "compute"):
        table.add_column(name, justify="left" if name == "mode" else "right")
    for mode, result in report.results.items():
        vs_full = ""
        if "full" in report.results and mode != "full":
            change = result.change_against(report.results["full"])
            vs_full = f"{change['change']:+.2%} [{change['low']:+.2%}, {change['high']:+.2%}]"
        table.add_row(
            mode,
            f"{result.perplexity:.3f}",
            vs_full,
            _percent(result.routing.global_fraction),
            _percent(result.routing.operations_replaced),
            _percent(result.routing.compute_ratio),
        )
    table.caption = (
        f"{MODES_NOTE}\nvs full: perplexity change [95% CI, paired bootstrap over the sequences]; global: share of "
        "(token, head) pairs routed to full attention; compute: attention scores computed / full causal"
    )
    return table


def position_table(report: PerplexityReport, *, title: str | None = None) -> Table:
    """Perplexity per query-position bucket (one column per bucket), one row per mode, plus AHA's global fraction."""
    table = Table(title=title or f"Perplexity by query position (window {report.window})")
    table.add_column("mode")
    first = next(iter(report.results.values()))
    for bucket in first.buckets:
        table.add_column(f"{bucket.start}-{bucket.end - 1}", justify="right")
    for mode, result in report.results.items():
        table.add_row(mode, *(f"{bucket.perplexity:.3f}" for bucket in result.buckets))
    if "aha" in report.results:
        table.add_row("aha global", *(_percent(bucket.global_fraction) for bucket in report.results["aha"].buckets))
    return table


def _accuracy(interval: dict[str, Any] | None) -> str:
    if interval is None:
        return "-"
    return f"{interval['accuracy']:.0%} [{interval['low']:.0%}, {interval['high']:.0%}]"


def passkey_table(result: PasskeyResult, *, title: str | None = None) -> Table:
    """Exact-match accuracy per mode with its Wilson 95% interval: by context length, and split by
    needle distance vs window."""
    lengths = sorted({t.context_length for t in result.trials})
    modes = sorted({t.mode for t in result.trials}, key=MODES.index)
    table = Table(title=title or f"Passkey retrieval, exact-match accuracy (window {result.window})")
    table.add_column("mode")
    for n in lengths:
        table.add_column(str(n), justify="right")
    table.add_column("near", justify="right")
    table.add_column("far", justify="right")
    table.add_column("all", justify="right")
    for mode in modes:
        table.add_row(
            mode,
            *(_accuracy(result.accuracy_interval(mode, context_length=n)) for n in lengths),
            _accuracy(result.accuracy_interval(mode, beyond_window=False)),
            _accuracy(result.accuracy_interval(mode, beyond_window=True)),
            _accuracy(result.accuracy_interval(mode)),
        )
    prompts = len({t.prompt for t in result.trials}) // max(1, len(lengths))
    table.caption = (
        f"{MODES_NOTE}\ncolumns: prompt length in tokens ({prompts} prompts each, the same in every mode); near / far: "
        f"needle less / at least {result.window} tokens (the window) before the answer; [95% CI, Wilson]"
    )
    if "full" in modes:
        for mode in modes:
            differences = [(n, result.paired_difference(mode, context_length=n)) for n in lengths] if mode != "full" else []
            if differences:
                table.caption += f"\n{mode} - full, same prompts [95% CI, Newcombe]: " + "; ".join(
                    f"{n}: {d['difference']:+.0%} [{d['low']:+.0%}, {d['high']:+.0%}]" for n, d in differences if d
                )
    if result.answer_stats is not None and result.prompt_stats is not None:
        table.caption += (
            f"\nAHA global fraction: {result.answer_stats.global_fraction:.1%} at the answer steps vs "
            f"{result.prompt_stats.global_fraction:.1%} over the prompts"
        )
        opening = ", ".join(f"L{h['layer']}.H{h['head']} {h['answer']:.0%} (prompt {h['prompt']:.0%})" for h in result.opening_heads())
        if opening:
            table.caption += f"\nheads whose global share rises most at the answer: {opening}"
    return table


def headline_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for header, _ in HEADLINE_COLUMNS:
        table.add_column(header, justify="left" if header == "model" else "right")
    for row in rows:
        table.add_row(*(cell(row) for _, cell in HEADLINE_COLUMNS))
    return table
