"""Routing statistics (how often each layer/head/position went global, and what it saved), and the
confidence intervals every published accuracy or perplexity comparison carries.

Two numbers summarise a run, and they differ:

* **full-attention operations replaced** (the paper's figure): the share of (token, head)
  decisions routed local, i.e. ``1 - global_fraction``. The paper reports up to 93% at w=256.
* **attention compute ratio**: attention score entries actually computed divided by those
  full causal attention computes. A query at absolute position ``p`` (0-based) costs ``p + 1``
  entries when global and ``min(p + 1, window + sink)`` when local; full attention costs ``p + 1``.
  This is the ideal cost ratio ``~ rho + (1 - rho) * 2w/n`` that a kernel can approach.

Intervals (95% by default):

* :func:`wilson_interval` -- an accuracy (a binomial proportion, e.g. passkey retrieval);
* :func:`paired_difference_interval` -- the difference of two accuracies on the *same* prompts
  (Newcombe's method 10), what a "within N points" claim needs;
* :func:`bootstrap_perplexity_change` -- the relative perplexity change of one model or routing
  mode against another on the same held-out sequences (paired bootstrap over sequences).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from statistics import NormalDist
from typing import Any

import torch
from torch import Tensor


@dataclass
class RoutingStats:
    """Accumulates hard routes ``[batch, heads, seq]`` per layer; see the module docstring for definitions.

    Args:
        window: the local window (keys a local query sees, its own included).
        num_layers, num_heads: shape of the per-layer x per-head table.
        sink: attention-sink keys local queries also see (0 = none).
    """

    window: int
    num_layers: int
    num_heads: int
    sink: int = 0
    global_pairs: Tensor = field(init=False)
    total_pairs: Tensor = field(init=False)
    position_global: Tensor = field(init=False)
    position_total: Tensor = field(init=False)
    computed_scores: int = 0
    full_scores: int = 0

    def __post_init__(self) -> None:
        self.global_pairs = torch.zeros(self.num_layers, self.num_heads, dtype=torch.float64)
        self.total_pairs = torch.zeros(self.num_layers, self.num_heads, dtype=torch.float64)
        self.position_global = torch.zeros(0, dtype=torch.float64)
        self.position_total = torch.zeros(0, dtype=torch.float64)

    def update(self, layer: int, route: Tensor, first_position: int = 0, valid: Tensor | None = None) -> None:
        """Add one layer's hard route ``[batch, heads, seq]`` (True = global).

        Args:
            first_position: absolute position of the route's first query (the KV prefix length).
            valid: optional ``[batch, seq]`` bool; False marks padding tokens, which are not counted.
        """
        route = route.detach().bool().cpu()
        batch, heads, seq = route.shape
        if heads != self.num_heads or not 0 <= layer < self.num_layers:
            raise ValueError(f"route for layer {layer} with {heads} heads does not fit {self.num_layers}x{self.num_heads}")
        weight = torch.ones(batch, seq, dtype=torch.float64) if valid is None else valid.detach().cpu().double()
        g = route.double() * weight[:, None, :]
        self.global_pairs[layer] += g.sum(dim=(0, 2))
        self.total_pairs[layer] += weight.sum() * torch.ones(heads, dtype=torch.float64)

        end = first_position + seq
        if self.position_total.numel() < end:
            grow = end - self.position_total.numel()
            self.position_global = torch.cat([self.position_global, torch.zeros(grow, dtype=torch.float64)])
            self.position_total = torch.cat([self.position_total, torch.zeros(grow, dtype=torch.float64)])
        self.position_global[first_position:end] += g.sum(dim=(0, 1))
        self.position_total[first_position:end] += weight.sum(0) * heads

        cost_full = torch.arange(first_position + 1, end + 1, dtype=torch.float64)  # p + 1
        cost_local = cost_full.clamp(max=self.window + self.sink)
        per_pair = torch.where(route, cost_full, cost_local) * weight[:, None, :]
        self.computed_scores += int(per_pair.sum())
        self.full_scores += int((cost_full * weight).sum()) * heads

    @property
    def global_fraction(self) -> float:
        """Share of (token, head) decisions routed global, over all layers."""
        total = self.total_pairs.sum()
        return float(self.global_pairs.sum() / total) if total > 0 else float("nan")

    @property
    def operations_replaced(self) -> float:
        """The paper's figure: share of full-attention (token, head) operations replaced by local ones."""
        return 1.0 - self.global_fraction

    @property
    def compute_ratio(self) -> float:
        """Attention score entries computed / entries full causal attention would compute."""
        return self.computed_scores / self.full_scores if self.full_scores else float("nan")

    def per_layer(self) -> Tensor:
        """Global fraction per layer ``[num_layers]``."""
        return self.global_pairs.sum(1) / self.total_pairs.sum(1).clamp(min=1)

    def per_head(self) -> Tensor:
        """Global fraction per layer and head ``[num_layers, num_heads]``."""
        return self.global_pairs / self.total_pairs.clamp(min=1)

    def per_position(self, bucket: int = 1) -> Tensor:
        """Global fraction per absolute position, averaged over buckets of ``bucket`` positions."""
        n = self.position_total.numel()
        pad = (-n) % bucket
        glob = torch.cat([self.position_global, torch.zeros(pad, dtype=torch.float64)]).view(-1, bucket).sum(1)
        tot = torch.cat([self.position_total, torch.zeros(pad, dtype=torch.float64)]).view(-1, bucket).sum(1)
        return glob / tot.clamp(min=1)

    @classmethod
    def merge(cls, parts: Iterable[RoutingStats]) -> RoutingStats:
        """One :class:`RoutingStats` holding the sum of ``parts`` (same window, sink, layers and heads)."""
        parts = list(parts)
        if not parts:
            raise ValueError("nothing to merge")
        first = parts[0]
        shape = (first.window, first.num_layers, first.num_heads, first.sink)
        merged = cls(*shape)
        length = max(part.position_total.numel() for part in parts)
        merged.position_global = torch.zeros(length, dtype=torch.float64)
        merged.position_total = torch.zeros(length, dtype=torch.float64)
        for part in parts:
            if (part.window, part.num_layers, part.num_heads, part.sink) != shape:
                raise ValueError("cannot merge routing statistics of models with different windows or shapes")
            merged.global_pairs += part.global_pairs
            merged.total_pairs += part.total_pairs
            merged.position_global[: part.position_global.numel()] += part.position_global
            merged.position_total[: part.position_total.numel()] += part.position_total
            merged.computed_scores += part.computed_scores
            merged.full_scores += part.full_scores
        return merged

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary."""
        return {
            "window": self.window,
            "sink": self.sink,
            "global_fraction": self.global_fraction,
            "operations_replaced": self.operations_replaced,
            "compute_ratio": self.compute_ratio,
            "per_layer": self.per_layer().tolist(),
            "per_head": self.per_head().tolist(),
        }


def ideal_cost_ratio(global_fraction: float, window: int, seq_len: int) -> float:
    """Attention cost of AHA relative to full causal: ``rho + (1 - rho) * 2w/n`` (capped at 1)."""
    return min(1.0, global_fraction + (1.0 - global_fraction) * min(1.0, 2.0 * window / seq_len))


def _z(confidence: float) -> float:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval ``(low, high)`` of a binomial proportion ``successes / trials``.

    Unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse to a point at
    0 or ``trials`` successes: 20 of 20 prompts gives (0.839, 1.0), 100 of 100 gives (0.963, 1.0).
    """
    if trials < 1 or not 0 <= successes <= trials:
        raise ValueError(f"need 0 <= successes <= trials and trials >= 1, got {successes} of {trials}")
    z = _z(confidence)
    p = successes / trials
    scale = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / scale
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / scale
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == trials else min(1.0, centre + half)
    return low, high


