"""The AHA fine-tuning recipe (``aha train``): teach a pretrained causal LM when to attend globally.

Objective per optimizer step, over the whole global batch (all processes, all micro-batches)::

    loss = CE + distill * KD + lambda * mean(g_soft)

* ``CE``: next-token cross-entropy averaged over target tokens (padding excluded).
* ``KD``: ``T^2 * KL(teacher || student)`` averaged over target tokens, teacher = the original model
  (every head global). With frozen base weights (``trainable`` = routers / LoRA) the teacher is the
  student itself under ``aha.force_routing(..., "global")`` (LoRA adapters disabled), which *is* the
  original model, so no second copy is held. With ``trainable="all"`` the student's weights drift,
  so a frozen copy of the original is kept (one extra set of weights, no optimizer state).
* ``mean(g_soft)``: ``sigmoid(router logit)`` averaged over real tokens, layers and heads (the paper's
  L1 on the soft gates). The forward pass routes with the exact binary STE gate; its gradient
  ``full - local`` is exact (``gate_gradient='ste'``, full attention for every pair each step) or
  estimated at less cost (``'sampled'``, ``'compressed'``: :mod:`aha.kernels.gate_estimators`), and
  ``freeze_routes_at`` stops training the routes for the rest of the run (the routed pass alone).
* ``lambda`` is fixed, or adapted by :class:`~aha.train.objective.LambdaController` to meet
  ``target_global``.

Every term is a sum over tokens divided by the token count of the global batch, which each process
knows without communication (the batch schedule is a pure function of seed and step), so any split
over processes and micro-batches gives the same gradient.

Resume is exact: a checkpoint holds the model, optimizer, scheduler, per-process RNG states, the
lambda controller and the step; data order, the sampled gate gradient's samples and the route freeze
are functions of ``(seed, step)``, so a resumed run feeds exactly the batches (and draws the samples)
the uninterrupted run would have.

The recipe composes the components of :mod:`aha.train`: the model setup (:mod:`~aha.train.model_setup`),
the objective (:mod:`~aha.train.objective`, one optimizer step in :mod:`~aha.train.step`), the batch
schedule (:mod:`~aha.train.schedule`), checkpoints (:mod:`~aha.train.checkpoint`), the metrics log
(:mod:`~aha.train.metrics`), the held-out evaluation (:mod:`~aha.train.heldout`) and Ctrl-C handling
(:mod:`~aha.train.interrupt`); it writes the run folder's ``summary.json``.
"""


from __future__ import annotations

import contextlib
import math
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

import aha
from aha._optional import reraise_missing

try:
    from accelerate import Accelerator
    from accelerate.utils import broadcast_object_list, set_seed
except ImportError as error:
    raise reraise_missing(error, "aha train (the fine-tuning recipe)") from error

from aha._cache import write_text_atomically
from aha.data import DataSplits, PackedDataset, build_datasets
from aha.data.passkey import PasskeyMixDataset
from aha.report.provenance import run_meta, strict_json
from aha.train.checkpoint import (
    check_resume,
    checkpoint_name,
    disk_full_reported,
    list_checkpoints,
    load_newest_intact,
    replace_folder,
    save_checkpoint,
    staging_folder,
)
from aha.train.config import TrainConfig, save_config
from aha.train.heldout import evaluate
from aha.train.interrupt import GracefulInterrupt
from aha.train.metrics import MetricsLog, iter_metrics
from aha.train.model_setup import (
    configure_trainable,
    param_groups,
    prepare_model,
    router_parameters,
    teacher,
)
from aha.train.objective import LambdaController
from aha.train.router_labels import full_length_sequences, warm_start_routers
from aha.train.schedule import TrainProgress, eval_indices
from aha.train.sharding import (
    is_sharded,
    make_accelerator,
    merged_lora_model,
    only_main_process_reads_weights,
    save_final_model,
)
from aha.train.step import Stepper

#: Train-set rows averaged for the reported achieved global fraction: the run's last steps.
ACHIEVED_WINDOW_STEPS = 20


