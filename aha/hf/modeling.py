"""AHA model classes for transformers, :func:`convert` and :func:`from_pretrained`.

For every supported family (:data:`SUPPORTED_ARCHITECTURES`) there is a config class
``Aha<Family>Config`` (``model_type = "aha_<family>"``, the AHA settings in the ``aha`` field) and
a model class ``Aha<Family>ForCausalLM``: the family's own classes plus routers in the chosen
layers and ``attn_implementation="aha"`` by default. Importing :mod:`aha` registers them with
``AutoConfig`` / ``AutoModelForCausalLM``, so a saved AHA model reloads with
``AutoModelForCausalLM.from_pretrained(path)`` -- no ``trust_remote_code`` -- in any process that
has run ``import aha``. Loading refuses a checkpoint whose routers are incomplete, stray or not
finite (:func:`_router_problems`), where transformers would only log a report.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from aha.hf.attention import ATTN_IMPLEMENTATION
from aha.hf.kv_cache import growing_cache_for
from aha.hf.projection import (
    FusedRouterQueryProjection,
    RouterLayout,
    SeparateRouterQueryProjection,
    routed_query_projection,
)
from aha.hf.settings import AhaSettings, UnsupportedModelError
from aha.router import Router, RouterInit


class AhaModelMixin:
    """Shared behaviour of the ``Aha*ForCausalLM`` classes (put before the family's model class)."""

    config: PretrainedConfig

    def __init__(self, config: PretrainedConfig, *args: Any, **kwargs: Any):
        settings = AhaSettings.from_config(config)
        config.aha = settings.to_dict()  # complete and validated: the attention layers read it
        super().__init__(config, *args, **kwargs)
        attach_routers(self, settings)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Any, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``from_pretrained``, refusing routers that a checkpoint lacks in part, holds for
        layers the config does not route, or holds with NaN or infinite values (see :func:`_router_problems`);
        transformers would load them with a logged report only."""
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)  # type: ignore[misc]
        problems = _router_problems(model, info, fresh_routers_allowed=not _declares_aha(pretrained_model_name_or_path, kwargs))
        if problems:
            raise ValueError(
                f"{pretrained_model_name_or_path} is not a usable AHA checkpoint: " + "; ".join(problems) + ". Its routers "
                "decide which heads attend globally, so it is not loaded with them re-initialised or dropped: save the "
                "model again (model.save_pretrained) or restore the folder from where it came from"
            )
        return (model, info) if wants_info else model

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        """Default to ``"aha"`` (routed attention); an explicit ``attn_implementation`` still wins."""
        return super().get_correct_attn_implementation(requested_attention or ATTN_IMPLEMENTATION, is_init_check)

    def init_continuous_batching(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' continuous batching; with ``"aha"`` attention, a manager that keeps it
        (:mod:`aha.hf.continuous_batching`)."""
        if self.config._attn_implementation != ATTN_IMPLEMENTATION:
            return super().init_continuous_batching(*args, **kwargs)
        from aha.hf.continuous_batching import init_continuous_batching

        return init_continuous_batching(self, *args, **kwargs)

    def _prepare_cache_for_generation(
        self, generation_config: Any, model_kwargs: dict, generation_mode: Any, batch_size: int, max_cache_length: int
    ) -> None:
        """``generate``'s cache: a :class:`~aha.hf.kv_cache.GrowingCache` sized for the call where
        transformers would build a plain ``DynamicCache`` (which copies every layer's whole cache
        each step); a cache the caller passed, or asked for by ``cache_implementation``, is kept, and
        so is an assistant model's (transformers records its past to roll it back)."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, generation_mode, batch_size, max_cache_length)
        cache = model_kwargs.get("cache")
        if cache is not None and not getattr(cache, "_is_user_defined", False) and not generation_config.is_assistant:
            model_kwargs["cache"] = growing_cache_for(cache, self.config, max_cache_length)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """transformers' weight initialisation, then ``router_init`` for routers a checkpoint lacked.

        transformers marks the tensors it loaded ``_is_hf_initialized``; loaded routers are left
        alone. (Overriding ``_init_weights`` would not do: the decoder layers are initialised by
        the inner base model's own ``_init_weights``.)
        """
        super().initialize_weights()
        for module in self.modules():
            if isinstance(module, Router) and not any(_loaded(p) for p in module.parameters()):
                module.reset_parameters()
            elif isinstance(module, FusedRouterQueryProjection) and not _loaded(module.weight):
                module.reset_router_parameters(AhaSettings.of(self.config).router_init)


def _loaded(tensor: torch.Tensor) -> bool:
    return getattr(tensor, "_is_hf_initialized", False)


#: ``from_pretrained`` arguments that say where a checkpoint's files are.
_HUB_ARGUMENTS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision", "subfolder")


def _declares_aha(name_or_path: Any, kwargs: dict[str, Any]) -> bool:
    """Whether the checkpoint's own ``config.json`` is an AHA model's (ours or the released AHA-OLMO2 layout),
    whose routers must be in its weights; False when it has none (weights passed otherwise) or a plain one."""
    try:
        config_dict, _ = PretrainedConfig.get_config_dict(name_or_path, **{k: kwargs[k] for k in _HUB_ARGUMENTS if k in kwargs})
    except (OSError, ValueError, TypeError):
        return False
    model_type = str(config_dict.get("model_type", ""))
    return model_type.startswith("aha_") or model_type == RELEASED_AHA_OLMO2_MODEL_TYPE


def _router_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every router tensor of ``model`` by its state-dict name: the parameters of each separate
    :class:`aha.Router`, and the router rows (the last ``num_heads``) of each fused ``q_proj``'s weight and bias."""
    found: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, SeparateRouterQueryProjection):
            found.update({f"{name}.router.{key}": tensor for key, tensor in module.router.named_parameters()})
        elif isinstance(module, FusedRouterQueryProjection):
            found[f"{name}.weight"] = module.weight[module.query_features :]
            if module.bias is not None:
                found[f"{name}.bias"] = module.bias[module.query_features :]
    return found


def _router_problems(model: nn.Module, loading_info: dict[str, Any], *, fresh_routers_allowed: bool) -> list[str]:
    """What is wrong with the routers ``from_pretrained`` just loaded into ``model``, naming the tensors; empty when nothing is.

    * Missing router tensors: refused when only some are missing (a damaged checkpoint), or all of them
      unless ``fresh_routers_allowed`` (a plain checkpoint loaded with an AHA config the caller passed:
      its routers start as ``router_init`` says).
    * Router tensors of layers the config does not route (``aha.layers`` edited): they would be dropped.
    * Router tensors with NaN or infinite values: every head would silently go local.

    ``loading_info``: transformers' loading report (``output_loading_info=True``).
    """
    routers = _router_tensors(model)
    missing = sorted(set(routers) & set(loading_info["missing_keys"]))
    problems = []
    if missing and (len(missing) < len(routers) or not fresh_routers_allowed):
        problems.append(f"router tensors missing from the checkpoint: {', '.join(missing)}")
    stray = sorted(key for key in loading_info["unexpected_keys"] if ".q_proj.router." in key)
    if stray:
        routed = AhaSettings.of(model.config).layers
        problems.append(
            f"router tensors of layers that config.json's aha.layers ({'all' if routed is None else list(routed)}) does not "
            f"route: {', '.join(stray)}"
        )
    non_finite = [
        name for name, tensor in routers.items() if name not in missing and not tensor.is_meta and not torch.isfinite(tensor).all()
    ]
    if non_finite:
        problems.append(f"router tensors with NaN or infinite values: {', '.join(non_finite)}")
    return problems


# One config class and one model class per supported family. The `aha` field is the settings dict.
class AhaLlamaConfig(LlamaConfig):
    model_type = "aha_llama"
    aha: dict[str, Any] | None = None


class AhaMistralConfig(MistralConfig):
    model_type = "aha_mistral"
    aha: dict[str, Any] | None = None


class AhaQwen2Config(Qwen2Config):
    model_type = "aha_qwen2"
    aha: dict[str, Any] | None = None


class AhaQwen3Config(Qwen3Config):
    model_type = "aha_qwen3"
    aha: dict[str, Any] | None = None


class AhaOlmo2Config(Olmo2Config):
    model_type = "aha_olmo2"
    aha: dict[str, Any] | None = None


class AhaLlamaForCausalLM(AhaModelMixin, LlamaForCausalLM):
    config_class = AhaLlamaConfig


class AhaMistralForCausalLM(AhaModelMixin, MistralForCausalLM):
    config_class = AhaMistralConfig


class AhaQwen2ForCausalLM(AhaModelMixin, Qwen2ForCausalLM):
    config_class = AhaQwen2Config


class AhaQwen3ForCausalLM(AhaModelMixin, Qwen3ForCausalLM):
    config_class = AhaQwen3Config


class AhaOlmo2ForCausalLM(AhaModelMixin, Olmo2ForCausalLM):
    config_class = AhaOlmo2Config


#: Base model class -> its AHA model class. SmolLM2 is a Llama.
AHA_MODEL_CLASSES: dict[type[PreTrainedModel], type[PreTrainedModel]] = {
    LlamaForCausalLM: AhaLlamaForCausalLM,
    MistralForCausalLM: AhaMistralForCausalLM,
    Qwen2ForCausalLM: AhaQwen2ForCausalLM,
    Qwen3ForCausalLM: AhaQwen3ForCausalLM,
    Olmo2ForCausalLM: AhaOlmo2ForCausalLM,
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(cls.__name__ for cls in AHA_MODEL_CLASSES)


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModelForCausalLM`` resolve the ``aha_*`` model types."""
    for model_class in AHA_MODEL_CLASSES.values():
        config_class = model_class.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, model_class, exist_ok=True)


def decoder_layers(model: PreTrainedModel) -> nn.ModuleList:
    """The decoder layers (``model.model.layers``) of a supported causal LM."""
    return model.model.layers


def attach_routers(model: PreTrainedModel, settings: AhaSettings) -> None:
    """Replace ``q_proj`` of the chosen layers by a :class:`RoutedQueryProjection` (same query output)."""
    config = model.config
    for index in settings.layer_indices(config.num_hidden_layers):
        attention = decoder_layers(model)[index].self_attn
        attention.q_proj = routed_query_projection(
            attention.q_proj,
            config.num_attention_heads,
            layout=settings.router_layout,
            router_init=settings.router_init,
            router_bias=settings.router_bias,
        )


def _unsupported(model: nn.Module) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"aha.convert does not support {type(model).__name__}; supported causal LMs: "
        f"{', '.join(SUPPORTED_ARCHITECTURES)} (SmolLM2 loads as LlamaForCausalLM). Load the model with "
        "AutoModelForCausalLM so it has its language-model head"
    )


def convert(
    model: PreTrainedModel,
    *,
    window: int = 256,
    sink: int = 0,
    threshold: float = 0.5,
    router_init: RouterInit = "open",
    router_layout: RouterLayout = "separate",
    router_bias: bool = True,
    layers: list[int] | None = None,
) -> PreTrainedModel:
    """Turn a pretrained causal LM into an AHA model, in place, and return it.

    Every chosen attention layer gets a router (one logit per query head per token, read from the
    attention input) and all attention runs through :func:`aha.aha_attention` via the registered
    ``"aha"`` attention implementation. The model becomes an instance of the matching
    ``Aha*ForCausalLM`` class (and its config of ``Aha*Config``), so ``save_pretrained`` writes
    the AHA settings into ``config.json`` and the routers into the weights.

    Args:
        model: a ``*ForCausalLM`` of a family in :data:`SUPPORTED_ARCHITECTURES`, without
            sliding-window layers.
        window, sink, threshold, router_init, router_layout, router_bias, layers: see :class:`AhaSettings`.

    Returns:
        ``model`` itself. In ``model.train()`` mode routes are the STE float gate, in eval mode
        hard bool routes (True = global). With ``router_init="open"`` its logits equal the
        original model's exactly.

    Raises:
        UnsupportedModelError: unsupported architecture, sliding-window layers, or already converted.
    """
    if isinstance(model, AhaModelMixin):
        raise UnsupportedModelError(f"{type(model).__name__} is already an AHA model")
    aha_class = AHA_MODEL_CLASSES.get(type(model))
    if aha_class is None:
        raise _unsupported(model)
    if getattr(model.config, "sliding_window", None) is not None:
        raise UnsupportedModelError(
            f"this model uses sliding-window attention (config.sliding_window={model.config.sliding_window}), but "
            "AHA's global branch is full attention; load it with sliding_window=None (Mistral) or "
            "use_sliding_window=False (Qwen) to convert it"
        )
    settings = AhaSettings(
        window=window,
        sink=sink,
        threshold=threshold,
        router_layout=router_layout,
        router_init=router_init,
        router_bias=router_bias,
        layers=None if layers is None else tuple(layers),
    )
    settings.layer_indices(model.config.num_hidden_layers)  # validate before changing anything
    # The one place where classes change in place: the instance becomes the AHA subclass it would
    # have been had it been loaded as an AHA checkpoint (same modules, same parameters).
    model.config.__class__ = aha_class.config_class
    model.config.aha = settings.to_dict()
    model.__class__ = aha_class
    attach_routers(model, settings)
    model.set_attn_implementation(ATTN_IMPLEMENTATION)
    return model


def is_aha_model(model: nn.Module) -> bool:
    """True for a model converted by :func:`convert` or loaded from an AHA checkpoint."""
    return isinstance(model, AhaModelMixin)


#: ``config.json`` ``model_type`` of the released AHA-OLMO2 checkpoint (``xuan-luo/AHA-OLMO2``).
RELEASED_AHA_OLMO2_MODEL_TYPE = "faolmo"
_RELEASED_ONLY_KEYS = ("model_type", "architectures", "auto_map", "attention_implementation", "local_window_size")


def released_aha_olmo2_config(config_dict: dict[str, Any]) -> AhaOlmo2Config:
    """Translate the released AHA-OLMO2 ``config.json`` (``model_type="faolmo"``) to :class:`AhaOlmo2Config`.

    Its ``q_proj`` is the fused layout without bias: ``[heads * head_dim + heads, hidden]``, the
    router rows last; the window is ``local_window_size`` (128 in the release), threshold 0.5.
    """
    settings = AhaSettings(
        window=int(config_dict.get("local_window_size", 128)),
        threshold=0.5,
        router_layout="fused",
        router_init="random",
        router_bias=False,
    )
    olmo2_fields = {k: v for k, v in config_dict.items() if k not in _RELEASED_ONLY_KEYS}
    return AhaOlmo2Config(**olmo2_fields, aha=settings.to_dict())


def _released_config(name_or_path: str | Path) -> PretrainedConfig | None:
    """Our config for a checkpoint in the released AHA-OLMO2 layout; None for any other checkpoint."""
    config_dict, _ = PretrainedConfig.get_config_dict(name_or_path)
    if config_dict.get("model_type") == RELEASED_AHA_OLMO2_MODEL_TYPE:
        return released_aha_olmo2_config(config_dict)
    return None


def from_pretrained(name_or_path: str | Path, **kwargs: Any) -> PreTrainedModel:
    """Load a causal LM: an AHA checkpoint (ours or the released AHA-OLMO2 layout) or a plain one.

    Plain checkpoints come back unconverted (call :func:`convert`); AHA checkpoints come back
    routed. ``kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``, ...).
    """
    released = _released_config(name_or_path)
    if released is not None:
        return AhaOlmo2ForCausalLM.from_pretrained(name_or_path, config=released, **kwargs)
    return AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)


def empty_model(name_or_path: str | Path, *, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model :func:`from_pretrained` would load, with its parameters on the meta device: no
    memory, and the checkpoint's weights are not read (only its config).

    Buffers are real: non-persistent ones (rotary ``inv_freq``) are computed from the config, as a
    load would. For a process whose weights arrive from another, e.g. FSDP training with
    ``cpu_ram_efficient_loading``, where accelerate broadcasts the main process's weights into
    every process's shards.
    """
    try:
        from accelerate import init_empty_weights
    except ImportError as error:
        from aha._optional import reraise_missing

        raise reraise_missing(error, "building a model without its weights") from error

    config = _released_config(name_or_path) or AutoConfig.from_pretrained(name_or_path)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # from_pretrained ties after loading; from_config leaves meta parameters untied
    return model
