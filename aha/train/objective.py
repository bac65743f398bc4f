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


#: Rows (positions) per block of :func:`distillation_sum`: a block's few ``[rows, vocab]`` fp32
#: temporaries stay in cache (32 x 49152 x 4 B = 6 MiB each) instead of whole-batch copies.
DISTILLATION_ROW_BLOCK = 32


def distillation_sum(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """Summed ``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` over the positions that have a target.

    Args:
        student_logits, teacher_logits: ``[batch, seq, vocab]``; only the student's gets a gradient.
        labels: ``[batch, seq]`` next-token labels, ``-100`` where a position has no target.
        temperature: ``T > 0``.

    Returns:
        An fp32 scalar. Computed in blocks of :data:`DISTILLATION_ROW_BLOCK` positions (forward and
        backward), so no ``[positions, vocab]`` temporary is ever materialised: per position
        ``KL = sum_v p_t (log p_t - s) + logsumexp(s)`` with ``s`` the student's scaled logits, and
        its gradient ``T * (softmax(s) - p_t)``.
    """
    if not temperature > 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    student, flat_labels = shift_targets(student_logits, labels)
    teacher, _ = shift_targets(teacher_logits, labels)
    return _BlockwiseDistillation.apply(student, teacher.detach(), flat_labels != IGNORE_INDEX, float(temperature))


class _BlockwiseDistillation(torch.autograd.Function):
    """:func:`distillation_sum` on ``[positions, vocab]`` logits and a ``[positions]`` bool mask of kept positions."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, keep: Tensor, temperature: float) -> Tensor:
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        log_mass = torch.zeros(2, keep.numel(), dtype=torch.float32, device=student.device)  # logsumexp of s and t per position
        blocks = _row_blocks(keep)
        for rows in blocks:
            s, t = _scaled(student, rows, temperature), _scaled(teacher, rows, temperature)
            torch.logsumexp(s, dim=-1, out=log_mass[0, rows])
            torch.logsumexp(t, dim=-1, out=log_mass[1, rows])
            log_p_teacher = t - log_mass[1, rows, None]
            per_position = (log_p_teacher.exp() * (log_p_teacher - s)).sum(-1) + log_mass[0, rows]
            total += per_position[keep[rows]].sum()
        ctx.save_for_backward(student, teacher, keep, log_mass)
        ctx.temperature, ctx.blocks = temperature, blocks
        return total * temperature**2

    @staticmethod
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, None, None, None]:
        student, teacher, keep, log_mass = ctx.saved_tensors
        temperature = ctx.temperature
        grad_student = torch.zeros_like(student)
        scale = grad_total.float() * temperature
        for rows in ctx.blocks:
            p_student = (_scaled(student, rows, temperature) - log_mass[0, rows, None]).exp_()
            p_teacher = (_scaled(teacher, rows, temperature) - log_mass[1, rows, None]).exp_()
            grad_student[rows] = p_student.sub_(p_teacher).mul_(scale * keep[rows, None]).to(student.dtype)
        return grad_student, None, None, None


def _scaled(logits: Tensor, rows: slice, temperature: float) -> Tensor:
    """``logits[rows] / temperature`` in fp32 (a view of fp32 logits at temperature 1: never written to)."""
    block = logits[rows].float()
    return block if temperature == 1.0 else block / temperature


def _row_blocks(keep: Tensor) -> list[slice]:
    """Slices of :data:`DISTILLATION_ROW_BLOCK` positions covering ``keep``'s, skipping blocks with none kept."""
    starts = range(0, keep.numel(), DISTILLATION_ROW_BLOCK)
    kept = [bool(block.any()) for block in keep.split(DISTILLATION_ROW_BLOCK)]
    return [slice(start, start + DISTILLATION_ROW_BLOCK) for start, any_kept in zip(starts, kept) if any_kept]


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
