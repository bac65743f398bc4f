"""Held-out perplexity, overall and by token position, with the routing that produced it.

The same sequences are scored three ways (:data:`~aha.evaluation.routing.RoutingMode`): the
routed model ("aha"), the model forced to full attention ("full") and forced to pure sliding
window at the same window ("local"). Positions are 0-based *query* positions: the token at
position ``p`` predicts token ``p + 1`` from ``p + 1`` tokens of context; a local query sees
``min(p + 1, window)`` of them, so "local" equals "full" on positions below the window and the
cost of dropping global attention shows in the buckets past it.

Each result also keeps every sequence's summed NLL and target count, so that a perplexity difference
(between two modes here, or between two models' ``eval.json`` with ``aha report compare``) gets a
paired bootstrap interval over the held-out sequences (:func:`aha.stats.bootstrap_perplexity_change`).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

import aha
from aha.data.packing import IGNORE_INDEX
from aha.evaluation.routing import MODES, RoutingMode, check_modes, routing_mode
from aha.stats import RoutingStats, bootstrap_perplexity_change

#: Interval of every perplexity change this module reports.
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000


def position_bucket_edges(seq_len: int, window: int) -> list[int]:
    """Query-position bucket edges ``[0, w, 2w, 4w, ..., seq_len - 1]`` (buckets are ``[lo, hi)``).

    The first bucket is where local attention equals full attention; the later ones double in
    width, so the far-context buckets still hold enough tokens.
    """
    last = seq_len - 1  # queries 0 .. seq_len - 2 have a target
    edges = [0]
    edge = window
    while edge < last:
        edges.append(edge)
        edge *= 2
    return edges + [last]


@dataclass(frozen=True)
class PositionBucket:
    """Perplexity and global fraction of the queries at positions ``[start, end)``."""

    start: int
    end: int
    tokens: int
    perplexity: float
    global_fraction: float


def sequence_id(input_ids: torch.Tensor) -> str:
    """A short content hash of one sequence's token ids: two reports scored the same sequences when
    their ids agree (checked before comparing models across reports)."""
    return hashlib.sha256(",".join(map(str, input_ids.tolist())).encode()).hexdigest()[:16]


@dataclass
class PerplexityResult:
    """One routing mode's scores on the evaluation sequences.

    ``sequence_nll[i]`` / ``sequence_tokens[i]``: summed NLL (nats) and target count of sequence
    ``i``, whose content hash is ``sequence_ids[i]``.
    """

    mode: RoutingMode
    tokens: int
    nll: float
    buckets: list[PositionBucket]
    routing: RoutingStats
    seconds: float
    sequence_nll: list[float]
    sequence_tokens: list[int]
    sequence_ids: list[str]

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll)

    def change_against(self, reference: PerplexityResult) -> dict[str, Any]:
        """``perplexity / reference.perplexity - 1`` on the same sequences, with its paired bootstrap interval."""
        if self.sequence_ids != reference.sequence_ids:
            raise ValueError("the two results scored different sequences; evaluate both on the same held-out sequences")
        change, low, high = bootstrap_perplexity_change(
            self.sequence_nll, reference.sequence_nll, self.sequence_tokens,
            confidence=CONFIDENCE, resamples=BOOTSTRAP_RESAMPLES,
        )  # fmt: skip
        return {"change": change, "low": low, "high": high, "confidence": CONFIDENCE, "sequences": len(self.sequence_ids),
                "method": f"paired bootstrap over sequences, {BOOTSTRAP_RESAMPLES} resamples, seed 0"}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "tokens": self.tokens,
            "nll": self.nll,
            "perplexity": self.perplexity,
            "seconds": self.seconds,
            "by_position": [vars(b) for b in self.buckets],
            "routing": self.routing.to_dict(),
            "sequence_nll": self.sequence_nll,
            "sequence_tokens": self.sequence_tokens,
            "sequence_ids": self.sequence_ids,
        }


@dataclass
class PerplexityReport:
    """The three modes on the same sequences (``results`` keyed by mode)."""

    window: int
    seq_len: int
    sequences: int
    results: dict[str, PerplexityResult]

    def relative_to_full(self, mode: RoutingMode) -> float:
        """Perplexity of ``mode`` over full attention's, minus one (0.02 = 2% worse)."""
        return self.results[mode].perplexity / self.results["full"].perplexity - 1.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "window": self.window,
            "seq_len": self.seq_len,
            "sequences": self.sequences,
            "modes": {mode: result.to_dict() for mode, result in self.results.items()},
        }
        if "full" in self.results:
            others = [mode for mode in self.results if mode != "full"]
            out["perplexity_vs_full"] = {mode: self.relative_to_full(mode) for mode in others}
            out["perplexity_vs_full_interval"] = {mode: self.results[mode].change_against(self.results["full"]) for mode in others}
        return out


