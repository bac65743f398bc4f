"""``aha demo``: the whole AHA story on one model, from a fresh machine to a report."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from aha.cli import app
from aha.cli.options import flags, with_flags
from aha.recipes.demo import DemoSettings


@app.command()
@with_flags(flags(DemoSettings))
def demo(
    quick: Annotated[bool, typer.Option("--quick", help="Smoke run on a tiny budget (CI): same stages, meaningless numbers.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh", help="Delete the report folder first instead of resuming.")] = False,
    **given: Any,
) -> None:
    """Convert a pretrained LLM to AHA, fine-tune it to route, evaluate it, time it, and write a report."""
    from aha.recipes.demo import run_demo

    settings = DemoSettings.quick_settings(**given) if quick else DemoSettings(**given)
    out = Path(settings.out)
    if fresh and out.exists():
        shutil.rmtree(out)
    try:
        run_demo(settings)
    except KeyboardInterrupt as stop:
        typer.echo(f"\ninterrupted: {stop or 'run the same command again to resume'}", err=True)
        raise typer.Exit(130) from None
