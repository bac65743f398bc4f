"""The ``train-step`` benchmark group: what one ``aha train`` optimizer step costs next to a dense fine-tune step.

Per sequence length ``n`` the same model runs the same ``n`` tokens (the passkey haystack essays,
one sequence per step) in two ways, round-robin:

* **aha** -- one :class:`~aha.train.step.Stepper` step of the demo recipe's objective
  (:meth:`aha.recipes.demo.DemoSettings.train_config`: window 128 + 1 sink key, cross-entropy +
  distillation from the frozen original model + lambda * mean(g_soft), the budget controller),
  once per gate-gradient estimator (``--gate-gradients``: ``ste``, ``sampled``, ``compressed``,
  ``frozen``, the routed pass alone as after ``--freeze-routes-at``, and two-phase variants such as
  ``sampled+frozen``, ``--freeze-routes-at 0.5``: one step of each phase per timed call, its time
  halved, so the row is the mean step of such a run). The routers keep their
  gradient, but their logits are fixed (zero weight; bias +2 for the first ``--model-global-heads``
  query heads of every layer, -2 for the rest), so the global fraction is the same in every step;
  the learning rates are ~0 so that nothing moves between the timed steps (AdamW does the same work).
* **dense** -- the original model on SDPA (no routers), cross-entropy only, AdamW over every
  parameter and gradient clipping: a plain fine-tune step.

Each row splits its step into attention forward (seconds inside the attention functions of the
trained model, the estimator's extra passes included), attention backward (autograd time from the
attention output's gradient to its inputs' gradients, summed over layers), the distillation
teacher's forward (aha only; its attention included) and the rest (embeddings, projections, MLPs,
the loss, the optimizer).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, get_args

import torch
from torch import Tensor, nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import aha
from aha.benchmarking import BenchConfig, Column, Section, register_group
from aha.benchmarking.model import FULL_ATTENTION, benchmark_tokens
from aha.benchmarking.timing import measure_round_robin, median_ratio
from aha.data import PackedDataset, TokenizedCorpus
from aha.hf.attention import ATTN_IMPLEMENTATION
from aha.train.config import TrainConfig, TrainedGateGradient
from aha.train.objective import cross_entropy_sum
from aha.train.schedule import TrainProgress, collate

#: Router bias magnitude of the fixed benchmark routes: sigmoid(2) = 0.88, off the threshold yet with a gradient.
ROUTE_BIAS = 2.0
#: The variant name of routes frozen for the whole run (``freeze_routes_at=0``: the "none" gate gradient).
FROZEN = "frozen"
#: Suffix of a two-phase variant (``sampled+frozen``): routes trained with the estimator for the first half of
#: the run, then frozen (``--freeze-routes-at 0.5``). Each timed call runs one step of each phase and counts as two.
THEN_FROZEN = "+frozen"
DENSE = "dense"
#: Calls of each candidate before its timed samples (:func:`measure_round_robin`: a warm-up and a
#: calibration call; the first step also allocates the optimizer state): left out of the split.
WARMUP_CALLS = 2


class _BackwardMark(torch.autograd.Function):
    """Identity on tensors whose backward writes the time it runs into ``record[slot]``: on an
    attention's output it marks the start of the attention's backward, on its inputs the end."""

    @staticmethod
    def forward(ctx: Any, record: list[float], slot: int, *tensors: Tensor) -> tuple[Tensor, ...]:
        ctx.record, ctx.slot = record, slot
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        ctx.record[ctx.slot] = time.perf_counter()
        return (None, None, *grads)


@dataclasses.dataclass
class _AttentionClock:
    """Seconds in the attention functions of the calls that need gradients (forward), of those that
    do not (the teacher), and the ``[start, end]`` times of each backward."""

    forward: float = 0.0
    forward_without_grad: float = 0.0
    backwards: list[list[float]] = dataclasses.field(default_factory=list)

    def backward_seconds(self) -> float:
        return sum(end - start for start, end in self.backwards if start and end)


@contextlib.contextmanager
def attention_clock(names: tuple[str, ...] = (ATTN_IMPLEMENTATION, FULL_ATTENTION)) -> Iterator[Callable[[], _AttentionClock]]:
    """Time the attention functions registered under ``names``, forward and backward.

    Yields a function returning the clock of the calls since it was last called (and starting a new
    one); the original functions are restored on exit.
    """
    clocks = [_AttentionClock()]
    originals = {name: ALL_ATTENTION_FUNCTIONS[name] for name in names}

    def timed(function: Callable[..., Any]) -> Callable[..., Any]:
        def call(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, *args: Any, **kwargs: Any) -> Any:
            clock = clocks[-1]
            start = time.perf_counter()
            record = None
            if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
                record = [0.0, 0.0]
                query, key, value = _BackwardMark.apply(record, 1, query, key, value)
            output, weights = function(module, query, key, value, *args, **kwargs)
            if record is not None and output.requires_grad:
                (output,) = _BackwardMark.apply(record, 0, output)
                clock.backwards.append(record)
            seconds = time.perf_counter() - start
            if record is None:
                clock.forward_without_grad += seconds
            else:
                clock.forward += seconds
            return output, weights

        return call

    def take() -> _AttentionClock:
        clocks.append(_AttentionClock())
        return clocks[-2]

    for name, function in originals.items():
        AttentionInterface.register(name, timed(function))
    try:
        yield take
    finally:
        for name, function in originals.items():
            AttentionInterface.register(name, function)


def one_sequence(tokenizer: Any, n: int) -> PackedDataset:
    """A dataset of one ``n``-token sequence of the haystack essays (every step trains on it)."""
    corpus = TokenizedCorpus.from_token_lists("haystack", ["haystack/0"], [benchmark_tokens(tokenizer, n)[0].tolist()])
    return PackedDataset([corpus], n, tokenizer.pad_token_id or 0)


def fix_routes(aha_model: nn.Module, global_heads: int | None) -> None:
    """Routers with zero weight and bias +/-:data:`ROUTE_BIAS`: the first ``global_heads`` query heads of
    every layer global, the rest local, whatever the input (None: the model's own routers)."""
    if global_heads is None:
        return
    with torch.no_grad():
        for router in (m for m in aha_model.modules() if isinstance(m, aha.Router)):
            heads = router.proj.out_features
            if not 0 <= global_heads <= heads:
                raise ValueError(f"model_global_heads must be in 0..{heads}, got {global_heads}")
            router.proj.weight.zero_()
            router.proj.bias.copy_(torch.where(torch.arange(heads) < global_heads, ROUTE_BIAS, -ROUTE_BIAS))


def _dense_step(model: nn.Module, batch: dict[str, Tensor], max_grad_norm: float) -> Callable[[], None]:
    """One plain fine-tune step of ``model`` on ``batch``: cross-entropy, backward, clipping, AdamW."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=0.0)
    targets = int((batch["labels"][:, 1:] != -100).sum())

    def step() -> None:
        loss = cross_entropy_sum(model(input_ids=batch["input_ids"]).logits, batch["labels"]) / targets
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def measure_train_steps(
    model: nn.Module, tokenizer: Any, seq_lens: list[int], cfg: BenchConfig, template: TrainConfig
) -> list[dict[str, Any]]:
    """Rows of the ``train-step`` table (see the module docstring) for a plain pretrained ``model``.

    Args:
        model: the plain model (converted here with ``template``'s routing; left unchanged).
        seq_lens: tokens per training sequence.
        cfg: the timing policy, ``gate_gradients`` and ``model_global_heads`` (the fixed routes).
        template: the aha run's settings (the demo recipe's); sequence length, learning rates,
            estimator and bookkeeping are set here.
    """
    from aha.recipes.finetune import build_stepper
    from aha.train.model_setup import prepare_model
    from aha.train.sharding import make_accelerator

    known = (*get_args(TrainedGateGradient), FROZEN)
    unknown = [name for name in cfg.gate_gradients if not set(_phases(name)) <= set(known)]
    if unknown:
        raise ValueError(f"unknown --gate-gradients {unknown}; choose from {', '.join(known)}, or <gate gradient>{THEN_FROZEN}")
    rows = []
    for n in seq_lens:
        train_set = one_sequence(tokenizer, n)
        with tempfile.TemporaryDirectory() as out:
            # lr 0 (router_lr ~0: a config needs something to train): every timed step starts from the same weights
            config = dataclasses.replace(
                template, seq_len=n, lr=0.0, router_lr=1e-30, passkey_mix=0.0, router_warm_start=0, steps=10**6, out=out,
                progress=False, eval_every=-1, checkpoint_every=0, batch_size=1, grad_accum=1,
            )
            aha_model = prepare_model(config, copy.deepcopy(model)).train()
            fix_routes(aha_model, cfg.model_global_heads)
            accelerator = make_accelerator(config)
            stepper = build_stepper(config, accelerator, aha_model, train_set)
            teacher = _TimedTeacher(stepper.teacher_logits)
            if stepper.teacher_logits is not None:
                stepper.teacher_logits = teacher
            dense = copy.deepcopy(model).train().requires_grad_(True)
            dense.set_attn_implementation(FULL_ATTENTION)
            dense_step = _dense_step(dense, collate(train_set, [0], accelerator.device), config.max_grad_norm)
            rows += _measure(n, config, stepper, dense_step, teacher, cfg)
    return rows


def _phases(variant: str) -> list[str]:
    """The steps one timed call of ``variant`` runs: the estimator and then ``frozen`` for a two-phase
    variant (:data:`THEN_FROZEN`), else the variant itself."""
    return [variant.removesuffix(THEN_FROZEN), FROZEN] if variant.endswith(THEN_FROZEN) else [variant]


class _TimedTeacher:
    """The stepper's teacher (``input_ids -> logits``) adding up the seconds it runs."""

    def __init__(self, logits: Callable[[Tensor], Tensor] | None):
        self.logits, self.seconds = logits, 0.0

    def __call__(self, input_ids: Tensor) -> Tensor:
        start = time.perf_counter()
        logits = self.logits(input_ids)
        self.seconds += time.perf_counter() - start
        return logits


def _measure(n: int, config: TrainConfig, stepper: Any, dense_step: Callable[[], None], teacher: _TimedTeacher,
             cfg: BenchConfig) -> list[dict[str, Any]]:
    """Time the dense step and one aha step per estimator round-robin; one row each."""
    progress = TrainProgress()
    totals: dict[str, dict[str, float]] = {}
    fractions: dict[str, float] = {}
    with attention_clock() as take_clock:

        def timed(name: str, step: Callable[[], Any], steps: int = 1) -> Callable[[], None]:
            calls = [0]

            def run() -> None:
                take_clock()
                teacher.seconds = 0.0
                start = time.perf_counter()
                result = step()
                seconds = time.perf_counter() - start
                clock = take_clock()
                if isinstance(result, dict):
                    fractions[name] = result["global_fraction"]
                calls[0] += 1
                if calls[0] <= WARMUP_CALLS:
                    return
                total = totals.setdefault(name, {"calls": 0, "step": 0.0, "forward": 0.0, "backward": 0.0, "teacher": 0.0})
                total["calls"] += steps
                total["step"] += seconds
                total["forward"] += clock.forward
                total["backward"] += clock.backward_seconds()
                total["teacher"] += teacher.seconds

            return run

        def aha_step(variant: str) -> Callable[[], dict[str, Any]]:
            phases = [
                dataclasses.replace(config, freeze_routes_at=0.0)
                if estimator == FROZEN
                else dataclasses.replace(config, gate_gradient=estimator)
                for estimator in _phases(variant)
            ]

            def run() -> dict[str, Any]:
                for settings in phases:
                    stepper.config = settings  # the stepper reads the estimator from its config each step
                    result = stepper.step(progress)
                return result

            return run

        candidates = {DENSE: timed(DENSE, dense_step)}
        candidates |= {name: timed(name, aha_step(name), len(_phases(name))) for name in cfg.gate_gradients}
        samples = measure_round_robin(candidates, cfg.timing)
    rows = []
    for name, sample in samples.items():
        total = totals[name]
        per_step = len(_phases(name))  # a two-phase call is two steps
        mean = {key: total[key] / total["calls"] for key in ("step", "forward", "backward", "teacher")}
        rows.append({
            "n": n,
            "variant": name if name == DENSE else f"aha {name}",
            "gate_gradient": None if name == DENSE else _phases(name)[0],
            "freeze_routes_at": None if name == DENSE else 0.0 if name == FROZEN else 0.5 if per_step == 2 else 1.0,
            "window": config.window,
            "sink": config.sink,
            "distill": 0.0 if name == DENSE else config.distill,
            "global_fraction": fractions.get(name, 1.0),
            "step_ms": sample.median / per_step * 1e3,
            "vs_dense": median_ratio(sample, samples[DENSE]) / per_step,
            "mean_step_ms": mean["step"] * 1e3,
            "attention_forward_ms": mean["forward"] * 1e3,
            "attention_backward_ms": mean["backward"] * 1e3,
            "teacher_ms": mean["teacher"] * 1e3,
            "rest_ms": (mean["step"] - mean["forward"] - mean["backward"] - mean["teacher"]) * 1e3,
            "timed_steps": total["calls"],
            "noise": max(sample.noise),
        })
    return rows


TRAIN_STEP_COLUMNS = [
    Column("n", "n"),
    Column("variant", "variant"),
    Column("global_fraction", "global", ".3f"),
    Column("step_ms", "step ms", ".0f"),
    Column("vs_dense", "vs dense", ".2f"),
    Column("mean_step_ms", "mean ms", ".0f"),
    Column("attention_forward_ms", "attn fwd ms", ".0f"),
    Column("attention_backward_ms", "attn bwd ms", ".0f"),
    Column("teacher_ms", "teacher ms", ".0f"),
    Column("rest_ms", "rest ms", ".0f"),
    Column("noise", "noise", ".2f"),
]


def recipe_template(cfg: BenchConfig) -> TrainConfig:
    """The demo recipe's training settings for ``cfg.model``, with ``cfg.train_step_distill`` as the distillation weight when set."""
    from aha.recipes.demo import DemoSettings

    template = DemoSettings(model=cfg.model).train_config()
    if cfg.train_step_distill is None:
        return template
    if not cfg.train_step_distill >= 0:
        raise ValueError(f"--train-step-distill must be >= 0 (0: no teacher), got {cfg.train_step_distill}")
    return dataclasses.replace(template, distill=cfg.train_step_distill)


@register_group("train-step")
def train_step_benchmarks(cfg: BenchConfig) -> list[Section]:
    """An ``aha train`` step of the demo recipe against a dense fine-tune step (see the module docstring)."""
    template = recipe_template(cfg)  # checks --train-step-distill before the model loads
    model, tokenizer = aha.load_model(cfg.model, dtype=torch.float32)
    if aha.is_aha_model(model):
        raise ValueError(f"the train-step group fine-tunes a plain model (it converts it as the demo does); {cfg.model} is an AHA checkpoint")
    routes = "the model's own" if cfg.model_global_heads is None else f"first {cfg.model_global_heads} query heads of every layer global, the rest local"
    section = Section(
        name="train_step",
        title=f"{cfg.model}: one optimizer step on n tokens, aha train (demo recipe) vs a dense fine-tune step",
        columns=TRAIN_STEP_COLUMNS,
        notes=[
            (
                f"aha: window {template.window} + {template.sink} sink key(s), "
                + (f"CE + {template.distill} x KD (frozen original as teacher) " if template.distill > 0 else "CE (no distillation, no teacher) ")
                + f"+ lambda * mean(g_soft); routes: {routes}, routers trainable (fixed logits); estimators as in aha train --gate-gradient "
                f"(sampled: fraction {template.gate_sample_fraction}; compressed: blocks of {template.gate_block}); frozen: routes frozen "
                "(--freeze-routes-at), the routed pass alone; E+frozen: --gate-gradient E --freeze-routes-at 0.5, the mean of one step of "
                "each phase"
            ),
            "dense: the original model on SDPA, CE only, AdamW, clipping. vs dense = median over rounds of step / dense step",
            (
                "attn fwd / bwd = inside the trained model's attention functions (the estimator's passes included) / from the attention "
                "output's gradient to its inputs'; teacher = the distillation teacher's forward; rest = step - the three "
                "(means over the timed steps; step ms is their median)"
            ),
        ],
    )
    section.rows = measure_train_steps(model, tokenizer, cfg.train_step_seq_lens, cfg, template)
    return [section]
