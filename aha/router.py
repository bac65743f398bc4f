"""The per-head binary router: one logit per query head per token, from the attention input.

Polarity everywhere in this package: ``g = 1`` (True) means **global** (full causal attention),
``g = 0`` (False) means **local** (sliding window).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

RouterInit = Literal["open", "random"]

#: Bias of an "open" router: sigmoid(4) = 0.982, every head global at the start (the converted
#: model equals the original exactly) yet far enough from saturation for gradients to flow.
OPEN_BIAS = 4.0


def route_from_logits(
    logits: Tensor, threshold: float = 0.5, *, straight_through: bool = False
) -> tuple[Tensor, Tensor]:
    """Turn router logits into a route for :func:`aha.aha_attention` and the soft gate.

    Args:
        logits: ``[batch, heads, seq]`` router logits.
        threshold: a pair is global when ``sigmoid(logit) > threshold``.
        straight_through: return the STE gate ``g_hard + (g_soft - g_soft.detach())`` (float,
            exactly 0/1 in the forward pass, sigmoid gradient in the backward pass) instead of
            a bool route. Use it when training.

    Returns:
        ``(route, g_soft)``: route ``[batch, heads, seq]`` (bool, or float when ``straight_through``)
        and ``g_soft = sigmoid(logits)``, the quantity the sparsity penalty is applied to.
    """
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    g_soft = torch.sigmoid(logits.float())
    hard = g_soft > threshold
    if not straight_through:
        return hard, g_soft
    # hard + (g - g.detach()), not (hard + g) - g: the forward value is then exactly 0 or 1 (the
    # attention op relies on it, see route_is_binary), where rounding of hard + g could leave 1 - 2**-24
    return hard.to(g_soft.dtype) + (g_soft - g_soft.detach()), g_soft


class Router(nn.Module):
    """A linear router ``hidden -> num_heads`` logits; ``forward`` returns ``[batch, heads, seq]``.

    Args:
        hidden_size: width of the attention input.
        num_heads: number of query heads (one logit each).
        init: ``"open"`` -- zero weight and bias :data:`OPEN_BIAS`, so every head starts global and
            a converted model reproduces the original exactly (recommended for fine-tuning a
            pretrained model: routing starts from full attention and the sparsity penalty closes
            heads that do not need it); ``"random"`` -- small random weight and zero bias, about
            half the pairs global at the start (training from scratch, as a fused router without
            bias is in the released AHA-OLMO2 checkpoint).
        bias: whether to keep a bias vector (the released checkpoint's fused router has none).
    """

    def __init__(self, hidden_size: int, num_heads: int, *, init: RouterInit = "open", bias: bool = True):
        super().__init__()
        if init == "open" and not bias:
            raise ValueError("init='open' needs a bias (a bias-free router with zero weight sits at the threshold)")
        self.proj = nn.Linear(hidden_size, num_heads, bias=bias)
        self.init = init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Re-apply the configured initialisation."""
        with torch.no_grad():
            if self.init == "open":
                self.proj.weight.zero_()
                self.proj.bias.fill_(OPEN_BIAS)
            elif self.init == "random":
                nn.init.normal_(self.proj.weight, std=self.proj.in_features**-0.5)
                if self.proj.bias is not None:
                    self.proj.bias.zero_()
            else:
                raise ValueError(f"unknown router init {self.init!r}; use 'open' or 'random'")

    def forward(self, hidden_states: Tensor) -> Tensor:
        """``[batch, seq, hidden]`` -> logits ``[batch, heads, seq]``."""
        return self.proj(hidden_states).transpose(1, 2)
