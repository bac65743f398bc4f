"""Sharded training: PyTorch FSDP2 (``fully_shard``) through accelerate.

``aha train`` needs no switch of its own: ``accelerate launch --use_fsdp --fsdp_version 2 ...`` (or an
accelerate config file with ``distributed_type: FSDP`` and ``fsdp_version: 2``) makes
``accelerator.prepare`` shard the parameters, gradients and optimizer state over the processes; the
trainer's own code is the same as for DDP, except in three places, all here or behind
:func:`is_sharded`:

* **CPU**. accelerate 1.16 applies FSDP only on accelerators: with ``ACCELERATE_USE_CPU=1`` a
  FSDP launch becomes plain data parallelism (``MULTI_CPU``, DDP) without a word. :func:`make_accelerator`
  turns such a launch into the FSDP2 it asked for (torch's ``fully_shard`` runs on a CPU mesh over
  gloo), so sharded training is tested without a GPU.
* **Lockstep forwards**. Every forward of a sharded model all-gathers parameters, a collective: all
  processes must run the same number of forwards (the held-out evaluation pads the shorter shares).
* **The final model**. The consolidated (full) state dict is gathered on the main process and saved
  as an ordinary ``model/`` folder that :func:`aha.load_model` reads on one process.

FSDP1 (``--fsdp_version 1``) is refused: FSDP2 keeps every parameter its own (DTensor) parameter,
so the routers (``q_proj.router`` or the router rows fused into ``q_proj``) shard, train and sit in
the optimizer's router group like any parameter. What needs nothing new: the objective divides every
term by global-batch counts and :class:`~aha.train.step.Stepper` sums the gate statistics over all
processes before the budget controller reads them, so the sparsity loss and lambda see the all-rank
mean of the gates, as under DDP; FSDP2 averages gradients over processes as DDP does.

The frozen distillation teacher of ``trainable='all'`` is sharded the same way (``routers`` and
``lora`` use the student under ``aha.force_routing``, adapters disabled, instead). LoRA adapters
shard with their layers; at the end they are merged on the main process into an unsharded copy of
the model (:func:`merged_lora_model`).
**Loading**: with ``--fsdp_cpu_ram_efficient_loading true`` only the main process reads the
checkpoint; the others build the model with its parameters on the meta device
(:func:`only_main_process_reads_weights`), and accelerate broadcasts the main process's weights into their
shards when it shards the model. Without it every process loads the whole model first.
Checkpoints are accelerate's: with ``SHARDED_STATE_DICT`` (FSDP2's default) each process writes its
shard through ``torch.distributed.checkpoint``, whose ``.metadata`` file is read back with
``pickle`` (the manifest still catches damaged files); ``FULL_STATE_DICT`` gathers everything on the
main process and loads with ``weights_only=True``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

try:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
except ImportError as error:  # pragma: no cover - the recipe reports the missing extra first
    from aha._optional import reraise_missing

    raise reraise_missing(error, "aha train (the fine-tuning recipe)") from error

from aha.train.config import TrainConfig
from aha.train.model_setup import mixed_precision

FSDP1_REFUSED = "aha train shards with FSDP2 only: launch with --fsdp_version 2 (or fsdp_version: 2 in the accelerate config)"


def fsdp_requested() -> bool:
    """Whether the launch asked for FSDP (``accelerate launch --use_fsdp`` or a config file with ``distributed_type: FSDP``)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(config: TrainConfig) -> Accelerator:
    """The run's :class:`Accelerator`: DDP, FSDP2 or one process, as launched; FSDP2 on CPU too (see the module docstring)."""
    if fsdp_requested() and os.environ.get("FSDP_VERSION", "1") != "2":  # before accelerate builds (and on CPU rejects) an FSDP1 plugin
        raise ValueError(FSDP1_REFUSED)
    accelerator = Accelerator(mixed_precision=mixed_precision(config.precision), step_scheduler_with_optimizer=False)
    if fsdp_requested() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        # both shared states: every later AcceleratorState() copies PartialState's distributed_type over its own
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* variables
        if accelerator.mixed_precision != "no":  # as accelerate does for its own FSDP: the MixedPrecisionPolicy
            plugin.set_mixed_precision(accelerator.mixed_precision)
        accelerator.state.fsdp_plugin = plugin
    if accelerator.distributed_type == DistributedType.FSDP and not accelerator.is_fsdp2:
        raise ValueError(FSDP1_REFUSED)
    return accelerator


def is_sharded(accelerator: Accelerator) -> bool:
    """Whether the model is sharded over the processes (FSDP2): its forwards are collectives."""
    return accelerator.is_fsdp2


def only_main_process_reads_weights(accelerator: Accelerator) -> bool:
    """Whether the other processes get their weights from the main process instead of reading the checkpoint.

    True under FSDP2 with ``cpu_ram_efficient_loading``: accelerate's ``fsdp2_prepare_model``
    broadcasts the main process's full state dict into every process's shards, so the others can
    build the model empty (``aha.load_model(..., weights=False)``).
    """
    return is_sharded(accelerator) and bool(accelerator.state.fsdp_plugin.cpu_ram_efficient_loading)


def merged_lora_model(accelerator: Accelerator, student: nn.Module, rebuild: Callable[[], nn.Module]) -> nn.Module | None:
    """LoRA under FSDP: the trained adapters merged into the base weights, on the main process (None
    elsewhere); call on every process (gathering the state is a collective).

    PEFT merges a LoRA layer from its whole weights, which no process holds, so the main process
    builds an unsharded copy of the student (``rebuild``: the base model with the same adapters),
    loads the gathered full state dict into it and merges there (PEFT's ``merge_and_unload``).
    """
    state = accelerator.get_state_dict(student)
    if not accelerator.is_main_process:
        return None
    copy = rebuild()
    copy.load_state_dict(state)
    return copy.merge_and_unload()


def save_final_model(accelerator: Accelerator, student: nn.Module, final_model: nn.Module, folder: Path) -> None:
    """Write the trained model to ``folder`` (``save_pretrained``) from the main process; call on every process.

    Sharded: the full state dict is gathered on the main process first (a collective), so the folder
    holds the consolidated model, loadable with :func:`aha.load_model` on one process.
    """
    state: dict[str, Any] | None = accelerator.get_state_dict(student) if is_sharded(accelerator) else None
    if accelerator.is_main_process:
        if state is not None:  # gathered tied weights are separate tensors: keep one name each, as save_pretrained does
            first: dict[int, str] = {}
            for name, param in final_model.named_parameters(remove_duplicate=False):
                if first.setdefault(id(param), name) != name:
                    state.pop(name, None)
        final_model.save_pretrained(folder, state_dict=state)
