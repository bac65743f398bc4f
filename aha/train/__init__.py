"""Components of the AHA fine-tune: what the recipe :mod:`aha.recipes.finetune` composes.

* :mod:`~aha.train.config` -- :class:`TrainConfig`, every option (YAML / TOML / flags);
* :mod:`~aha.train.objective` -- the loss terms and the sparsity budget controller;
* :mod:`~aha.train.model_setup` -- conversion, trainable parameters, optimizer groups, the teacher;
* :mod:`~aha.train.step` -- one optimizer step over the global batch;
* :mod:`~aha.train.sharding` -- FSDP2 through accelerate (also on CPU), the consolidated final model;
* :mod:`~aha.train.schedule` -- the batch order, a pure function of ``(seed, step)``;
* :mod:`~aha.train.checkpoint` -- atomic, verified, rotating checkpoints and resume;
* :mod:`~aha.train.metrics` -- ``metrics.jsonl`` (and TensorBoard);
* :mod:`~aha.train.heldout` -- held-out perplexity and routing during training;
* :mod:`~aha.train.interrupt` -- Ctrl-C stops at a step boundary.

``aha.train.train(TrainConfig(...))`` (or ``aha train ...``) runs the recipe; ``train`` and
``TrainResult`` are re-exported from :mod:`aha.recipes.finetune` on first use.
"""

from typing import Any

from aha.train.config import TrainConfig, load_config, read_config_file
from aha.train.metrics import iter_metrics
from aha.train.objective import (
    LambdaController,
    cross_entropy_sum,
    distillation_sum,
    gate_sums,
)
from aha.train.schedule import BatchSchedule

_RECIPE_EXPORTS = ("train", "TrainResult")


def __getattr__(name: str) -> Any:
    if name in _RECIPE_EXPORTS:  # lazily: the recipe imports these components
        from aha.recipes import finetune

        return getattr(finetune, name)
    if name in ("evaluate", "router_parameters"):
        from aha.train import heldout, model_setup

        return getattr(heldout if name == "evaluate" else model_setup, name)
    raise AttributeError(f"module 'aha.train' has no attribute {name!r}")


__all__ = [
    "BatchSchedule",
    "LambdaController",
    "TrainConfig",
    "TrainResult",
    "cross_entropy_sum",
    "distillation_sum",
    "evaluate",
    "gate_sums",
    "iter_metrics",
    "load_config",
    "read_config_file",
    "router_parameters",
    "train",
]
