"""The ``aha`` command line. Each sub-command lives in its own module and registers itself here."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="aha",
    help="All-or-Here Attention: teach an LLM when to attend globally, then run it faster.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _root() -> None:
    """All-or-Here Attention: teach an LLM when to attend globally, then run it faster."""


@app.command()
def version() -> None:
    """Print the aha, torch and transformers versions."""
    import torch
    import transformers

    import aha

    typer.echo(f"aha {aha.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")


from aha.cli import bench as _bench  # noqa: E402,F401  (registers `aha bench`)
from aha.cli import eval as _eval  # noqa: E402,F401  (registers `aha eval`, `aha sweep`, `aha lm-eval`)
from aha.cli import train as _train  # noqa: E402,F401  (registers `aha train`)
from aha.cli import demo as _demo  # noqa: E402,F401  (registers `aha demo`)