def full_length_subset(dataset: Dataset, max_sequences: int | None) -> Subset:
    """Up to ``max_sequences`` sequences without padding, evenly spaced over ``dataset``.

    Sequences that fill their whole length keep every position bucket on the same documents;
    even spacing spreads the pick over all corpora of a packed dataset. ``dataset`` items are
    dicts with ``input_ids``, ``labels`` and ``attention_mask`` (as :class:`aha.data.PackedDataset`).
    """
    if len(dataset) == 0:
        raise ValueError(
            "the data has no held-out sequence: no document fell into the held-out share; raise "
            "--heldout-fraction (documents are held out by a hash of their id, so small datasets may "
            "need 0.3 or more) or add documents"
        )
    lengths = getattr(dataset, "lengths", None)
    if lengths is not None:
        seq_len = len(dataset[0]["input_ids"])
        candidates = np.flatnonzero(np.asarray(lengths) == seq_len)
    else:
        candidates = np.flatnonzero([bool(item["attention_mask"].all()) for item in dataset])
    if candidates.size == 0:
        raise ValueError("no evaluation sequence fills its whole length; lower --seq-len or add longer documents")
    if max_sequences is not None and candidates.size > max_sequences:
        candidates = candidates[np.linspace(0, candidates.size - 1, max_sequences).round().astype(int)]
    return Subset(dataset, candidates.tolist())


@torch.no_grad()
def evaluate_perplexity(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    mode: RoutingMode = "aha",
    batch_size: int = 1,
    bucket_edges: Sequence[int] | None = None,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``dataset`` under one routing mode, with its routing statistics.

    Args:
        model: an AHA-converted causal LM (``aha.convert``), in eval mode.
        dataset: items with ``input_ids``, ``labels`` (``-100`` = not a target) and ``attention_mask``
            (int64 ``[seq_len]`` each), e.g. ``aha.data.build_datasets(...).heldout``.
        mode: ``"aha"`` (learned routes), ``"full"`` (all global) or ``"local"`` (all local).
        bucket_edges: query-position bucket edges (default :func:`position_bucket_edges`).
    """
    device = next(model.parameters()).device
    loader = DataLoader(dataset, batch_size=batch_size)
    nll_sum: torch.Tensor | None = None
    count: torch.Tensor | None = None
    sequence_nll: list[float] = []
    sequence_tokens: list[int] = []
    sequence_ids: list[str] = []
    start = time.perf_counter()
    with routing_mode(model, mode), aha.track_routing(model) as stats:
        for batch in tqdm(loader, desc=f"perplexity ({mode})", unit="batch", disable=not progress):
            input_ids = batch["input_ids"].to(device)
            logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device)).logits
            targets = batch["labels"][:, 1:].to(device)
            nll = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=IGNORE_INDEX, reduction="none")
            valid = targets != IGNORE_INDEX
            if nll_sum is None:
                nll_sum = torch.zeros(nll.shape[1], dtype=torch.float64)
                count = torch.zeros(nll.shape[1], dtype=torch.float64)
            nll_sum += (nll * valid).sum(0).double().cpu()
            count += valid.sum(0).double().cpu()
            sequence_nll += (nll * valid).double().sum(1).tolist()
            sequence_tokens += valid.sum(1).tolist()
            sequence_ids += [sequence_id(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], batch["attention_mask"])]
    seconds = time.perf_counter() - start
    if nll_sum is None or count.sum() == 0:
        raise ValueError("the evaluation data has no prediction targets")

    edges = list(bucket_edges) if bucket_edges is not None else position_bucket_edges(nll_sum.numel() + 1, stats.window)
    buckets = []
    for lo, hi in itertools.pairwise(edges):
        n = float(count[lo:hi].sum())
        global_pairs = float(stats.position_global[lo:hi].sum())
        pairs = float(stats.position_total[lo:hi].sum())
        buckets.append(
            PositionBucket(
                start=lo,
                end=hi,
                tokens=int(n),
                perplexity=math.exp(float(nll_sum[lo:hi].sum()) / n) if n else float("nan"),
                global_fraction=global_pairs / pairs if pairs else float("nan"),
            )
        )
    total = float(count.sum())
    return PerplexityResult(mode, int(total), float(nll_sum.sum()) / total, buckets, stats, seconds,
                            sequence_nll, sequence_tokens, sequence_ids)  # fmt: skip


def compare_routing_modes(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    modes: Sequence[RoutingMode] = MODES,
    batch_size: int = 1,
    bucket_edges: Sequence[int] | None = None,
    progress: bool = True,
) -> PerplexityReport:
    """:func:`evaluate_perplexity` for each mode on the same sequences (default: full, local, aha)."""
    results = {
        mode: evaluate_perplexity(
            model, dataset, mode=mode, batch_size=batch_size, bucket_edges=bucket_edges, progress=progress
        )
        for mode in check_modes(modes)
    }
    first = next(iter(results.values()))
    return PerplexityReport(
        window=first.routing.window,
        seq_len=len(dataset[0]["input_ids"]),
        sequences=len(dataset),
        results=results,
    )
