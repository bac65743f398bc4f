"""The training objective: next-token cross-entropy, optional distillation, and the sparsity penalty
on the routers' soft gates with a budget controller for lambda.

All terms are returned as **sums** over the micro-batch; the trainer divides by counts over the whole
global batch (every process, every micro-batch), so gradient accumulation and data parallelism give
the same gradient as one big batch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from aha.data import IGNORE_INDEX


def shift_targets(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align ``logits [B, S, V]`` with next-token ``labels [B, S]``: ``([B*(S-1), V], [B*(S-1)])``."""
    return logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Summed next-token cross-entropy over targets (labels ``-100`` are ignored); fp32 scalar."""
    flat_logits, flat_labels = shift_targets(logits, labels)
    return F.cross_entropy(flat_logits.float(), flat_labels, ignore_index=IGNORE_INDEX, reduction="sum")


def distillation_sum(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Summed ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the positions that have a target."""
    student, flat_labels = shift_targets(student_logits, labels)
    teacher, _ = shift_targets(teacher_logits, labels)
    keep = flat_labels != IGNORE_INDEX
    log_p_student = F.log_softmax(student[keep].float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher[keep].float() / temperature, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="sum")
    return kl * temperature**2


@dataclass
class GateSums:
    """Router gate sums over a micro-batch's real tokens.

    ``soft_sum`` (differentiable): sum over real tokens of the mean over layers and heads of
    ``g_soft = sigmoid(logit)``; divided by the number of real tokens it is the paper's
    ``mean(g_soft)``. ``global_pairs`` / ``total_pairs``: hard global (token, layer, head) decisions
    and all decisions (exact integers, as float64 tensors so processes can sum them).
    """

    soft_sum: Tensor
    global_pairs: Tensor
    total_pairs: Tensor


def gate_sums(router_logits: Sequence[Tensor], token_mask: Tensor, threshold: float) -> GateSums:
    """Sum the gates of every converted layer over real tokens.

    Args:
        router_logits: per layer ``[B, H, S]`` logits from the last forward (``aha.router_logits``).
        token_mask: ``[B, S]``, 1 for real tokens, 0 for padding (padding is excluded).
        threshold: the routing threshold (global when ``sigmoid(logit) > threshold``).
    """
    if not router_logits:
        raise ValueError("the model has no router logits; was it converted with aha.convert and run forward?")
    soft = torch.stack([torch.sigmoid(logits.float()).mean(1) for logits in router_logits]).mean(0)  # [B, S]
    hard = torch.stack([(torch.sigmoid(logits.detach().float()) > threshold).double().sum(1) for logits in router_logits]).sum(0)
    heads = sum(logits.shape[1] for logits in router_logits)
    return GateSums(
        soft_sum=(soft * token_mask.float()).sum(),
        global_pairs=(hard * token_mask.double()).sum(),
        total_pairs=token_mask.double().sum() * heads,
    )


class LambdaController:
    """Adapts the sparsity weight lambda so the global fraction meets a target.

    A proportional-integral controller on ``log(lambda)`` (a PID Lagrangian, Stooke et al. 2020, in log
    space because useful lambdas span orders of magnitude)::

        error = measured - target
        integral += rate * error
        lambda = clamp(exp(integral + gain * error), min_lambda, max_lambda)

    ``integral`` starts at ``log(lambda_init)``. The trainer passes ``min(hard fraction, mean(g_soft))``.
    The soft mean alone overstates once gates sit just below the threshold (routes already local, yet
    lambda keeps climbing and drives the model's loss up); the hard fraction alone stays at 1 while open
    routers drift toward the threshold, so an integral on it winds up and then slams most gates shut.
    The smaller of the two is at target only when the routes are. For the same reason the target ramps
    linearly from 1 to ``target`` over the first ``ramp_steps`` updates: a step from all-global to a
    small budget is a large error, and the proportional term would turn it into a lambda spike. Plain
    dual ascent (``gain = 0``) overshoots (Adam keeps the router logits moving while lambda exceeds a
    gate's usefulness); the proportional term damps that. Without a target lambda stays at ``lambda_init``.
    The state is checkpointed through :meth:`state_dict`.
    """

    def __init__(
        self,
        lambda_init: float,
        target: float | None = None,
        rate: float = 0.1,
        gain: float = 5.0,
        min_lambda: float = 1e-8,
        max_lambda: float = 1e4,
        ramp_steps: int = 0,
    ):
        self.lambda_ = float(lambda_init)
        self.integral = math.log(lambda_init) if lambda_init > 0 else float("-inf")
        self.target = target
        self.rate = rate
        self.gain = gain
        self.min_lambda = min_lambda
        self.max_lambda = max_lambda
        self.ramp_steps = ramp_steps
        self.updates = 0

    @property
    def current_target(self) -> float | None:
        """The target of the next update: ramps linearly from 1 to ``target`` over ``ramp_steps`` updates."""
        if self.target is None:
            return None
        progress = min(1.0, (self.updates + 1) / self.ramp_steps) if self.ramp_steps > 0 else 1.0
        return 1.0 - (1.0 - self.target) * progress

    def update(self, measured: float) -> float:
        """Take one step given this step's measured global fraction; returns the new lambda."""
        if self.target is not None and math.isfinite(measured):
            error = measured - self.current_target
            self.updates += 1
            self.integral = min(math.log(self.max_lambda), max(math.log(self.min_lambda), self.integral + self.rate * error))
            self.lambda_ = min(self.max_lambda, max(self.min_lambda, math.exp(self.integral + self.gain * error)))
        return self.lambda_

    def state_dict(self) -> dict[str, float]:
        return {"lambda": self.lambda_, "integral": self.integral, "updates": self.updates}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.lambda_, self.integral, self.updates = float(state["lambda"]), float(state["integral"]), int(state["updates"])
