"""The AHA fine-tuning loop: teach a pretrained causal LM when to attend globally.

Objective per optimizer step, over the whole global batch (all processes, all micro-batches)::

    loss = CE + distill * KD + lambda * mean(g_soft)

* ``CE``: next-token cross-entropy averaged over target tokens (padding excluded).
* ``KD``: ``T^2 * KL(teacher || student)`` averaged over target tokens, teacher = the original model
  (every head global). With frozen base weights (``trainable`` = routers / LoRA) the teacher is the
  student itself under ``aha.force_routing(..., "global")`` (LoRA adapters disabled), which *is* the
  original model, so no second copy is held. With ``trainable="all"`` the student's weights drift,
  so a frozen copy of the original is kept (one extra set of weights, no optimizer state).
* ``mean(g_soft)``: ``sigmoid(router logit)`` averaged over real tokens, layers and heads (the paper's
  L1 on the soft gates). The forward pass routes with the exact binary STE gate.
* ``lambda`` is fixed, or adapted by :class:`~aha.train.objective.LambdaController` to meet
  ``target_global``.

Every term is a sum over tokens divided by the token count of the global batch, which each process
knows without communication (the batch schedule is a pure function of seed and step), so any split
over processes and micro-batches gives the same gradient.

Resume is exact: a checkpoint holds the model, optimizer, scheduler, per-process RNG states, the
lambda controller and the step; data order is a function of ``(seed, step)``, so a resumed run
feeds exactly the batches the uninterrupted run would have.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import math
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

import aha
from aha.data import DataSplits, PackedDataset, build_datasets
from aha.data.passkey import PasskeyMixDataset
from aha.train.checkpoint import list_checkpoints, load_newest_intact, save_checkpoint
from aha.train.config import TrainConfig, differing_fields, save_config
from aha.train.objective import (
    LambdaController,
    cross_entropy_sum,
    distillation_sum,
    gate_sums,
)

#: LoRA adapts these projections. ``q_proj`` is left out: in a converted model it is the routed
#: query projection that also computes the router logits (wrapping it would hide the router).
LORA_TARGET_MODULES = ("k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: Train-set rows averaged for the reported achieved global fraction.
ACHIEVED_WINDOW_STEPS = 20


@dataclass
class TrainProgress:
    """Checkpointed counters: optimizer steps taken and target tokens consumed."""

    step: int = 0
    targets_seen: int = 0

    def state_dict(self) -> dict[str, int]:
        return asdict(self)

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.step, self.targets_seen = int(state["step"]), int(state["targets_seen"])


class BatchSchedule:
    """Which training sequences each process uses at each step: a pure function of ``(seed, step)``.

    The sequences form an endless stream, one seeded permutation per epoch. Step ``s`` takes stream
    positions ``[s*G, (s+1)*G)`` with ``G = batch_size * grad_accum * num_processes``, laid out as
    ``[grad_accum, num_processes, batch_size]``: process ``r`` uses ``[:, r, :]``.
    """

    def __init__(self, num_sequences: int, seed: int, batch_size: int, grad_accum: int, num_processes: int):
        if num_sequences < 1:
            raise ValueError("no training sequences")
        self.num_sequences = num_sequences
        self.seed = seed
        self.shape = (grad_accum, num_processes, batch_size)
        self._epoch_orders: dict[int, np.ndarray] = {}

    @property
    def global_batch(self) -> int:
        return int(np.prod(self.shape))

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._epoch_orders:  # keep the previous epoch: a step may straddle two
            self._epoch_orders = {e: o for e, o in self._epoch_orders.items() if e == epoch - 1}
            self._epoch_orders[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.num_sequences)
        return self._epoch_orders[epoch]

    def step_indices(self, step: int) -> np.ndarray:
        """Sequence indices of step ``step``, int64 ``[grad_accum, num_processes, batch_size]``."""
        positions = np.arange(step * self.global_batch, (step + 1) * self.global_batch)
        epochs, offsets = np.divmod(positions, self.num_sequences)
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            indices[in_epoch] = self._order(int(epoch))[offsets[in_epoch]]
        return indices.reshape(self.shape)


@dataclass
class TrainResult:
    """What :func:`train` returns (on every process).

    ``model``: the trained model, unwrapped (LoRA merged), in eval mode. ``history``: the train rows
    logged by this call. ``evaluation``: the final held-out evaluation (None when disabled).
    ``achieved_global``: mean global fraction of the last training steps.
    """

    out: Path
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    achieved_global: float = float("nan")


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's :class:`aha.Router` modules (the ``"separate"`` router layout)."""
    return [p for module in model.modules() if isinstance(module, aha.Router) for p in module.parameters()]


