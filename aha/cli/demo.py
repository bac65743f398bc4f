"""``aha demo``: the whole AHA story on one model, from a fresh machine to a report."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer

from aha.cli import app


@app.command()
def demo(
    model: Optional[str] = typer.Option(None, help="Model name (smollm2-135m) or local HF folder. [default: smollm2-135m]"),
    data: Optional[str] = typer.Option(None, help="Comma-separated data specs: corpus names, files, folders, hf:<dataset>. [default: default]"),
    window: Optional[int] = typer.Option(None, help="Local window of the routed heads. [default: 128]"),
    sink: Optional[int] = typer.Option(None, help="Attention-sink keys local heads also see (0 = the paper's pure window). [default: 1]"),
    steps: Optional[int] = typer.Option(None, help="Fine-tuning steps (more steps: better routing). [default: 120]"),
    seq_len: Optional[int] = typer.Option(None, help="Training and evaluation sequence length. [default: 512]"),
    target_global: Optional[float] = typer.Option(None, help="Target global fraction of (token, head) pairs. [default: 0.2]"),
    out: Path = typer.Option(Path("report"), help="Report folder (re-running with the same settings resumes)."),
    quick: bool = typer.Option(False, "--quick", help="Smoke run on a tiny budget (CI): same stages, meaningless numbers."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the report folder first instead of resuming."),
) -> None:
    """Convert a pretrained LLM to AHA, fine-tune it to route, evaluate it, time it, and write a report."""
    from aha.recipes.demo import DemoSettings, run_demo

    overrides = {
        "model": model,
        "data": tuple(d for d in data.split(",") if d) if data else None,
        "window": window,
        "sink": sink,
        "steps": steps,
        "seq_len": seq_len,
        "target_global": target_global,
        "out": str(out),
    }
    overrides = {k: v for k, v in overrides.items() if v is not None}
    settings = DemoSettings.quick_settings(**overrides) if quick else DemoSettings(**overrides)
    if fresh and out.exists():
        shutil.rmtree(out)
    try:
        run_demo(settings)
    except KeyboardInterrupt as stop:
        typer.echo(f"\ninterrupted: {stop or 'run the same command again to resume'}", err=True)
        raise typer.Exit(130) from None
