"""``aha train``: fine-tune a model to route (see :mod:`aha.train`).

Every :class:`aha.train.TrainConfig` field is a flag (``seq_len`` -> ``--seq-len``), generated from
the dataclass by :mod:`aha.cli.options` (as every command's flags are) so the two cannot drift apart; ``--config`` reads a YAML or TOML file of the same
fields, and flags given on the command line override it. Runs unchanged under
``accelerate launch -m aha.cli train ...`` (``python -m aha.cli`` is the same program).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from aha.cli import app
from aha.cli.options import config_file, flags, with_flags
from aha.train.config import TrainConfig, load_config


@app.command("train")
@with_flags(flags(TrainConfig))
def train_command(
    config: Annotated[Path | None, config_file("YAML or TOML file of these options (flags override it)")] = None,
    **overrides: Any,
) -> None:
    """Fine-tune a causal LM to route each (token, head) to global or local attention.

    Examples:

        aha train --model smollm2-135m --data default --window 256 --target-global 0.1 --steps 300 --seq-len 1024 --out runs/smol

        accelerate launch --num_processes 2 -m aha.cli train --config train.yaml

        accelerate launch --use_fsdp --fsdp_version 2 --num_processes 8 -m aha.cli train --config train.yaml
    """
    from aha.data import DataSourceError
    from aha.recipes.finetune import train
    from aha.train.checkpoint import CheckpointError

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

