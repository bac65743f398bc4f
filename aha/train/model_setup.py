"""What the fine-tune trains: the AHA model (converted, or checked against the run's settings), the
trainable parameters and their optimizer groups, the distillation teacher, the autocast precision."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

import aha
from aha._optional import reraise_missing
from aha.train.config import TrainConfig

if TYPE_CHECKING:
    from accelerate import Accelerator

#: LoRA adapts these projections. ``q_proj`` is left out: in a converted model it is the routed
#: query projection that also computes the router logits (wrapping it would hide the router).
LORA_TARGET_MODULES = ("k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's :class:`aha.Router` modules (the ``"separate"`` router layout)."""
    return [p for module in model.modules() if isinstance(module, aha.Router) for p in module.parameters()]


def mixed_precision(precision: str) -> str:
    if precision == "bf16":
        return "bf16"
    if precision == "auto" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "no"


def prepare_model(config: TrainConfig, model: nn.Module) -> nn.Module:
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


def configure_trainable(config: TrainConfig, model: nn.Module) -> nn.Module:
    """Set ``requires_grad`` per ``config.trainable``; returns the model to optimise (a PEFT wrapper for LoRA)."""
    routers = router_parameters(model)
    if not routers and config.trainable == "routers":
        raise ValueError("trainable='routers' needs separate routers (aha.Router modules); this model's routers are fused into q_proj")
    if config.trainable == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as error:
            raise reraise_missing(error, "trainable='lora'") from error

        lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha, target_modules=list(LORA_TARGET_MODULES), lora_dropout=0.0)
        model = get_peft_model(model, lora)  # freezes every non-LoRA parameter
    else:
        for p in model.parameters():
            p.requires_grad_(config.trainable == "all")
    for p in routers:
        p.requires_grad_(config.force_routing is None)  # forced routes give routers no gradient
    return model


def param_groups(config: TrainConfig, model: nn.Module, routers: list[nn.Parameter]) -> list[dict[str, Any]]:
    router_ids = {id(p) for p in routers}
    trainable_routers = [p for p in routers if p.requires_grad]
    others = [p for p in model.parameters() if p.requires_grad and id(p) not in router_ids]
    groups = [
        {"name": "model", "params": others, "lr": config.lr, "weight_decay": config.weight_decay},
        {"name": "routers", "params": trainable_routers, "lr": config.router_lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def teacher(config: TrainConfig, aha_model: nn.Module, student: nn.Module, accelerator: Accelerator) -> Callable[[Tensor], Tensor] | None:
    """A function ``input_ids -> teacher logits`` (the original model), or None without distillation."""
    if config.distill <= 0:
        return None
    if config.trainable == "all":
        frozen = copy.deepcopy(aha_model).requires_grad_(False).eval()
        if accelerator.is_fsdp2:  # sharded like the student (its forwards are collectives too); not checkpointed: it never changes
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            frozen = fsdp2_prepare_model(accelerator, frozen)  # placed on the device as it is sharded (and filled, if built empty)
        else:
            frozen = frozen.to(accelerator.device)
        teacher_model, routed_model = frozen, frozen
    else:
        teacher_model, routed_model = student, aha_model

    def logits(input_ids: Tensor) -> Tensor:
        adapters_off = student.disable_adapter() if config.trainable == "lora" else contextlib.nullcontext()
        with torch.no_grad(), accelerator.autocast(), adapters_off, aha.force_routing(routed_model, "global"):
            return teacher_model(input_ids=input_ids).logits

    return logits
