"""``aha train``: fine-tune a model to route (see :mod:`aha.train`).

Every :class:`aha.train.TrainConfig` field is a flag (``seq_len`` -> ``--seq-len``), generated from
the dataclass so the two cannot drift apart; ``--config`` reads a YAML or TOML file of the same
fields, and flags given on the command line override it. Runs unchanged under
``accelerate launch -m aha.cli train ...`` (``python -m aha.cli`` is the same program).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import Any

import typer

from aha.cli import app
from aha.train.config import TrainConfig, config_fields, load_config


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _field_parameter(field: dataclasses.Field, hint: Any) -> inspect.Parameter:
    """A keyword parameter whose default is a ``typer.Option`` with ``None`` meaning "not given"."""
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default  # type: ignore[misc]
    help_text = f"{field.metadata['help']} (default: {default})"
    if hint is bool:
        option = typer.Option(None, f"{_flag(field.name)}/--no-{field.name.replace('_', '-')}", help=help_text)
    else:
        option = typer.Option(None, _flag(field.name), help=help_text)
    annotation = hint | None if type(None) not in typing.get_args(hint) else hint
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def train_command(config: Path | None = None, **overrides: Any) -> None:
    """Fine-tune a causal LM to route each (token, head) to global or local attention.

    Examples:

        aha train --model smollm2-135m --data default --window 256 --target-global 0.1 --steps 300 --seq-len 1024 --out runs/smol

        accelerate launch --num_processes 2 -m aha.cli train --config train.yaml
    """
    from aha.data import DataSourceError
    from aha.recipes.finetune import train
    from aha.train.checkpoint import CheckpointError

    if not overrides.get("data"):
        overrides.pop("data", None)  # an absent repeatable flag arrives as an empty list
    try:
        settings = load_config(config, overrides)
    except (ValueError, OSError) as error:
        raise typer.BadParameter(str(error)) from None
    try:
        result = train(settings)
    except DataSourceError as error:
        raise typer.BadParameter(str(error), param_hint="--data") from None
    except (CheckpointError, FloatingPointError) as error:  # the message says what to do
        typer.echo(str(error), err=True)
        raise typer.Exit(1) from None
    lines = [f"trained {result.history[-1]['step'] if result.history else 'no new'} steps -> {result.out}"]
    lines.append(f"achieved global fraction (last steps): {result.achieved_global:.4f}")
    if result.evaluation is not None:
        ev = result.evaluation
        lines.append(f"held-out perplexity {ev['perplexity']:.4f}, global fraction {ev['global_fraction']:.4f}, attention compute ratio {ev['compute_ratio']:.4f}")
    typer.echo("\n".join(lines))


_hints = typing.get_type_hints(TrainConfig)
_config_parameter = inspect.Parameter(
    "config",
    inspect.Parameter.KEYWORD_ONLY,
    default=typer.Option(None, "--config", "-c", help="YAML or TOML file of these options (flags override it)", exists=True, dir_okay=False),
    annotation=Path | None,
)
train_command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    [_config_parameter, *(_field_parameter(f, _hints[f.name]) for f in config_fields())]
)
app.command("train")(train_command)
