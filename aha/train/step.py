"""One optimizer step of the AHA objective over the global batch (see :mod:`aha.recipes.finetune`).

Every term is a sum over tokens divided by the token count of the global batch, which each process
knows without communication, so any split over processes and micro-batches gives the same gradient.
The student's forward runs under the step's gate-gradient estimator (:mod:`aha.kernels.gate_estimators`,
``--gate-gradient``); from ``freeze_routes_at`` on, routes are frozen: no gradient reaches the gates,
and the routers' gradients (the sparsity term's) are dropped before the optimizer step.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn

import aha
from aha.data import PackedDataset
from aha.data.passkey import PasskeyMixDataset
from aha.kernels.gate_estimators import GateGradient, gate_gradient
from aha.train.config import TrainConfig
from aha.train.model_setup import router_parameters
from aha.train.objective import (
    LambdaController,
    cross_entropy_sum,
    distillation_sum,
    gate_sums,
)
from aha.train.schedule import BatchSchedule, TrainProgress, collate

if TYPE_CHECKING:
    from accelerate import Accelerator


class Stepper:
    """One optimizer step over the global batch: forward/backward of each micro-batch, clip, step, controller."""

    def __init__(
        self,
        config: TrainConfig,
        accelerator: Accelerator,
        student: nn.Module,
        aha_model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        controller: LambdaController,
        train_set: PackedDataset | PasskeyMixDataset,
        teacher_logits: Callable[[Tensor], Tensor] | None,
    ):
        self.config, self.accelerator = config, accelerator
        self.student, self.aha_model = student, aha_model
        self.optimizer, self.scheduler, self.controller = optimizer, scheduler, controller
        self.train_set, self.teacher_logits = train_set, teacher_logits
        self.schedule = BatchSchedule(len(train_set), config.seed, config.batch_size, config.grad_accum, accelerator.num_processes)
        self.trainable = [p for p in student.parameters() if p.requires_grad]
        self.routers = [p for p in router_parameters(aha_model) if p.requires_grad]
        if config.freeze_step < config.steps and not self.routers:
            raise ValueError(
                "freeze_routes_at freezes the routers' parameters, and this model has no separate aha.Router modules "
                "(its routers are fused into q_proj): drop freeze_routes_at"
            )

    def gate_gradient(self, step: int) -> GateGradient:
        """The gate-gradient estimator of optimizer step ``step + 1`` (``"none"`` once routes are frozen).

        A sampled estimator draws from a generator seeded by ``(seed, step, process)``: a resumed run
        draws the samples the uninterrupted run drew, and processes draw different ones.
        """
        config = self.config
        if step >= config.freeze_step:
            return GateGradient("none")
        generator = None
        if config.gate_gradient == "sampled":
            seed = np.random.SeedSequence([config.seed, step, self.accelerator.process_index]).generate_state(1)[0]
            generator = torch.Generator(self.accelerator.device).manual_seed(int(seed))
        return GateGradient(config.gate_gradient, config.gate_sample_fraction, config.gate_block, generator)

    def _micro_batch(self, indices: np.ndarray, global_targets: int, global_tokens: int, lambda_: float, estimator: GateGradient) -> Tensor:
        """Forward and backward one micro-batch; returns its sums ``[ce, kd, soft gate, global pairs, all pairs]``."""
        config = self.config
        batch = collate(self.train_set, indices, self.accelerator.device)
        teacher = self.teacher_logits(batch["input_ids"]) if self.teacher_logits is not None else None
        with gate_gradient(estimator):
            logits = self.student(input_ids=batch["input_ids"]).logits
        ce = cross_entropy_sum(logits, batch["labels"])
        kd = distillation_sum(logits, teacher, batch["labels"], config.distill_temperature) if teacher is not None else ce.new_zeros(())
        loss = (ce + config.distill * kd) / global_targets
        if config.force_routing is None:
            gates = gate_sums(aha.router_logits(self.aha_model), batch["attention_mask"], config.threshold)
            loss = loss + lambda_ * gates.soft_sum / global_tokens
            gate_row = [gates.soft_sum.detach().double(), gates.global_pairs, gates.total_pairs]
        else:  # forced routes: every head of every real token is global (or none is)
            real = batch["attention_mask"].double().sum()
            forced = real if config.force_routing == "global" else real.new_zeros(())
            gate_row = [forced, forced * self._num_routed_heads(), real * self._num_routed_heads()]
        self.accelerator.backward(loss * self.accelerator.num_processes)  # DDP averages gradients over processes
        return torch.stack([ce.detach().double(), kd.detach().double(), *gate_row])

    def _num_routed_heads(self) -> int:
        return sum(logits.shape[1] for logits in aha.router_logits(self.aha_model))

    def step(self, progress: TrainProgress) -> dict[str, Any]:
        """Take optimizer step ``progress.step + 1``; returns its metrics row (identical on every process)."""
        started = time.perf_counter()
        indices = self.schedule.step_indices(progress.step)
        global_targets = self.train_set.num_targets(indices.ravel())
        global_tokens = self.train_set.num_tokens(indices.ravel())
        lambda_ = self.controller.lambda_
        micro_batches = indices[:, self.accelerator.process_index]
        sums = torch.zeros(5, dtype=torch.float64, device=self.accelerator.device)
        estimator = self.gate_gradient(progress.step)
        for micro, micro_indices in enumerate(micro_batches):
            last = micro == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.student):
                sums += self._micro_batch(micro_indices, global_targets, global_tokens, lambda_, estimator)
        if estimator.name == "none":  # frozen routes: the sparsity term's gradient must not move them either
            for parameter in self.routers:
                parameter.grad = None
        clip = self.config.max_grad_norm
        grad_norm = self.accelerator.clip_grad_norm_(self.trainable, clip) if clip > 0 else None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        ce_sum, kd_sum, soft_sum, global_pairs, total_pairs = self.accelerator.reduce(sums, "sum").tolist()
        achieved = global_pairs / total_pairs if total_pairs else float("nan")
        target = self.controller.current_target
        self.controller.update(min(achieved, soft_sum / global_tokens))
        progress.step += 1
        progress.targets_seen += global_targets
        elapsed = time.perf_counter() - started
        distill = self.config.distill
        return {
            "kind": "train",
            "step": progress.step,
            "loss": (ce_sum + distill * kd_sum) / global_targets + lambda_ * soft_sum / global_tokens,
            "ce": ce_sum / global_targets,
            "kd": kd_sum / global_targets,
            "soft_gate": soft_sum / global_tokens,
            "global_fraction": achieved,
            "target_global": target,
            "lambda": lambda_,
            **{f"lr_{group['name']}": group["lr"] for group in self.optimizer.param_groups},
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "targets_seen": progress.targets_seen,
            "tokens_per_s": global_tokens / elapsed,
            "seconds": elapsed,
        }
