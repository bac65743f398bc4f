"""The AHA settings of a model (:class:`AhaSettings`): the one reader of the ``"aha"`` block of
``config.json``.

Everything that needs a model's window, sink or threshold goes through this class: the attention
hot path (:meth:`AhaSettings.of`, parsed once per distinct block), the trainer and ``aha eval``
(:meth:`AhaSettings.check_matches`), and the settings dataclasses of the recipes, whose
``window`` / ``sink`` / ``threshold`` fields take their defaults and help texts from here
(:func:`routing_field`).

Versions of the block: 1 (no ``"version"`` key: every block written before versions existed,
including those without ``sink``) and 2 (the current one, written by :meth:`AhaSettings.to_dict`).
Older blocks are migrated on read (:data:`MIGRATIONS`), as PEFT migrates old adapter configs;
blocks of a newer version are refused with a message.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar, get_args

from aha.hf.projection import RouterLayout
from aha.router import RouterInit


class UnsupportedModelError(ValueError):
    """The model cannot be converted to AHA; the message says why and what is supported."""


def _migrate_v1(block: dict[str, Any]) -> dict[str, Any]:
    """Version 1 (no ``"version"``): keys a block lacks take their defaults (``sink`` = 0, the
    behaviour before sinks existed), which the dataclass defaults already do."""
    return block


#: ``from_version -> function`` turning a block of that version into one of the next version.
MIGRATIONS: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _migrate_v1}


def _setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _problems(s: Any) -> list[str]:
    """What is wrong with the settings ``s`` (an object with the :class:`AhaSettings` attributes),
    one message per setting; empty when valid."""
    problems = []
    if isinstance(s.window, bool) or not isinstance(s.window, int) or s.window < 1:
        problems.append(f"window must be an int >= 1 (keys a local query sees, its own included), got {s.window!r}")
    if isinstance(s.sink, bool) or not isinstance(s.sink, int) or s.sink < 0:
        problems.append(f"sink must be an int >= 0 (first keys local queries also see; 0 = none), got {s.sink!r}")
    if not isinstance(s.threshold, (int, float)) or not 0.0 < s.threshold < 1.0:
        problems.append(f"threshold must be in (0, 1), got {s.threshold}")
    if s.router_layout not in get_args(RouterLayout):
        problems.append(f"router_layout must be one of {get_args(RouterLayout)}, got {s.router_layout!r}")
    if s.router_init not in get_args(RouterInit):
        problems.append(f"router_init must be one of {get_args(RouterInit)}, got {s.router_init!r}")
    elif s.router_init == "open" and not s.router_bias:
        problems.append(
            "router_init='open' needs router_bias=True (an open router is zero weight plus a positive bias); "
            "use router_init='random' for a bias-free router"
        )
    return problems


@dataclass(frozen=True)
class AhaSettings:
    """The AHA settings of a model, stored in ``config.json`` under ``"aha"``.

    Args:
        window: keys a local query sees, its own included (positions ``p - window + 1 .. p``).
        sink: attention-sink keys: local queries also see the first ``sink`` keys (0, the default,
            is the paper's operator; see :func:`aha.aha_attention`).
        threshold: a (token, head) goes global when ``sigmoid(logit) > threshold``.
        router_layout: ``"separate"`` (a :class:`aha.Router` at ``q_proj.router``) or ``"fused"``
            (``q_proj`` widened by ``num_heads`` rows: the released AHA-OLMO2 layout).
        router_init: how fresh routers start. ``"open"`` (default): zero weight, bias
            :data:`aha.OPEN_BIAS`, every head global, so the converted model equals the
            original exactly -- the choice for fine-tuning a pretrained model. ``"random"``: small
            random weight, zero bias, about half the pairs global -- for learning routes from
            scratch.
        router_bias: whether routers have a bias (``"open"`` needs one). With the fused layout
            the router bias is the tail of ``q_proj.bias``: on a bias-free ``q_proj`` a bias is
            added (query rows zero), and a ``q_proj`` that has a bias (Qwen2) always gives the
            router one. The released AHA-OLMO2 checkpoint has none.
        layers: indices of the converted layers, or None for all. Other layers run full attention.
    """

    #: Version of the ``"aha"`` block this class writes (see the module docstring).
    VERSION: ClassVar[int] = 2

    window: int = _setting(256, "local window: keys a local query sees, its own included")
    sink: int = _setting(
        0,
        "attention-sink keys: local queries also see the first N keys (0 = the paper's operator; 1 keeps the "
        "pretrained model's sink token in view of local heads)",
    )
    threshold: float = _setting(0.5, "a (token, head) goes global when sigmoid(router logit) > threshold")
    router_layout: RouterLayout = _setting("separate", "'separate' routers, or 'fused' into q_proj (the AHA-OLMO2 layout)")
    router_init: RouterInit = _setting("open", "'open': all heads start global (the converted model equals the original)")
    router_bias: bool = _setting(True, "whether routers have a bias ('open' needs one)")
    layers: tuple[int, ...] | None = _setting(None, "indices of the converted layers (None = all)")

    def __post_init__(self) -> None:
        problems = _problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(i) for i in self.layers})))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (what ``config.aha`` holds), with the block's ``"version"``."""
        settings = dataclasses.asdict(self)
        settings["layers"] = None if self.layers is None else list(self.layers)
        return {"version": self.VERSION, **settings}

    @classmethod
    def from_dict(cls, block: Mapping[str, Any]) -> AhaSettings:
        """Read and validate an ``"aha"`` block of any version (older ones are migrated).

        ``window`` is required; other missing keys take their defaults (blocks written before a
        setting existed, e.g. ``sink``, keep their old behaviour); unknown keys are ignored with a
        warning; bad values (a layer listed twice included) raise ``ValueError`` naming the key; a
        block of a newer version than this aha knows raises ``ValueError``.
        """
        if not isinstance(block, Mapping):
            raise TypeError(f'the "aha" block of the model config must be a mapping of settings, got {type(block).__name__}')
        block = dict(block)
        version = block.pop("version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(
                f'the "aha" block of the model config has version {version!r}, but a version is an integer from 1 '
                f"(this aha writes {cls.VERSION}): the block was edited by hand or by another tool; restore its version"
            )
        if version > cls.VERSION:
            raise ValueError(
                f'the "aha" block of the model config has version {version!r}, but this aha reads versions 1 to '
                f"{cls.VERSION}: upgrade aha (pip install -U aha-attention) to load this model"
            )
        for old in range(version, cls.VERSION):
            block = MIGRATIONS[old](block)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(block) - known)
        if unknown:
            warnings.warn(
                f'ignoring unknown key(s) {unknown} in the "aha" block of the model config (known: {sorted(known)})',
                stacklevel=3,
            )
        layers = block.get("layers")
        repeated = [index for n, index in enumerate(layers) if index in layers[:n]] if isinstance(layers, list) else []
        if repeated:
            raise ValueError(
                f'invalid "aha" block in the model config: layers lists {repeated} more than once; list each converted '
                "layer once (the checkpoint holds one router per converted layer)"
            )
        if "window" not in block:
            raise ValueError('the "aha" block of the model config has no "window": set it to the window the model was trained with')
        try:
            return cls(**{key: value for key, value in block.items() if key in known})
        except (TypeError, ValueError) as error:
            raise ValueError(f'invalid "aha" block in the model config: {error}') from None

    @classmethod
    def from_config(cls, config: Any) -> AhaSettings:
        """Read and validate the settings of an AHA config (``config.aha``, the ``"aha"`` block of
        ``config.json``); see :meth:`from_dict`."""
        block = getattr(config, "aha", None)
        if block is None:
            raise UnsupportedModelError(f"{type(config).__name__} holds no AHA settings; convert the model with aha.convert")
        return cls.from_dict(block)

    @classmethod
    def of(cls, config: Any) -> AhaSettings:
        """:meth:`from_config`, cached by the block's content: the attention layers call it on every
        forward, and a block is parsed (and warned about) once, however many layers and steps read it.
        A block edited in place is read again."""
        block = getattr(config, "aha", None)
        if not isinstance(block, Mapping):
            return cls.from_config(config)
        last = _last_parsed
        if last is not None and last[0] == block:  # a dict comparison: every layer of every step lands here
            return last[1]
        try:
            key = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in block.items()))
            settings = _parse_cached(key)
        except TypeError:  # unhashable values: not a block we wrote; parse (and report) it directly
            return cls.from_dict(block)
        _remember_parsed({k: list(v) if isinstance(v, list) else v for k, v in block.items()}, settings)
        return settings

    def layer_indices(self, num_layers: int) -> list[int]:
        """The converted layer indices of a model with ``num_layers`` decoder layers."""
        if self.layers is None:
            return list(range(num_layers))
        bad = [i for i in self.layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"layers {bad} do not exist: the model has {num_layers} decoder layers (0..{num_layers - 1})")
        return list(self.layers)

    def check_matches(self, what: str, remedy: str | None = None, **requested: Any) -> None:
        """Raise ``ValueError`` when a requested setting differs from this model's.

        ``requested`` maps setting names to the values a command asked for (None = not asked, any
        value fits). The message names ``what`` (the model), its own values of the requested
        settings, and ``remedy``; by default "omit --<flag> or pass <the model's value>".
        """
        asked = {name: value for name, value in requested.items() if value is not None}
        differing = [name for name, value in asked.items() if getattr(self, name) != value]
        if not differing:
            return
        own = ", ".join(f"{name}={getattr(self, name)}" for name in asked)
        if remedy is None:
            flags = " and ".join("--" + name.replace("_", "-") for name in differing)
            remedy = f"omit {flags} or pass {' and '.join(str(getattr(self, name)) for name in differing)}"
        raise ValueError(f"{what} is already an AHA model with {own}; {remedy}")