@dataclass
class TrainResult:
    """What :func:`train` returns (on every process).

    ``model``: the trained model, unwrapped (LoRA merged), in eval mode; under FSDP each process holds
    its shard (``model/`` on disk is the consolidated one), except with LoRA, where the main process
    holds the merged, unsharded model. ``history``: the train rows
    logged by this call. ``evaluation``: the final held-out evaluation (None when disabled).
    ``achieved_global``: mean global fraction of the run's last :data:`ACHIEVED_WINDOW_STEPS` training
    steps, steps before a resume included (NaN when ``metrics.jsonl`` holds none).
    """

    out: Path
    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    evaluation: dict[str, Any] | None = None
    achieved_global: float = float("nan")


def _training_data(config: TrainConfig, tokenizer: Any, data: DataSplits | None, accelerator: Accelerator) -> tuple[DataSplits, PackedDataset | PasskeyMixDataset]:
    """The run's packed train / held-out sequences (built from ``config.data`` unless given) and the train set (with the passkey mix)."""
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
    return data, train_set


def _warn_beyond_positions(config: TrainConfig, model: nn.Module) -> None:
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and config.seq_len > max_positions:
        warnings.warn(
            f"--seq-len {config.seq_len} exceeds the model's max_position_embeddings ({max_positions}): positions "
            "past it were never trained and quality usually drops; lower --seq-len unless that is the point",
            stacklevel=3,
        )


def build_stepper(config: TrainConfig, accelerator: Accelerator, aha_model: nn.Module, train_set: PackedDataset | PasskeyMixDataset) -> Stepper:
    """What trains and how, ready to take optimizer steps: the student (trainable parameters set by
    ``config.trainable``), the distillation teacher, AdamW over the model and router groups with the
    warmup + cosine schedule (prepared by ``accelerator``) and the budget controller."""
    routers = router_parameters(aha_model)
    student = configure_trainable(config, aha_model)
    teacher_logits = teacher(config, aha_model, student, accelerator)
    optimizer = torch.optim.AdamW(param_groups(config, student, routers))
    scheduler = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    student, optimizer, scheduler = accelerator.prepare(student, optimizer, scheduler)
    controller = LambdaController(
        config.lambda_init,
        config.target_global,
        rate=config.lambda_lr,
        gain=config.lambda_gain,
        ramp_steps=round(config.target_ramp * config.steps),
    )
    return Stepper(config, accelerator, student, aha_model, optimizer, scheduler, controller, train_set, teacher_logits)


def _non_finite_loss(row: dict[str, Any], progress: TrainProgress, out: Path) -> FloatingPointError:
    kept = list_checkpoints(out / "checkpoints")
    return FloatingPointError(
        f"aha train: the loss became {row['loss']} at step {progress.step}; stopped without saving. "
        + (f"The last good checkpoint, {kept[-1]}, is kept. " if kept else "No checkpoint was saved yet. ")
        + "Lower --lr / --router-lr or --lambda-init, or check the data for empty or broken documents."
    )


def _achieved_global(accelerator: Accelerator, out: Path) -> tuple[float, list[int]]:
    """The mean train global fraction of the run's last :data:`ACHIEVED_WINDOW_STEPS` steps, and those steps.

    Read from ``metrics.jsonl`` (by the main process, which writes it; the others receive the result),
    so a resumed run counts the steps logged before the resume; a row whose fraction was not finite
    (written as null) is left out. NaN and no steps when the log holds no such row.
    """
    found: list[Any] = [float("nan"), []]
    if accelerator.is_main_process and (out / "metrics.jsonl").exists():
        rows = [row for row in iter_metrics(out, "train") if isinstance(row.get("global_fraction"), (int, float))]
        recent = rows[-ACHIEVED_WINDOW_STEPS:]
        if recent:
            found = [math.fsum(row["global_fraction"] for row in recent) / len(recent), [row["step"] for row in recent]]
    broadcast_object_list(found)
    return found[0], found[1]