def paired_difference_interval(
    first: Sequence[bool], second: Sequence[bool], confidence: float = 0.95
) -> tuple[float, float, float]:
    """Difference of two accuracies measured on the same items, ``mean(first) - mean(second)``, with
    Newcombe's (1998) method-10 interval: the two Wilson intervals combined with the (continuity
    corrected) correlation of the pairs. Items both get right or both get wrong narrow the interval,
    which an interval for independent samples would ignore.

    Args:
        first, second: per-item outcomes (True = correct), ``first[i]`` and ``second[i]`` on item ``i``.

    Returns:
        ``(difference, low, high)``, each in [-1, 1].
    """
    if len(first) != len(second) or not first:
        raise ValueError(f"need the same non-zero number of paired outcomes, got {len(first)} and {len(second)}")
    both = sum(1 for a, b in zip(first, second) if a and b)
    only_first = sum(1 for a, b in zip(first, second) if a and not b)
    only_second = sum(1 for a, b in zip(first, second) if b and not a)
    neither = len(first) - both - only_first - only_second
    n = len(first)
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    low1, high1 = wilson_interval(both + only_first, n, confidence)
    low2, high2 = wilson_interval(both + only_second, n, confidence)
    margins = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    excess = both * neither - only_first * only_second
    corrected = excess - n / 2 if excess > n / 2 else min(excess, 0)
    phi = corrected / math.sqrt(margins) if margins else 0.0
    difference = p1 - p2
    low = difference - math.sqrt(max(0.0, (p1 - low1) ** 2 - 2 * phi * (p1 - low1) * (high2 - p2) + (high2 - p2) ** 2))
    high = difference + math.sqrt(max(0.0, (p2 - low2) ** 2 - 2 * phi * (p2 - low2) * (high1 - p1) + (high1 - p1) ** 2))
    return difference, max(-1.0, low), min(1.0, high)


def bootstrap_perplexity_change(
    nll: Sequence[float],
    reference_nll: Sequence[float],
    tokens: Sequence[int],
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Relative perplexity change ``ppl / reference_ppl - 1`` on the same held-out sequences, with a
    paired percentile-bootstrap interval: sequences (not tokens, which are correlated within a
    sequence) are resampled with replacement, the same draw for both.

    Args:
        nll, reference_nll: per sequence, the summed negative log-likelihood (nats) of its targets.
        tokens: per sequence, its number of targets (the same in both: the same sequences).
        resamples: bootstrap draws; ``seed`` makes the interval reproducible.

    Returns:
        ``(change, low, high)``; 0.02 = 2% higher perplexity than the reference.
    """
    if not len(nll) == len(reference_nll) == len(tokens) or not tokens:
        raise ValueError(f"need one nll, reference nll and token count per sequence, got {len(nll)}, {len(reference_nll)}, {len(tokens)}")
    _z(confidence)
    gap = torch.tensor(nll, dtype=torch.float64) - torch.tensor(reference_nll, dtype=torch.float64)
    count = torch.tensor(tokens, dtype=torch.float64)
    if count.min() <= 0:
        raise ValueError("every sequence needs at least one target token")
    draws = torch.randint(len(count), (resamples, len(count)), generator=torch.Generator().manual_seed(seed))
    changes = torch.expm1(gap[draws].sum(1) / count[draws].sum(1))
    tail = (1 - confidence) / 2
    low, high = torch.quantile(changes, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return math.expm1(float(gap.sum() / count.sum())), low, high
