"""``aha bench``: run the benchmark suite, print tables and write JSON."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from aha._fields import option
from aha.benchmarking import BenchConfig
from aha.cli import app
from aha.cli.options import flags, with_flags


@app.command()
@with_flags(flags(BenchConfig))
def bench(
    groups: Annotated[str, typer.Option(help="Comma-separated benchmark groups to run.")] = "kernels",
    quick: Annotated[bool, typer.Option("--quick", help="CI smoke sweep: finishes in well under a minute.")] = False,
    out: Annotated[Path | None, typer.Option(help="Folder for the JSON report (bench-<timestamp>.json).")] = None,
    rounds: Annotated[int | None, typer.Option(help="Round-robin rounds per measurement.")] = None,
    clock: Annotated[
        str, typer.Option(help="wall, or cpu: single-thread CPU time, robust to other jobs on a busy machine (needs --threads 1).")
    ] = "wall",
    **given: Any,
) -> None:
    """Benchmark AHA attention against SDPA causal (ratios measured in the same run, noise-robust)."""
    from aha.benchmarking import print_report, run_benchmarks, write_report

    config = replace(BenchConfig.quick_config() if quick else BenchConfig(), **given)
    if rounds is not None:
        config.timing.rounds = rounds
    config.timing.clock = clock
    try:
        report = run_benchmarks(config, [g.strip() for g in groups.split(",") if g.strip()])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    print_report(report)
    if out is not None:
        typer.echo(f"wrote {write_report(report, out)}")


@dataclass
class CalibrateSettings:
    """What ``aha calibrate`` measures."""

    dtypes: Sequence[str] = option(
        "Comma-separated dtypes to measure (float32, bfloat16, float16).", "--dtype", default=("float32", "bfloat16")
    )
    threads: int | None = option("torch threads (default: torch's default here; the choice is kept per thread count).", default=None)
    lengths: Sequence[int] = option(
        "Comma-separated sequence lengths to time at (small ones only check the path; the cost model is "
        "extrapolated past the longest).", default=(1024, 4096)
    )


@app.command()
@with_flags(flags(CalibrateSettings))
def calibrate(**given: Any) -> None:
    """Measure which CPU microkernel is fastest here and above which global fraction SDPA wins; cache it.

    ``impl="auto"`` does this by itself on first use of a dtype; run it again after changing the
    machine's load or the torch build. ``AHA_CPU_TUNING=off`` disables the measurement.
    """
    import torch
    from rich.console import Console
    from rich.table import Table

    from aha.kernels.cpp import cpp_available
    from aha.kernels.cpu_tuning import (
        KernelChoice,
        cpu_isa,
        cpu_model,
        microkernel_name,
        recalibrate,
        tuning_path,
    )

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    settings = CalibrateSettings(**given)
    names = list(settings.dtypes)
    unknown = [name for name in names if name not in dtypes]
    if unknown:
        raise typer.BadParameter(f"unknown dtype(s) {unknown}; choose from {list(dtypes)}")
    if not cpp_available():
        raise typer.BadParameter("the C++ kernel is unavailable, so there is nothing to calibrate (see `aha bench`)")
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if not settings.lengths or min(settings.lengths) < 16:
        raise typer.BadParameter(f"--lengths must be sequence lengths >= 16, got {list(settings.lengths)}")
    table = Table(title=f"{cpu_model()} ({cpu_isa()}), {torch.get_num_threads()} threads", title_justify="left")
    for column in ("dtype", "microkernel", "forward: split from fraction (4K / 16K / 64K)", "forward+backward", "skipped", "cache"):
        table.add_column(column)
    def crossovers(choice: KernelChoice, training: bool) -> str:
        values = [choice.crossover(n, training) for n in (4096, 16384, 65536)]
        return " / ".join("never" if x > 1 else f"{x:.2f}" for x in values)

    failed = []
    for name in names:
        dtype = dtypes[name]
        try:
            choice = recalibrate([dtype], tuple(sorted(set(settings.lengths))))[dtype]
        except RuntimeError as exc:  # no microkernel runs here: auto uses the PyTorch paths for this dtype
            failed.append(f"{name}: {exc}")
            table.add_row(name, "-", "-", "-", str(exc), "-")
            continue
        label = microkernel_name(dtype, choice.microkernel) or choice.microkernel
        skipped = "; ".join(f"{m}: {why}" for m, why in choice.measured.get("skipped", {}).items()) or "-"
        table.add_row(name, label, crossovers(choice, False), crossovers(choice, True), skipped, str(tuning_path(dtype)))
    Console(width=200).print(table)
    if failed:
        typer.echo("aha calibrate failed for " + "; ".join(failed), err=True)
        raise typer.Exit(1)
