"""Matplotlib figures of where and how much a routed model attends globally.

All functions write one PNG and return its path. Polarity: "global fraction" is the share of
(token, head) decisions routed to full causal attention (``g = 1``); the rest went local.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from aha._optional import reraise_missing

try:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, PercentFormatter
except ImportError as error:
    raise reraise_missing(error, "the report's plots") from error

from aha.stats import RoutingStats


@dataclass(frozen=True)
class WindowPoint:
    """One routed model of a window sweep: its window, global fraction and held-out perplexity."""

    window: int
    global_fraction: float
    perplexity: float


def _save(fig: plt.Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_global_fraction_vs_window(
    points: Sequence[WindowPoint] | Mapping[str, Sequence[WindowPoint]],
    path: str | Path,
    *,
    full_attention_perplexity: float | None = None,
    full_attention_label: str = "perplexity (full attention)",
    title: str = "Global attention needed vs window",
) -> Path:
    """The long-tail curve: global fraction (left panel) and held-out perplexity (right panel) per window.

    Args:
        points: one point per window (any order), or several such series by label (e.g. one per
            local operator), drawn in one colour each.
        full_attention_perplexity: drawn as a dotted reference line (labelled ``full_attention_label``) when given.
    """
    series = dict(points) if isinstance(points, Mapping) else {"AHA": points}
    if not series or not all(series.values()):
        raise ValueError("plot_global_fraction_vs_window needs at least one WindowPoint per series")
    windows = sorted({p.window for curve in series.values() for p in curve})
    fig, (fraction_ax, ppl_ax) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    for index, (label, curve) in enumerate(series.items()):
        curve = sorted(curve, key=lambda p: p.window)
        xs = [p.window for p in curve]
        fraction_ax.plot(xs, [p.global_fraction for p in curve], "o-", color=f"C{index}", label=label)
        ppl_ax.plot(xs, [p.perplexity for p in curve], "s-", color=f"C{index}", label=label)
    if full_attention_perplexity is not None:
        ppl_ax.axhline(full_attention_perplexity, color="gray", linestyle=":", label=full_attention_label)
    for ax in (fraction_ax, ppl_ax):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(windows))
        ax.set_xticklabels([str(w) for w in windows])
        ax.set_xlabel("local window w (tokens)")
        ax.grid(alpha=0.3)
    fraction_ax.set_ylabel("global fraction (token, head pairs)")
    fraction_ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    fraction_ax.set_ylim(bottom=0)
    ppl_ax.set_ylabel("held-out perplexity")
    ppl_ax.legend(fontsize="small")
    fig.suptitle(title)
    return _save(fig, path)


def plot_layer_head_heatmap(stats: RoutingStats, path: str | Path, *, title: str = "Global fraction per layer and head") -> Path:
    """Heatmap ``[num_layers, num_heads]`` of :meth:`RoutingStats.per_head` (layer 0 at the top)."""
    table = stats.per_head().numpy()
    fig, ax = plt.subplots(figsize=(1.2 + 0.45 * stats.num_heads, 1.2 + 0.22 * stats.num_layers))
    image = ax.imshow(table, aspect="auto", cmap="Reds", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(stats.num_heads))
    ax.set_yticks(range(0, stats.num_layers, max(1, stats.num_layers // 15)))
    fig.colorbar(image, ax=ax, label="global fraction", format=PercentFormatter(1.0))
    ax.set_title(f"{title}\n(overall {stats.global_fraction:.1%}, window {stats.window})")
    return _save(fig, path)


def plot_global_fraction_vs_position(
    stats: RoutingStats, path: str | Path, *, bucket: int = 32, title: str = "Global fraction vs token position"
) -> Path:
    """Global fraction averaged over buckets of ``bucket`` query positions, with the window marked."""
    per_bucket = stats.per_position(bucket).numpy()
    if per_bucket.size == 0:
        raise ValueError("these RoutingStats saw no tokens; run a forward pass under aha.track_routing first")
    starts = np.arange(per_bucket.size) * bucket
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.step(starts, per_bucket, where="post", color="tab:red")
    ax.axvline(stats.window, color="gray", linestyle="--", label=f"window = {stats.window}")
    ax.set_xlabel("query position (0-based)")
    ax.set_ylabel("global fraction")
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(title)
    return _save(fig, path)


def plot_training(rows: Sequence[dict], path: Path, target: float) -> Path:
    """Global fraction and loss per training step (the ``train`` rows of a run's ``metrics.jsonl``)."""
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.plot(steps, [r["global_fraction"] for r in rows], label="global fraction (train batch)")
    top.axhline(target, color="grey", linestyle="--", label=f"target {target:g}")
    top.set_ylim(0, 1.02)
    top.set_ylabel("global fraction")
    top.legend(loc="upper right")
    bottom.plot(steps, [r["ce"] for r in rows], label="cross-entropy")
    if any(r.get("kd") for r in rows):
        bottom.plot(steps, [r["kd"] for r in rows], label="distillation KL")
    bottom.set_xlabel("step")
    bottom.set_ylabel("loss")
    bottom.legend(loc="upper right")
    fig.suptitle("AHA fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