def _collate(dataset: PackedDataset | PasskeyMixDataset, indices: Sequence[int], device: torch.device) -> dict[str, Tensor]:
    items = [dataset[int(i)] for i in indices]
    return {key: torch.stack([item[key] for item in items]).to(device) for key in items[0]}


def _mixed_precision(precision: str) -> str:
    if precision == "bf16":
        return "bf16"
    if precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def _prepare_model(config: TrainConfig, model: nn.Module) -> nn.Module:
    """Convert (unless the model already is an AHA model, then check it matches the config).

    Fresh open routers get ``config.open_router_bias``: zero weight, so every head starts global and the
    converted model still equals the original.
    """
    wanted = config.routing
    if aha.is_aha_model(model):
        aha.AhaSettings.of(model.config).check_matches(
            config.model,
            "pass the same --window, --sink and --threshold to continue training it",
            window=wanted.window, sink=wanted.sink, threshold=wanted.threshold,
        )
        return model
    aha.convert(model, window=wanted.window, sink=wanted.sink, threshold=wanted.threshold, router_init=wanted.router_init)
    if config.router_init == "open":
        with torch.no_grad():
            for router in (m for m in model.modules() if isinstance(m, aha.Router)):
                router.proj.bias.fill_(config.open_router_bias)
    return model


def _configure_trainable(config: TrainConfig, model: nn.Module) -> nn.Module:
    """Set ``requires_grad`` per ``config.trainable``; returns the model to optimise (a PEFT wrapper for LoRA)."""
    routers = router_parameters(model)
    if not routers and config.trainable == "routers":
        raise ValueError("trainable='routers' needs separate routers (aha.Router modules); this model's routers are fused into q_proj")
    if config.trainable == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=list(LORA_TARGET_MODULES), lora_dropout=0.0)
        model = get_peft_model(model, lora)  # freezes every non-LoRA parameter
    else:
        for p in model.parameters():
            p.requires_grad_(config.trainable == "all")
    for p in routers:
        p.requires_grad_(config.force_routing is None)  # forced routes give routers no gradient
    return model


def _param_groups(config: TrainConfig, model: nn.Module, routers: list[nn.Parameter]) -> list[dict[str, Any]]:
    router_ids = {id(p) for p in routers}
    trainable_routers = [p for p in routers if p.requires_grad]
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in router_ids]
    groups = [
        {"name": "model", "params": others, "lr": config.lr, "weight_decay": config.weight_decay},
        {"name": "routers", "params": trainable_routers, "lr": config.router_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _read_rows(path: Path) -> list[str]:
    """The JSON lines of a metrics file, without a torn (unparseable) last line."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return lines


class MetricsLog:
    """Rows of metrics: JSONL at ``path`` (main process), TensorBoard under ``tb/`` when installed."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if path.exists():
            # the killed run may have logged steps after its last checkpoint (all of them when it
            # had none), and a kill mid-write leaves a torn last line: the steps are redone
            rows = [line for line in _read_rows(path) if resume_step is not None and json.loads(line)["step"] <= resume_step]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(f"{row}\n" for row in rows))
            tmp.replace(path)
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path.parent / "tb"), purge_step=resume_step)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _teacher(config: TrainConfig, aha_model: nn.Module, student: nn.Module, accelerator: Accelerator) -> Callable[[Tensor], Tensor] | None:
    """A function ``input_ids -> teacher logits`` (the original model), or None without distillation."""
    if config.distill <= 0:
        return None
    if config.trainable == "all":
        frozen = copy.deepcopy(aha_model).requires_grad_(False).eval().to(accelerator.device)
        teacher_model, routed_model = frozen, frozen
    else:
        teacher_model, routed_model = student, aha_model

    def logits(input_ids: Tensor) -> Tensor:
        adapters_off = student.disable_adapter() if config.trainable == "lora" else contextlib.nullcontext()
        with torch.no_grad(), accelerator.autocast(), adapters_off, aha.force_routing(routed_model, "global"):
            return teacher_model(input_ids=input_ids).logits

    return logits