_last_parsed: tuple[dict[str, Any], AhaSettings] | None = None


def _remember_parsed(snapshot: dict[str, Any], settings: AhaSettings) -> None:
    """Keep the last block parsed (a copy, so that an edit in place no longer matches it)."""
    global _last_parsed
    _last_parsed = (snapshot, settings)


@functools.lru_cache(maxsize=64)
def _parse_cached(key: tuple[tuple[str, Any], ...]) -> AhaSettings:
    return AhaSettings.from_dict({k: list(v) if isinstance(v, tuple) else v for k, v in key})


#: Settings a training or demo run chooses (the rest of :class:`AhaSettings` keeps its defaults).
ROUTING_FIELDS = ("window", "sink", "threshold", "router_init")


def routing_field(name: str, default: Any = dataclasses.MISSING) -> Any:
    """A dataclass field mirroring :class:`AhaSettings` field ``name``: its help text, and its
    default unless ``default`` is given. Settings dataclasses that choose routing settings (the
    training config, the demo) declare them with this, so help and defaults live in one place."""
    setting = next(f for f in dataclasses.fields(AhaSettings) if f.name == name)
    return field(default=setting.default if default is dataclasses.MISSING else default, metadata=dict(setting.metadata))


def routing_problems(source: Any) -> list[str]:
    """What is wrong with the :data:`ROUTING_FIELDS` of ``source`` (see :func:`routing_settings`),
    one message per setting; empty when valid."""
    values = {f.name: f.default for f in dataclasses.fields(AhaSettings)}
    values.update({name: getattr(source, name) for name in ROUTING_FIELDS if hasattr(source, name)})
    return _problems(SimpleNamespace(**values))


def routing_settings(source: Any) -> AhaSettings:
    """The :class:`AhaSettings` of an object with the :data:`ROUTING_FIELDS` attributes (a training
    config, the demo settings); the other settings keep their defaults."""
    return AhaSettings(**{name: getattr(source, name) for name in ROUTING_FIELDS if hasattr(source, name)})
