"""Training configuration: one dataclass, loadable from YAML or TOML, mirrored by the CLI flags.

Precedence: dataclass defaults < config file < command-line flags. Every field is a flag
(``lambda_init`` -> ``--lambda-init``); :func:`load_config` does the layering.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import tomllib
import yaml

from aha._fields import option
from aha.hf.settings import (
    AhaSettings,
    routing_field,
    routing_problems,
    routing_settings,
)
from aha.router import RouterInit

Trainable = Literal["all", "routers", "lora"]
Precision = Literal["auto", "fp32", "bf16"]
ForcedRouting = Literal["global", "local"]
#: The gate-gradient estimators ``aha train`` offers (``"none"`` is what frozen routes use).
TrainedGateGradient = Literal["ste", "sampled", "compressed"]

#: Fields that may differ when resuming a run: they do not change the training trajectory.
RESUME_MUTABLE_FIELDS = frozenset({"out", "eval_every", "eval_sequences", "checkpoint_every", "keep_checkpoints", "progress"})


def _finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class TrainConfig:
    """Everything a training run depends on (see each field's help, also shown by ``aha train --help``)."""

    # model and routing
    model: str = option("model name (e.g. smollm2-135m) or path, loaded with aha.load_model", default="smollm2-135m")
    window: int = routing_field("window")
    sink: int = routing_field("sink")
    threshold: float = routing_field("threshold")
    router_init: RouterInit = routing_field("router_init")
    open_router_bias: float = option(
        "bias of freshly converted open routers; any value > 0 starts every head global, and a small one "
        "(sigmoid(1) = 0.73) lets routes move within a short fine-tune, where aha.OPEN_BIAS = 4 takes hundreds of steps",
        default=1.0,
    )
    router_warm_start: int = option(
        "before training, fit the routers to where N full-length training sequences need global attention "
        "(aha.train.router_labels; 0 = off: routers start open). Pair it with --target-ramp 0",
        default=0,
    )
    warm_start_global: float | None = option(
        "share of (token, head) pairs the warm start labels global (default: --target-global)", default=None
    )
    force_routing: ForcedRouting | None = option(
        "train a baseline with routing fixed ('global' = the un-routed model fine-tuned the same way); routers are frozen", default=None
    )
    # what trains
    trainable: Trainable = option(
        "what trains: 'all' parameters (router-only training tends to collapse to all-local), 'routers' only, "
        "or 'lora' (routers + LoRA adapters on the k/v/o and MLP projections)",
        default="all",
    )
    lora_rank: int = option("LoRA rank (trainable='lora')", default=16)
    lora_alpha: float = option("LoRA alpha (trainable='lora')", default=32.0)
    # data
    data: list[str] = option("data specs (repeatable or comma-separated): built-in corpus names, 'default', files, folders, or hf:<dataset>[:split]", default_factory=lambda: ["default"])
    text_field: str = option("text key of JSONL rows / datasets columns", default="text")
    heldout_fraction: float = option("share of documents held out (by a hash of the document id)", default=0.1)
    min_doc_tokens: int = option("skip documents shorter than this many tokens", default=2)
    seq_len: int = option("tokens per training sequence (one document per sequence, right-padded)", default=1024)
    passkey_mix: float = option(
        "share of training sequences replaced by answered passkey prompts (haystack from the training data) "
        "so routers learn to go global where an answer needs a token beyond the window (0 = off)",
        default=0.0,
    )
    # objective
    lambda_init: float = option("sparsity weight lambda on mean(g_soft); with --target-global it is the controller's start", default=3e-4)
    target_global: float | None = option("target global fraction; lambda adapts to meet it (e.g. 0.07)", default=None)
    lambda_lr: float = option("budget controller's integral rate on log(lambda) per step (see LambdaController)", default=0.1)
    lambda_gain: float = option("budget controller's proportional gain on log(lambda) (damps overshoot)", default=5.0)
    target_ramp: float = option("share of the steps over which the target falls linearly from 1 to --target-global", default=0.3)
    distill: float = option("weight of KL(teacher || student) to the frozen original model's logits (0 = off)", default=0.0)
    distill_temperature: float = option("softmax temperature of the distillation term", default=1.0)
    # the gate's gradient (aha.kernels.gate_estimators)
    gate_gradient: TrainedGateGradient = option(
        "how the routers' straight-through gate gets d out/d g = full - local: 'ste' (exact; full attention for every "
        "(token, head) each step), 'sampled' (exact at global pairs and at a random --gate-sample-fraction of local "
        "pairs, rescaled: unbiased) or 'compressed' (keys before the window as block means of --gate-block keys: "
        "approximate, deterministic)",
        default="ste",
    )
    gate_sample_fraction: float = option("'sampled': share of local (token, head) pairs given the gate gradient per step, in (0, 1]", default=0.1)
    gate_block: int = option("'compressed': keys per compressed block (1 = exact)", default=32)
    freeze_routes_at: float = option(
        "share of the steps after which routes freeze: routers stop training and attention runs the routed pass "
        "alone (1 = never; e.g. 0.5 trains routes in the first half at the gate gradient's cost)",
        default=1.0,
    )
    # optimisation
    steps: int = option("optimizer steps", default=200)
    batch_size: int = option("sequences per process per micro-batch", default=1)
    grad_accum: int = option("micro-batches per optimizer step (global batch = batch_size * grad_accum * processes)", default=8)
    lr: float = option("peak learning rate of the model's parameters (or LoRA adapters)", default=5e-5)
    router_lr: float = option("peak learning rate of the router parameters", default=1e-2)
    weight_decay: float = option("AdamW weight decay (not applied to routers)", default=0.0)
    warmup_steps: int = option("linear warmup steps before the cosine decay", default=10)
    max_grad_norm: float = option("gradient clipping norm (0 = off)", default=1.0)
    precision: Precision = option("'auto' = bf16 autocast on GPUs that support it, else fp32", default="auto")
    seed: int = option("seed of initialisation, data order and RNG", default=0)
    # bookkeeping
    out: str = option("output folder: checkpoints, metrics.jsonl, the final model", default="runs/aha-train")
    checkpoint_every: int = option("save a checkpoint every N steps (0 = only at the end)", default=50)
    keep_checkpoints: int = option("checkpoints kept (oldest deleted first)", default=2)
    eval_every: int = option("held-out perplexity every N steps (0 = only at the end, -1 = never)", default=0)
    eval_sequences: int = option("held-out sequences per evaluation", default=32)
    progress: bool = option("show a progress bar", default=True)

    def __post_init__(self) -> None:
        problems = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in ("int", int) and (isinstance(value, bool) or not isinstance(value, int)):
                problems.append(f"{f.name} must be an integer, got {value!r}")
            elif f.type in ("float", float, "float | None") and value is not None and not _finite_number(value):
                problems.append(f"{f.name} must be a finite number, got {value!r}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))
        for name in ("lr", "router_lr", "weight_decay", "lambda_lr", "lambda_gain", "distill", "max_grad_norm"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.lr == 0 and self.router_lr == 0:
            problems.append("lr and router_lr are both 0: nothing would train")
        if self.distill_temperature <= 0 or self.lora_alpha <= 0:
            problems.append("distill_temperature and lora_alpha must be > 0")
        if not 0 <= self.heldout_fraction < 1:
            problems.append("heldout_fraction must be in [0, 1) (a share of the documents)")
        if self.warmup_steps < 0 or self.checkpoint_every < 0 or self.eval_every < -1:
            problems.append("warmup_steps and checkpoint_every must be >= 0, eval_every >= -1")
        if min(self.keep_checkpoints, self.eval_sequences, self.lora_rank, self.min_doc_tokens) < 1:
            problems.append("keep_checkpoints, eval_sequences, lora_rank and min_doc_tokens must be >= 1")
        problems += routing_problems(self)  # window, sink, threshold, router_init
        if self.router_init == "open" and not 1 / (1 + math.exp(-self.open_router_bias)) > self.threshold:
            problems.append("open_router_bias must put sigmoid(bias) above the threshold (open routers start global)")
        if not 0 <= self.target_ramp <= 1:
            problems.append("target_ramp must be in [0, 1] (a share of the steps)")
        if self.target_global is not None and not 0 <= self.target_global <= 1:
            problems.append("target_global must be in [0, 1]")
        if self.lambda_init < 0 or (self.target_global is not None and self.lambda_init <= 0):
            problems.append("lambda_init must be >= 0 (> 0 with target_global: the controller works in log space)")
        if min(self.steps, self.batch_size, self.grad_accum) < 1:
            problems.append("steps, batch_size and grad_accum must be >= 1")
        if self.seq_len < 2:
            problems.append("seq_len must be >= 2")
        if not 0 <= self.passkey_mix <= 1:
            problems.append("passkey_mix must be in [0, 1] (a share of the training sequences)")
        if self.router_warm_start < 0:
            problems.append("router_warm_start must be >= 0 (training sequences to label; 0 = off)")
        if self.router_warm_start and self.force_routing is not None:
            problems.append("router_warm_start fits routers that force_routing would ignore: drop one")
        if self.router_warm_start and not 0 < (self.warm_start_fraction or 0) < 1:
            problems.append("router_warm_start needs warm_start_global (or target_global) in (0, 1)")
        if self.force_routing is not None and (self.target_global is not None or self.trainable == "routers"):
            problems.append("force_routing fixes the routes: drop target_global and use trainable='all' or 'lora'")
        if not 0 < self.gate_sample_fraction <= 1:
            problems.append("gate_sample_fraction must be in (0, 1] (a share of the local pairs)")
        if self.gate_block < 1:
            problems.append("gate_block must be >= 1 (keys per compressed block)")
        if not 0 <= self.freeze_routes_at <= 1:
            problems.append("freeze_routes_at must be in [0, 1] (a share of the steps; 1 = never)")
        if self.freeze_routes_at < 1 and (self.force_routing is not None or self.trainable == "routers"):
            problems.append("freeze_routes_at freezes learned routes: it needs trainable 'all' or 'lora' (something must train after) and no force_routing")
        choices = {"trainable": get_args(Trainable), "precision": get_args(Precision), "gate_gradient": get_args(TrainedGateGradient)}
        choices["force_routing"] = (None, *get_args(ForcedRouting))
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                problems.append(f"{name} must be one of {allowed}")
        if problems:
            raise ValueError("invalid training config: " + "; ".join(problems))

    @property
    def warm_start_fraction(self) -> float | None:
        """The share of pairs the router warm start labels global: ``warm_start_global``, else ``target_global``."""
        return self.warm_start_global if self.warm_start_global is not None else self.target_global

    @property
    def freeze_step(self) -> int:
        """Steps taken before routes freeze (:attr:`freeze_routes_at` of :attr:`steps`; ``steps`` = never)."""
        return math.ceil(self.freeze_routes_at * self.steps)

    @property
    def routing(self) -> AhaSettings:
        """The model's AHA settings this run asks for (``window``, ``sink``, ``threshold``, ``router_init``)."""
        return routing_settings(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields() -> list[dataclasses.Field]:
    """The fields of :class:`TrainConfig`, in declaration order."""
    return list(dataclasses.fields(TrainConfig))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) file of TrainConfig fields (dashes allowed in keys)."""
    path = Path(path)
    text = path.read_text()
    try:
        if path.suffix in (".yaml", ".yml"):
            raw = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            raw = tomllib.loads(text)
        else:
            raise ValueError(f"config file {path} must end in .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as error:
        where = getattr(error, "problem_mark", None)
        line = f":{where.line + 1}" if where is not None else ""
        raise ValueError(f"{path}{line} is not valid {path.suffix[1:].upper()}: {str(error).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    values = {key.replace("-", "_"): value for key, value in raw.items()}
    known = {f.name for f in config_fields()}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in {path}; valid options: {sorted(known)}")
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    return values


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults, then the file at ``path`` (if any), then ``overrides`` (entries that are None are ignored)."""
    values = read_config_file(path) if path is not None else {}
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return TrainConfig(**values)


def differing_fields(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """Fields that differ between a saved run's config and ``current``, ignoring :data:`RESUME_MUTABLE_FIELDS`."""
    now = current.to_dict()
    return sorted(k for k in set(saved) | set(now) if k not in RESUME_MUTABLE_FIELDS and saved.get(k) != now.get(k))


def save_config(config: TrainConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