def evaluate(
    model: nn.Module,
    aha_model: nn.Module,
    dataset: PackedDataset,
    indices: Sequence[int],
    *,
    batch_size: int,
    accelerator: Accelerator,
) -> dict[str, Any]:
    """Held-out perplexity and routing with hard routes (eval mode), split over processes.

    Args:
        model: the model to run (``aha_model`` itself, or a PEFT wrapper around it); not DDP-wrapped.
        aha_model: the converted model whose routes are recorded (forced routes count as used).
        dataset, indices: the sequences to evaluate.

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
            batch = _collate(dataset, mine[start : start + batch_size], accelerator.device)
            # the padding mask only serves the routing statistics: right padding never reaches a real token
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            ce += cross_entropy_sum(logits, batch["labels"]).double()
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


class _Stepper:
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

    def _micro_batch(self, indices: np.ndarray, global_targets: int, global_tokens: int, lambda_: float) -> Tensor:
        """Forward and backward one micro-batch; returns its sums ``[ce, kd, soft gate, global pairs, all pairs]``."""
        config = self.config
        batch = _collate(self.train_set, indices, self.accelerator.device)
        teacher = self.teacher_logits(batch["input_ids"]) if self.teacher_logits is not None else None
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
        for micro, micro_indices in enumerate(micro_batches):
            last = micro == len(micro_batches) - 1
            with contextlib.nullcontext() if last else self.accelerator.no_sync(self.student):
                sums += self._micro_batch(micro_indices, global_targets, global_tokens, lambda_)
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

class GracefulInterrupt:
    """Turn the first Ctrl-C (SIGINT) into a request to stop at the next step boundary.

    The trainer checks :meth:`requested` after every optimizer step, saves a checkpoint and raises
    :class:`KeyboardInterrupt`, so an interrupted run resumes exactly where it stopped. A second
    Ctrl-C aborts at once (the last checkpoint still resumes). Outside the main thread signals
    cannot be caught and this does nothing.
    """

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator
        self._flag = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self._flag:
            raise KeyboardInterrupt
        self._flag = True
        self.accelerator.print("\naha train: stopping after this step and saving a checkpoint (Ctrl-C again to abort)")

    def __enter__(self) -> GracefulInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def requested(self) -> bool:
        """True when any process got a Ctrl-C (a collective call when several processes run)."""
        if self.accelerator.num_processes == 1:
            return self._flag
        flag = torch.tensor([float(self._flag)], device=self.accelerator.device)
        return bool(self.accelerator.reduce(flag, "max").item())


def _eval_indices(config: TrainConfig, heldout: PackedDataset) -> np.ndarray:
    order = np.random.default_rng([config.seed, 1]).permutation(len(heldout))
    return np.sort(order[: config.eval_sequences])


def _check_resume(config: TrainConfig, out: Path) -> bool:
    """Whether ``out`` holds checkpoints to resume (of a run with the same config)."""
    checkpoints = list_checkpoints(out / "checkpoints")
    saved_config = out / "config.yaml"
    if checkpoints and saved_config.exists():
        changed = differing_fields(yaml.safe_load(saved_config.read_text()), config)
        if changed:
            raise ValueError(
                f"{out} holds a run with a different config ({', '.join(changed)} differ); resume it with the same "
                "settings, or pass a new --out"
            )
    return bool(checkpoints)


def train(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    data: DataSplits | None = None,
) -> TrainResult:
    """Fine-tune a causal LM with AHA routing (see the module docstring); resumes from ``config.out`` if it holds checkpoints.

    Run it directly or under ``accelerate launch`` (DDP over processes, no code change).

    Args:
        config: the run's settings.
        model: a pretrained causal LM (plain, it gets converted; or already AHA). Default: loaded
            with ``aha.load_model(config.model)``. Must be freshly loaded (not trained) when resuming.
        tokenizer: its tokenizer (needed to build data from ``config.data`` and to save the result).
        data: pre-built train / held-out sequences; default :func:`aha.data.build_datasets` on ``config.data``.

    Returns:
        A :class:`TrainResult`. Files under ``config.out``: ``config.yaml``, ``metrics.jsonl``
        (``kind`` = train / eval rows), ``checkpoints/step-*``, ``model/`` (the final model, loadable
        with ``aha.load_model``) and ``summary.json``.
    """
    accelerator = Accelerator(mixed_precision=_mixed_precision(config.precision), step_scheduler_with_optimizer=False)
    out = Path(config.out)
    resume = _check_resume(config, out)
    set_seed(config.seed)
    if model is None:
        model, tokenizer = aha.load_model(config.model, dtype=torch.float32)
    if data is None:
        if tokenizer is None:
            raise ValueError("pass the tokenizer (or pre-built data) along with the model")
        with accelerator.main_process_first():
            data = build_datasets(
                config.data,
                tokenizer,
                seq_len=config.seq_len,
                heldout_fraction=config.heldout_fraction,
                text_field=config.text_field,
                min_doc_tokens=config.min_doc_tokens,
            )
    if data.train.seq_len != config.seq_len:
        raise ValueError(f"data was packed at seq_len={data.train.seq_len}, config says {config.seq_len}")
    train_set: PackedDataset | PasskeyMixDataset = data.train
    if config.passkey_mix > 0:
        if tokenizer is None:
            raise ValueError("passkey_mix builds prompts with the tokenizer; pass it along with the model")
        train_set = PasskeyMixDataset(data.train, tokenizer, config.passkey_mix, seed=config.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")

    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and config.seq_len > max_positions:
        warnings.warn(
            f"--seq-len {config.seq_len} exceeds the model's max_position_embeddings ({max_positions}): positions "
            "past it were never trained and quality usually drops; lower --seq-len unless that is the point",
            stacklevel=2,
        )
    aha_model = _prepare_model(config, model)
    routers = router_parameters(aha_model)
    student = _configure_trainable(config, aha_model)
    teacher_logits = _teacher(config, aha_model, student, accelerator)
    optimizer = torch.optim.AdamW(_param_groups(config, student, routers))
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    controller = LambdaController(
        config.lambda_init,
        config.target_global,
        rate=config.lambda_lr,
        gain=config.lambda_gain,
        ramp_steps=round(config.target_ramp * config.steps),
    )
    progress = TrainProgress()
    resumed = load_newest_intact(accelerator, out / "checkpoints", report=accelerator.print) if resume else None
    if resumed is not None:
        path, state = resumed
        controller.load_state_dict(state["controller"])
        progress.load_state_dict(state["progress"])
        accelerator.print(f"resumed from {path} (step {progress.step})")
    log = MetricsLog(out / "metrics.jsonl", progress.step if resumed else None, accelerator.is_main_process)

    def trainer_state() -> dict[str, Any]:
        return {"controller": controller.state_dict(), "progress": progress.state_dict()}


    stepper = _Stepper(config, accelerator, student, aha_model, optimizer, scheduler, controller, train_set, teacher_logits)
    accelerator.print(
        f"aha train: {accelerator.num_processes} process(es), {accelerator.distributed_type.value}, device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}; {len(train_set)} train / {len(data.heldout)} held-out sequences "
        f"of {config.seq_len} tokens, {stepper.schedule.global_batch} per step"
    )
    eval_indices = _eval_indices(config, data.heldout) if config.eval_every >= 0 and len(data.heldout) else None

    def run_eval() -> dict[str, Any]:
        # the unwrapped model: processes may hold different numbers of eval batches, and DDP forwards are collective
        unwrapped = accelerator.unwrap_model(student)
        result = evaluate(unwrapped, aha_model, data.heldout, eval_indices, batch_size=config.batch_size, accelerator=accelerator)
        log.write({"kind": "eval", "step": progress.step, **{k: v for k, v in result.items() if k != "per_layer"}})
        return result

    history: list[dict[str, Any]] = []
    show_bar = config.progress and accelerator.is_local_main_process
    with contextlib.ExitStack() as stack:
        stack.enter_context(aha.force_routing(aha_model, config.force_routing))  # None: the learned routes
        if eval_indices is not None and config.eval_every > 0 and resumed is None:
            run_eval()  # the starting point: with open routers, the original model
        student.train()
        bar = tqdm(total=config.steps, initial=progress.step, desc="aha train", disable=not show_bar, dynamic_ncols=True)
        interrupt = stack.enter_context(GracefulInterrupt(accelerator))
        while progress.step < config.steps:
            row = stepper.step(progress)
            history.append(row)
            log.write(row)
            if not math.isfinite(row["loss"]):
                bar.close()
                log.close()
                kept = list_checkpoints(out / "checkpoints")
                raise FloatingPointError(
                    f"aha train: the loss became {row['loss']} at step {progress.step}; stopped without saving. "
                    + (f"The last good checkpoint, {kept[-1]}, is kept. " if kept else "No checkpoint was saved yet. ")
                    + "Lower --lr / --router-lr or --lambda-init, or check the data for empty or broken documents."
                )
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", glob=f"{row['global_fraction']:.3f}", lam=f"{row['lambda']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            at_end = progress.step == config.steps
            if eval_indices is not None and config.eval_every > 0 and progress.step % config.eval_every == 0 and not at_end:
                run_eval()
            stop = interrupt.requested()
            if (config.checkpoint_every > 0 and progress.step % config.checkpoint_every == 0) or at_end or stop:
                save_checkpoint(accelerator, out / "checkpoints", progress.step, config.keep_checkpoints, trainer_state())
            if stop and not at_end:
                bar.close()
                log.close()
                raise KeyboardInterrupt(f"stopped at step {progress.step}; run the same command again to resume")
        bar.close()
        evaluation = run_eval() if eval_indices is not None else None

    recent = [r["global_fraction"] for r in history[-ACHIEVED_WINDOW_STEPS:]]
    achieved_global = float(np.mean(recent)) if recent else float("nan")
    final_model = accelerator.unwrap_model(student)
    if config.trainable == "lora":
        final_model = final_model.merge_and_unload()
    final_model.eval()
    if accelerator.is_main_process:
        final_model.save_pretrained(out / "model")
        if tokenizer is not None:
            tokenizer.save_pretrained(out / "model")
        summary = {
            "steps": progress.step,
            "achieved_global_fraction_train": achieved_global,
            "final_lambda": controller.lambda_,
            "evaluation": evaluation,
            "data": data.summary,
            "config": config.to_dict(),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.close()
    accelerator.wait_for_everyone()
    return TrainResult(out=out, model=final_model, history=history, evaluation=evaluation, achieved_global=achieved_global)


def iter_metrics(out: str | Path, kind: str = "train") -> Iterator[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` in a run folder, of one ``kind`` (``"train"`` or ``"eval"``)."""
    for line in _read_rows(Path(out) / "metrics.jsonl"):
        row = json.loads(line)
        if row["kind"] == kind:
            yield row
