"""Warm-start the routers from labels of where the model needs global attention (issue 19).

Open routers start every head global, and the budget controller then has to close them while the
model adapts. A warm start begins at the budget instead: run the model with full attention over a
few training sequences, and score every (token, head) by how much its output changes when it is
restricted to the window (and sink)::

    need = ||o_full - o_local|| / ||o_full||        per (token, head), o = that head's attention output

The ``global_fraction`` largest scores of the whole model are labelled global (so layers get
different shares, as the paper's learned routes do), and each layer's router -- a logistic
regression from the attention input to one logit per head -- is fitted to them: class-balanced
cross-entropy, then each head's bias shifted so that it opens on as many of the labelled tokens as
its labels do. Only the routers change; the model's outputs with full attention are untouched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from transformers import AttentionInterface

import aha
from aha.data import PackedDataset
from aha.hf.control import aha_model, routers
from aha.hf.projection import SeparateRouterQueryProjection
from aha.hf.settings import AhaSettings
from aha.kernels import aha_attention

#: The attention implementation registered while scoring (full attention, needs recorded).
_SCORING = "aha_route_labels"


@dataclass
class RouteLabels:
    """Per converted layer: router inputs ``[tokens, hidden]`` and needs ``[tokens, heads]``."""

    inputs: list[Tensor]
    needs: list[Tensor]


@torch.no_grad()
def collect_route_labels(model: nn.Module, sequences: Tensor) -> RouteLabels:
    """Run ``model`` with full attention over ``sequences`` (``[n, seq]`` token ids, no padding).

    Returns every converted layer's router input and each (token, head)'s need for global
    attention (see the module docstring); 0 where the window already holds every key.
    """
    base = aha_model(model)
    settings = AhaSettings.of(base.config)
    projections = routers(base)
    rows = {index: row for row, index in enumerate(projections)}
    inputs: list[list[Tensor]] = [[] for _ in projections]
    needs: list[list[Tensor]] = [[] for _ in projections]

    def score(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Any, scaling: float | None = None,
              dropout: float = 0.0, **kwargs: Any) -> tuple[Tensor, None]:  # fmt: skip
        batch, heads, seq, _ = query.shape
        every = torch.ones(batch, heads, seq, dtype=torch.bool, device=query.device)
        full = aha_attention(query, key, value, every, settings.window, scale=scaling, sink=settings.sink)
        if module.layer_idx in rows:
            local = aha_attention(query, key, value, ~every, settings.window, scale=scaling, sink=settings.sink)
            need = (full - local).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-6)  # [batch, heads, seq]
            needs[rows[module.layer_idx]].append(need.transpose(1, 2).reshape(-1, heads).float())
        return full.transpose(1, 2), None

    def keep_input(row: int):
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
            inputs[row].append(args[0].reshape(-1, args[0].shape[-1]).float())

        return hook

    hooks = [q_proj.register_forward_pre_hook(keep_input(row)) for row, q_proj in enumerate(projections.values())]
    previous = base.config._attn_implementation
    AttentionInterface.register(_SCORING, score)
    was_training = base.training
    try:
        base.eval()
        base.set_attn_implementation(_SCORING)
        for sequence in sequences:
            base(input_ids=sequence[None].to(base.device))
    finally:
        base.set_attn_implementation(previous)
        base.train(was_training)
        for hook in hooks:
            hook.remove()
    return RouteLabels([torch.cat(rows) for rows in inputs], [torch.cat(rows) for rows in needs])


def full_length_sequences(dataset: PackedDataset, count: int, *, seed: int) -> Tensor:
    """``[count, seq_len]`` token ids of ``count`` sequences of ``dataset`` without padding, chosen with ``seed``."""
    full = np.flatnonzero(dataset.lengths == dataset.seq_len)
    if len(full) == 0:
        raise ValueError(f"no training sequence fills seq_len={dataset.seq_len}: lower --seq-len or --router-warm-start")
    chosen = np.random.default_rng(seed).permutation(full)[:count]
    return torch.stack([dataset[int(index)]["input_ids"] for index in chosen])


def need_threshold(needs: list[Tensor], global_fraction: float) -> float:
    """The need at or above which ``global_fraction`` of all (token, head) pairs of ``needs`` lie."""
    every = torch.cat([layer.flatten() for layer in needs])
    keep = max(1, min(every.numel(), round(global_fraction * every.numel())))
    return float(torch.topk(every, keep).values[-1])


def fit_router(
    linear: nn.Linear, inputs: Tensor, labels: Tensor, *, threshold: float = 0.5, steps: int = 300, lr: float = 1e-2
) -> None:
    """Fit ``linear`` (``hidden -> heads``, with bias) so that ``sigmoid(logit) > threshold`` predicts
    ``labels`` ``[tokens, heads]`` (True = global).

    Class-balanced logistic regression (full batch, Adam), then each head's bias is shifted so the
    head opens on as many tokens of ``inputs`` as it has positive labels.
    """
    with torch.enable_grad():
        weight = linear.weight.detach().clone().float().zero_().requires_grad_(True)
        bias = torch.zeros(linear.out_features, requires_grad=True)
        positives = labels.float().mean(0).clamp(1e-4, 1 - 1e-4)
        pos_weight = (1 - positives) / positives
        mean, std = inputs.mean(0), inputs.std(0).clamp_min(1e-6)  # standardised inputs: one lr fits every layer
        x = (inputs - mean) / std
        optimizer = torch.optim.Adam([weight, bias], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            logits = x @ weight.T + bias
            loss = nn.functional.binary_cross_entropy_with_logits(logits, labels.float(), pos_weight=pos_weight)
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        logits = x @ weight.T + bias
        opened = labels.sum(0)
        for head in range(linear.out_features):
            if opened[head] == 0:
                bias[head] -= logits[:, head].max() + 1.0
            else:
                bias[head] -= torch.topk(logits[:, head], int(opened[head])).values[-1] - 1e-4
        # undo the standardisation: w' x + b' == w (x - mean) / std + b
        scaled = weight / std
        linear.weight.copy_(scaled.to(linear.weight.dtype))
        offset = math.log(threshold / (1 - threshold))  # sigmoid(logit) > threshold  <=>  logit > offset
        linear.bias.copy_((bias - scaled @ mean + offset).to(linear.bias.dtype))


def warm_start_routers(model: nn.Module, sequences: Tensor, global_fraction: float) -> dict[str, Any]:
    """Fit every router of ``model`` to the route labels of ``sequences`` (see the module docstring).

    Args:
        model: a converted model with separate routers (``router_layout="separate"``).
        sequences: ``[n, seq]`` token ids the labels come from (a few training sequences).
        global_fraction: share of (token, head) pairs labelled global.

    Returns:
        What was fitted: the need threshold, and per layer the labelled and the fitted global
        fraction on ``sequences``.
    """
    if not 0 < global_fraction < 1:
        raise ValueError(f"the warm start's global fraction must be in (0, 1), got {global_fraction}")
    projections = list(routers(aha_model(model)).values())
    if not all(isinstance(q_proj, SeparateRouterQueryProjection) for q_proj in projections):
        raise aha.UnsupportedModelError("warm-starting routers needs separate routers (router_layout='separate')")
    route_threshold = AhaSettings.of(aha_model(model).config).threshold
    labels = collect_route_labels(model, sequences)
    threshold = need_threshold(labels.needs, global_fraction)
    per_layer = []
    for q_proj, inputs, needs in zip(projections, labels.inputs, labels.needs, strict=True):
        wanted = needs >= threshold
        fit_router(q_proj.router.proj, inputs, wanted, threshold=route_threshold)
        with torch.no_grad():
            logits = q_proj.router.proj(inputs.to(q_proj.router.proj.weight.dtype))
            fitted = (torch.sigmoid(logits) > route_threshold).float().mean().item()
        per_layer.append({"labelled": wanted.float().mean().item(), "fitted": fitted})
    return {"need_threshold": threshold, "layers": per_layer}