def _summary(config: TrainConfig, progress: TrainProgress, controller: LambdaController, achieved: tuple[float, list[int]],
             evaluation: dict[str, Any] | None, data: DataSplits) -> dict[str, Any]:
    """The run's ``summary.json``: final held-out evaluation, achieved global fraction (and the steps it
    averages, or why it is undefined), data, config, and where it ran (``meta``: commit, command, seed,
    machine, versions; :func:`aha.report.provenance.run_meta`)."""
    achieved_global, steps = achieved
    averaged: dict[str, Any] = (
        {"achieved_global_fraction_steps": {"first": steps[0], "last": steps[-1], "count": len(steps)}}
        if steps
        else {"achieved_global_fraction_undefined": "metrics.jsonl holds no train row with a finite global fraction"}
    )
    return {
        "steps": progress.step,
        "achieved_global_fraction_train": achieved_global if steps else None,
        **averaged,
        "final_lambda": controller.lambda_,
        "evaluation": evaluation,
        "data": data.summary,
        "config": config.to_dict(),
        "meta": run_meta(seed=config.seed),
    }


def _lora_student(config: TrainConfig) -> nn.Module:
    """A fresh unsharded LoRA student of ``config`` (base model loaded from ``config.model``), to merge trained adapters into."""
    model, _ = aha.load_model(config.model, dtype=torch.float32)
    return configure_trainable(config, prepare_model(config, model))


