"""``aha bench``: run the benchmark suite, print tables and write JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from aha.cli import app


def _csv(value: Optional[str], cast: type) -> Optional[list]:
    return None if value is None else [cast(x) for x in value.split(",") if x.strip()]


@app.command()
def bench(
    groups: str = typer.Option("kernels", help="Comma-separated benchmark groups to run."),
    quick: bool = typer.Option(False, "--quick", help="CI smoke sweep: finishes in well under a minute."),
    out: Optional[Path] = typer.Option(None, help="Folder for the JSON report (bench-<timestamp>.json)."),
    threads: int = typer.Option(2, help="torch threads (the targets are stated for 2)."),
    parts: Optional[str] = typer.Option(None, help="Kernel sections: prefill,train,decode,memory."),
    n: Optional[str] = typer.Option(None, help="Prefill sequence lengths, e.g. 1024,4096,16384."),
    rho: Optional[str] = typer.Option(None, help="Global fractions, e.g. 0,0.07,1."),
    window: Optional[str] = typer.Option(None, help="Local windows, e.g. 256."),
    sink: Optional[int] = typer.Option(None, help="Attention-sink keys local queries also see (default 0)."),
    dtype: Optional[str] = typer.Option(None, help="float32,bfloat16,float16."),
    impl: Optional[str] = typer.Option(None, help="AHA implementations to time, e.g. auto,cpp,split."),
    train_n: Optional[str] = typer.Option(None, help="Sequence lengths of the forward+backward section."),
    decode_n: Optional[str] = typer.Option(None, help="Cache lengths of the decode section."),
    rounds: Optional[int] = typer.Option(None, help="Round-robin rounds per measurement."),
    batch: Optional[int] = typer.Option(None, help="Batch size of the kernel shapes (default 1)."),
    heads: Optional[int] = typer.Option(None, help="Query heads of the kernel shapes (default 8)."),
    kv_heads: Optional[int] = typer.Option(None, help="KV heads of the kernel shapes (default 8; fewer = GQA)."),
    memory_n: Optional[int] = typer.Option(None, help="Sequence length of the memory section (default 16384)."),
    model: Optional[str] = typer.Option(None, help="Model of the 'model' group: a name (smollm2-135m) or a folder."),
    model_n: Optional[str] = typer.Option(None, help="Prompt lengths of the 'model' group, e.g. 1024,4096."),
    model_global_heads: Optional[str] = typer.Option(
        None, help="'model' group routes: 'learned' (a trained AHA checkpoint) or N = the first N heads of every layer global."
    ),
    clock: str = typer.Option(
        "wall", help="wall, or cpu: single-thread CPU time, robust to other jobs on a busy machine (needs --threads 1)."
    ),
) -> None:
    """Benchmark AHA attention against SDPA causal (ratios measured in the same run, noise-robust)."""
    from aha.benchmarking import BenchConfig, print_report, run_benchmarks, write_report

    config = BenchConfig.quick_config() if quick else BenchConfig()
    config.threads = threads
    overrides = {
        "parts": _csv(parts, str),
        "seq_lens": _csv(n, int),
        "rhos": _csv(rho, float),
        "windows": _csv(window, int),
        "sink": sink,
        "dtypes": _csv(dtype, str),
        "impls": _csv(impl, str),
        "train_seq_lens": _csv(train_n, int),
        "decode_lens": _csv(decode_n, int),
        "model": model,
        "batch": batch,
        "heads": heads,
        "kv_heads": kv_heads,
        "memory_len": memory_n,
        "model_seq_lens": _csv(model_n, int),
    }
    for key, value in overrides.items():
        if value is not None:
            setattr(config, key, value)
    if rounds is not None:
        config.timing.rounds = rounds
    if model_global_heads is not None:
        config.model_global_heads = None if model_global_heads == "learned" else int(model_global_heads)
    config.timing.clock = clock
    try:
        report = run_benchmarks(config, _csv(groups, str) or [])
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    print_report(report)
    if out is not None:
        typer.echo(f"wrote {write_report(report, out)}")


@app.command()
def calibrate(
    dtype: str = typer.Option("float32,bfloat16", help="Comma-separated dtypes to measure (float32, bfloat16, float16)."),
    threads: int | None = typer.Option(
        None, help="torch threads (default: torch's default here; the choice is kept per thread count)."
    ),
) -> None:
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
    names = _csv(dtype, str) or []
    unknown = [name for name in names if name not in dtypes]
    if unknown:
        raise typer.BadParameter(f"unknown dtype(s) {unknown}; choose from {list(dtypes)}")
    if not cpp_available():
        raise typer.BadParameter("the C++ kernel is unavailable, so there is nothing to calibrate (see `aha bench`)")
    if threads is not None:
        torch.set_num_threads(threads)
    table = Table(title=f"{cpu_model()} ({cpu_isa()}), {torch.get_num_threads()} threads", title_justify="left")
    for column in ("dtype", "microkernel", "forward: split from fraction (4K / 16K / 64K)", "forward+backward", "cache"):
        table.add_column(column)
    def crossovers(choice: KernelChoice, training: bool) -> str:
        values = [choice.crossover(n, training) for n in (4096, 16384, 65536)]
        return " / ".join("never" if x > 1 else f"{x:.2f}" for x in values)

    for name, choice in recalibrate([dtypes[n] for n in names]).items():
        label = microkernel_name(name, choice.microkernel) or choice.microkernel
        row = [label, crossovers(choice, False), crossovers(choice, True), str(tuning_path(name))]
        table.add_row(str(name).removeprefix("torch."), *row)
    Console(width=200).print(table)
