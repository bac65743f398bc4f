"""The ``aha`` command line. Each sub-command lives in its own module and registers itself here;
its flags are generated from its settings dataclass (:mod:`aha.cli.options`)."""

from __future__ import annotations

import os
import shlex
import sys
import traceback
from pathlib import Path

from aha._optional import MissingExtraError, reraise_missing

try:
    import typer
    from typer.core import TyperGroup
except ImportError as error:
    raise reraise_missing(error, "the aha command") from error


class _RecordingGroup(TyperGroup):
    """The root command group; records the command line it runs for the reports' ``meta.command``
    (every entry point, the console script and ``typer.testing.CliRunner`` alike, goes through ``main``)."""

    def main(self, args=None, prog_name=None, *rest, **options):  # type: ignore[override]
        from aha.report.provenance import record_cli_command

        argv = list(sys.argv[1:] if args is None else args)
        previous = record_cli_command(shlex.join([prog_name or "aha", *argv]))
        try:
            return super().main(argv, prog_name, *rest, **options)
        finally:
            record_cli_command(previous)


app = typer.Typer(
    name="aha",
    cls=_RecordingGroup,
    help="All-or-Here Attention: teach an LLM when to attend globally, then run it faster.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # main() prints user errors as one line; --debug shows tracebacks
)


def _is_user_error(error: BaseException) -> bool:
    """Whether ``error`` means "the input is wrong" (its message names the fix), not "aha is broken":
    aha's own input errors, a missing file, and a ValueError or FloatingPointError raised by aha's own
    checks. The same types raised inside torch, transformers or elsewhere are bugs to report, with
    their traceback."""
    import yaml

    from aha.data import DataSourceError
    from aha.hf import UnsupportedModelError
    from aha.kernels import AhaInputError
    from aha.train.checkpoint import CheckpointError

    if isinstance(error, (AhaInputError, DataSourceError, MissingExtraError, UnsupportedModelError, CheckpointError,
                          yaml.YAMLError, FileNotFoundError)):  # fmt: skip
        return True
    if not isinstance(error, (ValueError, FloatingPointError)) or error.__traceback__ is None:
        return False
    raised_in = Path(traceback.extract_tb(error.__traceback__)[-1].filename).resolve()
    return raised_in.is_relative_to(Path(__file__).resolve().parents[1])


def main(argv: list[str] | None = None) -> None:
    """The ``aha`` console command: a user error ends with one line naming the fix (exit code 2);
    ``--debug`` (anywhere on the line) or ``AHA_DEBUG=1`` shows the full traceback instead."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("AHA_DEBUG") == "1"
    args = [arg for arg in args if arg != "--debug"]
    try:
        app(args=args, prog_name="aha")  # usage errors and BadParameter: typer prints them and exits
    except Exception as error:
        if debug or not _is_user_error(error):
            raise
        message = str(error).strip() or type(error).__name__
        typer.echo(f"aha: error: {message}\n(run with --debug for the traceback)", err=True)
        sys.exit(2)


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


from aha.cli import bench as _bench  # registers `aha bench`
from aha.cli import demo as _demo  # registers `aha demo`
from aha.cli import eval as _eval  # registers `aha eval`, `aha sweep`, `aha lm-eval`
from aha.cli import report as _report  # registers `aha report render|check|compare`
from aha.cli import serve as _serve  # registers `aha serve`
from aha.cli import train as _train  # registers `aha train`
