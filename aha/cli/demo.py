"""``aha demo``: the whole AHA story on one model, from a fresh machine to a report."""

from __future__ import annotations

import shutil
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from aha.cli import app
from aha.cli.options import flags, with_flags
from aha.recipes.demo import DemoSettings


class Preset(str, Enum):
    """Starting points of ``aha demo``; flags given with ``--preset`` override its values."""

    default = "default"
    paper = "paper"


@app.command()
@with_flags(flags(DemoSettings))
def demo(
    preset: Annotated[
        Preset,
        typer.Option(
            "--preset",
            help="default: about 20 min on 2 CPU cores. paper: the paper's regime (window 256 + 1 sink key, "
            "1024-token sequences, 200 steps to 10% global, passkey up to 8K; an hour or more on 2 CPU cores).",
        ),
    ] = Preset.default,
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run on a tiny budget (CI): same stages, meaningless numbers.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete the report folder first instead of resuming.")] = False,
    **given: Any,
) -> None:
    """Convert a pretrained LLM to AHA, fine-tune it to route, evaluate it, time it, and write a report."""
    from aha.recipes.demo import run_demo

    if quick and preset is not Preset.default:
        raise typer.BadParameter("--quick is a smoke run of the default preset; drop --quick or --preset")
    if quick:
        settings = DemoSettings.quick_settings(**given)
    elif preset is Preset.paper:
        settings = DemoSettings.paper_settings(**given)
    else:
        settings = DemoSettings(**given)
    out = Path(settings.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    try:
        run_demo(settings)
    except KeyboardInterrupt as stop:
        typer.echo(f"\ninterrupted: {stop or 'run the same command again to resume'}", err=True)
        raise typer.Exit(130) from None
