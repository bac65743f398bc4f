"""``aha serve``: an OpenAI-compatible endpoint for an AHA model."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from aha.cli import app
from aha.cli.options import flags, with_flags
from aha.serving.server import ServeSettings


@app.command("serve")
@with_flags(flags(ServeSettings))
def serve_command(
    model: Annotated[str, typer.Argument(help="AHA model folder (e.g. a training run's model/), a plain one with --window, or smollm2-135m")],
    **given: Any,
) -> None:
    """Serve MODEL over an OpenAI-compatible API (/v1/chat/completions, /v1/completions, /v1/models, /health, /metrics)."""
    from aha._optional import require
    from aha.serving import serve
    from aha.serving.server import ModelProcessDied

    for package in ("fastapi", "uvicorn", "openai", "prometheus_client"):
        require(package, "aha serve", extra="serve")
    try:
        serve(model, ServeSettings(**given))
    except ModelProcessDied as error:  # for whatever runs the server to restart it
        typer.echo(f"aha serve: {error}", err=True)
        raise typer.Exit(1) from None
