"""``aha report``: the published tables and the reports behind them.

* ``aha report render`` rewrites every table block of README.md, benchmarks/RESULTS.md and docs/
  from the committed JSON reports it names (:mod:`aha.report.published`);
* ``aha report check`` fails when a table differs from its reports or a report is missing (the
  test suite runs it);
* ``aha report compare`` compares two models' ``eval.json`` on the same sequences and prompts, with
  intervals, and writes the comparison as a report (:mod:`aha.evaluation.compare`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from aha.cli import app

report_app = typer.Typer(help="Render and check the published tables from their JSON reports; compare two evaluations.", no_args_is_help=True)
app.add_typer(report_app, name="report")

_FILES_HELP = "Markdown files (default: README.md, benchmarks/RESULTS.md, docs/*.md under --root)."
_ROOT_HELP = "Repository root: report paths in the tables are relative to it."


def _render(files: list[Path] | None, root: Path, *, write: bool) -> tuple[list[Path], int]:
    """Render (or only check) the blocks of ``files`` (default: the published files under ``root``);
    prints each problem and returns the files and the number of problems."""
    from aha.report.published import published_files, render_files

    problems = render_files(files or published_files(root), root, write=write)
    for path, found in problems.items():
        for problem in found:
            typer.echo(f"{path}: {problem}", err=True)
    return list(problems), sum(len(found) for found in problems.values())


@report_app.command("render")
def render(
    files: Annotated[list[Path] | None, typer.Argument(help=_FILES_HELP)] = None,
    root: Annotated[Path, typer.Option(help=_ROOT_HELP)] = Path("."),
) -> None:
    """Rewrite every table block from the reports it names (tables whose reports fail stay as they are)."""
    rendered, count = _render(files, root, write=True)
    if count:
        raise typer.Exit(1)
    typer.echo(f"rendered {', '.join(map(str, rendered))}")


@report_app.command("check")
def check(
    files: Annotated[list[Path] | None, typer.Argument(help=_FILES_HELP)] = None,
    root: Annotated[Path, typer.Option(help=_ROOT_HELP)] = Path("."),
) -> None:
    """Fail (exit 1) when a table differs from its reports, names none, or names a missing report."""
    checked, count = _render(files, root, write=False)
    if count:
        typer.echo(f"{count} published table(s) do not match their reports", err=True)
        raise typer.Exit(1)
    typer.echo(f"every table matches its reports ({', '.join(map(str, checked))})")


@report_app.command("compare")
def compare(
    report: Annotated[Path, typer.Argument(help="eval.json of the model compared (aha eval)")],
    reference: Annotated[Path, typer.Argument(help="eval.json of the reference model, on the same sequences and prompts")],
    out: Annotated[Path, typer.Option(help="the comparison report to write (e.g. benchmarks/results/compare-....json)")],
    mode: Annotated[str, typer.Option(help="routing mode of the first report's model")] = "aha",
    reference_mode: Annotated[str, typer.Option(help="routing mode of the reference model")] = "full",
) -> None:
    """Perplexity change (paired bootstrap over sequences) and passkey accuracy difference (Newcombe,
    paired over prompts) of one model against another, each with its 95% interval."""
    from aha.evaluation.compare import SCHEMA, compare_evaluations
    from aha.report.provenance import run_meta, write_json_report

    first, second = (json.loads(path.read_text()) for path in (report, reference))
    try:
        result = compare_evaluations(first, second, mode=mode, reference_mode=reference_mode)
    except ValueError as error:  # the message names the fix
        raise typer.BadParameter(str(error)) from None
    sources = {
        name: {"path": str(path), "model": data.get("model"), "mode": routing, "meta": data.get("meta")}
        for name, path, data, routing in (("report", report, first, mode), ("reference", reference, second, reference_mode))
    }
    write_json_report(out, {"schema": SCHEMA, "meta": run_meta(), "sources": sources, **result})
    if result["perplexity"]:
        p = result["perplexity"]
        typer.echo(f"perplexity {p['value']:.3f} vs {p['reference']:.3f}: {p['change']:+.2%} [95% CI {p['low']:+.2%}, {p['high']:+.2%}] "
                   f"over {p['sequences']} sequences")  # fmt: skip
    if result["passkey"]:
        for length, d in result["passkey"]["by_context_length"].items():
            typer.echo(f"passkey at {length}: {d['accuracy']:.0%} vs {d['reference_accuracy']:.0%}, difference "
                       f"{d['difference']:+.0%} [95% CI {d['low']:+.0%}, {d['high']:+.0%}] over {d['prompts']} prompts")  # fmt: skip
    typer.echo(f"wrote {out}")