def train(
    config: TrainConfig,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    data: DataSplits | None = None,
) -> TrainResult:
    """Fine-tune a causal LM with AHA routing (see the module docstring); resumes from ``config.out`` if it holds checkpoints.

    Run it directly or under ``accelerate launch``: DDP over processes, or FSDP2 with
    ``--use_fsdp --fsdp_version 2`` (see :mod:`aha.train.sharding`), no code change.

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
    accelerator = make_accelerator(config)
    if model is not None and config.trainable == "lora" and is_sharded(accelerator):
        raise ValueError(
            "LoRA under FSDP merges the adapters into a copy of the model loaded from config.model at the end: "
            "pass config.model (a name or folder) instead of a model object"
        )
    out = Path(config.out)
    resume = check_resume(config, out, accelerator.num_processes)
    set_seed(config.seed)
    main_reads_weights = only_main_process_reads_weights(accelerator)
    empty = model is None and main_reads_weights and not accelerator.is_main_process
    if model is None:
        model, tokenizer = aha.load_model(config.model, dtype=torch.float32, weights=not empty)
        if main_reads_weights:
            accelerator.print("aha train: the main process reads the weights, the others build the model empty and receive theirs as it is sharded")
    data, train_set = _training_data(config, tokenizer, data, accelerator)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        save_config(config, out / "config.yaml")
    _warn_beyond_positions(config, model)

    # the model, what trains, the teacher, the optimizer
    aha_model = prepare_model(config, model)
    # a resumed run restores its routers from the checkpoint; an empty model gets them from the main process
    if config.router_warm_start and not resume and not empty:
        sequences = full_length_sequences(data.train, config.router_warm_start, seed=config.seed)
        fitted = warm_start_routers(aha_model, sequences, config.warm_start_fraction)
        fractions = ", ".join(f"{layer['fitted']:.2f}" for layer in fitted["layers"])
        accelerator.print(f"routers warm-started on {len(sequences)} sequences; global fraction per layer: {fractions}")
    stepper = build_stepper(config, accelerator, aha_model, train_set)
    student, controller = stepper.student, stepper.controller

    # resume, metrics log
    progress = TrainProgress()
    resumed = load_newest_intact(accelerator, out / "checkpoints", report=accelerator.print) if resume else None
    if resumed is not None:
        path, state = resumed
        controller.load_state_dict(state["controller"])
        progress.load_state_dict(state["progress"])
        accelerator.print(f"resumed from {path} (step {progress.step})")
    log = MetricsLog(out / "metrics.jsonl", progress.step if resumed else None, accelerator.is_main_process)

    def trainer_state() -> dict[str, Any]:
        return {"controller": controller.state_dict(), "progress": progress.state_dict(), "num_processes": accelerator.num_processes}

    accelerator.print(
        f"aha train: {accelerator.num_processes} process(es), {accelerator.distributed_type.value}, device {accelerator.device}, "
        f"mixed precision {accelerator.mixed_precision}; {len(train_set)} train / {len(data.heldout)} held-out sequences "
        f"of {config.seq_len} tokens, {stepper.schedule.global_batch} per step"
    )
    heldout_indices = (
        eval_indices(config.seed, len(data.heldout), config.eval_sequences) if config.eval_every >= 0 and len(data.heldout) else None
    )

    def run_eval() -> dict[str, Any]:
        # the unwrapped model: processes may hold different numbers of eval batches, and DDP forwards are collective
        # (a sharded model's forwards are collectives whatever the wrapper: evaluate runs them in lockstep)
        unwrapped = accelerator.unwrap_model(student)
        result = evaluate(unwrapped, aha_model, data.heldout, heldout_indices, batch_size=config.batch_size, accelerator=accelerator,
                          lockstep=is_sharded(accelerator))
        log.write({"kind": "eval", "step": progress.step, **{k: v for k, v in result.items() if k != "per_layer"}})
        return result

    # the loop
    history: list[dict[str, Any]] = []
    show_bar = config.progress and accelerator.is_local_main_process
    with contextlib.ExitStack() as stack:
        stack.enter_context(aha.force_routing(aha_model, config.force_routing))  # None: the learned routes
        if heldout_indices is not None and config.eval_every > 0 and resumed is None:
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
                raise _non_finite_loss(row, progress, out)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.3f}", glob=f"{row['global_fraction']:.3f}", lam=f"{row['lambda']:.2e}", tok_s=f"{row['tokens_per_s']:.0f}")
            at_end = progress.step == config.steps
            if heldout_indices is not None and config.eval_every > 0 and progress.step % config.eval_every == 0 and not at_end:
                run_eval()
            stop = interrupt.requested()
            if (config.checkpoint_every > 0 and progress.step % config.checkpoint_every == 0) or at_end or stop:
                save_checkpoint(accelerator, out / "checkpoints", progress.step, config.keep_checkpoints, trainer_state())
            if stop and not at_end:
                bar.close()
                log.close()
                raise KeyboardInterrupt(f"stopped at step {progress.step}; run the same command again to resume")
        bar.close()
        evaluation = run_eval() if heldout_indices is not None else None

    # the final model (written to a staging folder, then renamed to model/) and the summary
    log.close()
    achieved = _achieved_global(accelerator, out)
    final_folder = out / "model"
    staging = staging_folder(final_folder)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that died
    kept = (
        f"Training is complete and its last checkpoint, {checkpoint_name(progress.step)}, is intact (any earlier model/ too): "
        "the rerun resumes at the end and only writes model/ and summary.json."
    )
    with disk_full_reported("saving the final model", final_folder, kept, partial=staging):
        final_model = accelerator.unwrap_model(student)
        if config.trainable == "lora" and is_sharded(accelerator):
            merged = merged_lora_model(accelerator, student, rebuild=lambda: _lora_student(config))
            if merged is not None:
                final_model = merged.eval()
                final_model.save_pretrained(staging)
        else:
            if config.trainable == "lora":
                final_model = final_model.merge_and_unload()
            final_model.eval()
            save_final_model(accelerator, student, final_model, staging)  # sharded: gathered on the main process
        if accelerator.is_main_process:
            if tokenizer is not None:
                tokenizer.save_pretrained(staging)
            replace_folder(staging, final_folder)
    if accelerator.is_main_process:
        summary = _summary(config, progress, controller, achieved, evaluation, data)
        with disk_full_reported("writing summary.json", out, kept):
            write_text_atomically(out / "summary.json", strict_json(summary, indent=2))
    accelerator.wait_for_everyone()
    return TrainResult(out=out, model=final_model, history=history, evaluation=evaluation, achieved_global=achieved[0])
