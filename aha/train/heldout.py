"""Held-out perplexity and routing during training, split over processes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import aha
from aha.data import PackedDataset
from aha.train.objective import cross_entropy_sum
from aha.train.schedule import collate

if TYPE_CHECKING:
    from accelerate import Accelerator


def evaluate(
    model: nn.Module,
    aha_model: nn.Module,
    dataset: PackedDataset,
    indices: Sequence[int],
    *,
    batch_size: int,
    accelerator: Accelerator,
    lockstep: bool = False,
) -> dict[str, Any]:
    """Held-out perplexity and routing with hard routes (eval mode), split over processes.

    Args:
        model: the model to run (``aha_model`` itself, or a PEFT wrapper around it); not DDP-wrapped.
        aha_model: the converted model whose routes are recorded (forced routes count as used).
        dataset, indices: the sequences to evaluate.
        lockstep: every process runs the same number of forwards (a sharded model's forward is a
            collective); a process with a shorter share repeats a batch outside the statistics.

    Returns:
        ``{"loss", "perplexity", "global_fraction", "compute_ratio", "per_layer", "targets"}``; routing
        statistics exclude padding.
    """
    was_training = model.training
    model.eval()
    mine = list(indices)[accelerator.process_index :: accelerator.num_processes]
    ce = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    with torch.no_grad(), accelerator.autocast(), aha.track_routing(aha_model) as stats:
        for start in range(0, len(mine), batch_size):
            batch = collate(dataset, mine[start : start + batch_size], accelerator.device)
            # the padding mask only serves the routing statistics: right padding never reaches a real token
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ce += cross_entropy_sum(logits, batch["labels"]).double()
    if lockstep and len(indices):
        share = math.ceil(len(indices) / accelerator.num_processes)
        spare = math.ceil(share / batch_size) - math.ceil(len(mine) / batch_size)
        with torch.no_grad(), accelerator.autocast():
            for _ in range(spare):  # uncounted: only the collectives must match
                model(input_ids=collate(dataset, list(indices)[:1], accelerator.device)["input_ids"])
    model.train(was_training)
    counts = torch.cat([stats.global_pairs.flatten(), stats.total_pairs.flatten()]).to(accelerator.device)
    counts = accelerator.reduce(counts, "sum").cpu()
    scores = torch.tensor([stats.computed_scores, stats.full_scores], dtype=torch.float64, device=accelerator.device)
    scores = accelerator.reduce(scores, "sum")
    ce = accelerator.reduce(ce, "sum")
    stats.global_pairs, stats.total_pairs = counts.view(2, *stats.global_pairs.shape).unbind(0)
    stats.computed_scores, stats.full_scores = (int(x) for x in scores.tolist())
    targets = dataset.num_targets(indices)
    loss = float(ce) / max(1, targets)
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "global_fraction": stats.global_fraction,
        "compute_ratio": stats.compute_ratio,
        "per_layer": stats.per_layer().tolist(),
        "targets": targets,
    }
