"""Fine-tuning that teaches a model when to attend globally: objective, budget controller, trainer.

``train(TrainConfig(...))`` or ``aha train ...``; see :mod:`aha.train.trainer` for the objective and
the resume guarantees, and :class:`TrainConfig` for every option.
"""

from aha.train.config import TrainConfig, load_config, read_config_file
from aha.train.objective import (
    LambdaController,
    cross_entropy_sum,
    distillation_sum,
    gate_sums,
)
from aha.train.trainer import (
    BatchSchedule,
    TrainResult,
    evaluate,
    iter_metrics,
    router_parameters,
    train,
)

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
