"""Routing statistics: how often each layer/head/position went global, and what it saved.

Two numbers summarise a run, and they differ:

* **full-attention operations replaced** (the paper's figure): the share of (token, head)
  decisions routed local, i.e. ``1 - global_fraction``. The paper reports up to 93% at w=256.
* **attention compute ratio**: attention score entries actually computed divided by those
  full causal attention computes. A query at absolute position ``p`` (0-based) costs ``p + 1``
  entries when global and ``min(p + 1, window + sink)`` when local; full attention costs ``p + 1``.
  This is the ideal cost ratio ``~ rho + (1 - rho) * 2w/n`` that a kernel can approach.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
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
