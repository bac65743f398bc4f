"""The ``aha bench`` suite: benchmark groups that each return tables of JSON-ready rows.

A group is a function ``(BenchConfig) -> list[Section]`` registered with :func:`register_group`;
``kernels`` (attention prefill, forward+backward, decode, peak memory; in
:mod:`aha.benchmarking.kernels`) is built in, and further groups (``model``, ``serve``,
``train-step``) register themselves the same way in their own module, imported at the bottom
of this file. :func:`run_benchmarks` runs the selected groups into one report that
:func:`print_report` renders as tables and :func:`write_report` saves as JSON.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from aha._fields import option
from aha.benchmarking.timing import TimingPolicy

SCHEMA = "aha-bench/1"


@dataclass
class Column:
    """How a table shows one row key: ``fmt`` is a format spec (``".1f"``) or empty for str()."""

    key: str
    header: str
    fmt: str = ""


@dataclass
class Section:
    """One result table: ``rows`` are flat JSON-ready dicts, ``columns`` choose what is printed."""

    name: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass
class BenchConfig:
    """What to run. :meth:`quick` is the CI smoke configuration; the defaults are the full sweep.

    Kernel sweep shapes follow issues 2 and 6: ``batch`` x ``heads`` x seq x ``head_dim`` with
    i.i.d. Bernoulli(rho) routes per (batch, head, query).
    """

    quick: bool = False
    threads: int = option("torch threads (the targets are stated for 2).", default=2)
    timing: TimingPolicy = field(default_factory=TimingPolicy)
    batch: int = option("Batch size of the kernel shapes.", default=1)
    heads: int = option("Query heads of the kernel shapes.", default=8)
    kv_heads: int = option("KV heads of the kernel shapes (fewer = GQA).", default=8)
    head_dim: int = 64
    seq_lens: list[int] = option("Prefill sequence lengths, e.g. 1024,4096,16384.", "--n", default_factory=lambda: [1024, 4096, 16384])
    rhos: list[float] = option("Global fractions, e.g. 0,0.07,1.", "--rho", default_factory=lambda: [0.0, 0.05, 0.07, 0.1, 0.3, 0.5, 1.0])
    windows: list[int] = option("Local windows, e.g. 256.", "--window", default_factory=lambda: [256])
    sink: int = option("Attention-sink keys local queries also see.", default=0)
    dtypes: list[str] = option("float32,bfloat16,float16.", "--dtype", default_factory=lambda: ["float32", "bfloat16"])
    impls: list[str] = option("AHA implementations to time, e.g. auto,cpp,split.", "--impl", default_factory=lambda: ["auto"])
    train_seq_lens: list[int] = option("Sequence lengths of the forward+backward section.", "--train-n", default_factory=lambda: [1024, 4096])
    train_rhos: list[float] = field(default_factory=lambda: [0.0, 0.07, 0.3, 1.0])
    decode_lens: list[int] = option("Cache lengths of the decode section.", "--decode-n", default_factory=lambda: [16384, 65536])
    decode_rhos: list[float] = option("Global fractions of the decode section's rows.", "--decode-rho", default_factory=lambda: [0.07, 1.0])
    decode_batch: int = option("Sequences per decode step.", default=4)
    decode_head_shapes: list[str] = option(
        "Query/KV heads of the decode section, e.g. 8/8,9/3 (9/3: SmolLM2's GQA).", "--decode-heads",
        default_factory=lambda: ["8/8", "9/3"],
    )
    memory_len: int = option("Sequence length of the memory section.", "--memory-n", default=16384)
    parts: list[str] = option("Kernel sections: prefill,train,decode,memory.", default_factory=lambda: ["prefill", "train", "decode", "memory"])
    seed: int = 0
    model: str = option("Model of the 'model' and 'train-step' groups: a name (smollm2-135m) or a folder.", default="smollm2-135m")
    model_seq_lens: list[int] = option("Prompt lengths of the 'model' group, e.g. 1024,4096.", "--model-n", default_factory=lambda: [1024, 4096])
    model_global_heads: int | None = option(
        "'model' and 'train-step' group routes: 'learned' (a trained AHA checkpoint's; open routers for train-step) or N = the first N heads of every layer global.",
        default=1,
        parse=lambda text: None if text == "learned" else int(text),
    )
    train_step_seq_lens: list[int] = option("Sequence lengths of the 'train-step' group, e.g. 1024,4096.", "--train-step-n", default_factory=lambda: [1024, 4096])
    train_step_distill: float | None = option(
        "'train-step' group: distillation weight of the aha steps (0: the paper's objective, CE + lambda * mean(g_soft), no "
        "teacher); default: the demo recipe's.", "--train-step-distill", default=None,
    )  # fmt: skip
    gate_gradients: list[str] = option(
        "'train-step' group: aha train steps timed, by gate gradient: ste,sampled,compressed (aha train --gate-gradient) "
        "frozen (routes frozen, --freeze-routes-at) and E+frozen (E for the first half of the steps, then frozen: --freeze-routes-at 0.5; "
        "the mean of one step of each).", "--gate-gradients", default_factory=lambda: ["ste", "sampled", "compressed", "frozen", "sampled+frozen"],
    )
    serve_clients: list[int] = option("Concurrent clients of the 'serve' group, e.g. 1,4,16.", "--serve-clients", default_factory=lambda: [1, 4, 16])
    serve_prompt_lens: list[int] = option("Prompt lengths of the 'serve' group, e.g. 1024,4096,8192.", "--serve-n", default_factory=lambda: [1024, 4096, 8192])
    serve_max_tokens: int = option("Tokens each 'serve' request generates.", default=64)
    serve_continuous_batching: bool = option("'serve' group: both servers batch concurrent requests.", default=False)
    serve_rounds: int = option(
        "Times each 'serve' load point runs on each server, alternating which goes first; the speedup is the median "
        "of the rounds' speedups, with their min and max.", default=1,
    )  # fmt: skip

    @classmethod
    def quick_config(cls) -> BenchConfig:
        """A sweep that finishes in well under a minute on 2 cores (CI smoke test)."""
        return cls(
            quick=True,
            timing=TimingPolicy(rounds=2, min_sample_s=0.03, retries=1, max_wait_s=1.0),
            seq_lens=[1024],
            rhos=[0.07, 1.0],
            dtypes=["float32"],
            train_seq_lens=[512],
            train_rhos=[0.07],
            decode_lens=[4096],
            decode_batch=2,
            decode_head_shapes=["4/2"],
            memory_len=2048,
            model_seq_lens=[256],
            train_step_seq_lens=[256],
            serve_clients=[1, 2],
            serve_prompt_lens=[128],
            serve_max_tokens=8,
        )


BenchGroup = Callable[[BenchConfig], list[Section]]
GROUPS: dict[str, BenchGroup] = {}


def register_group(name: str) -> Callable[[BenchGroup], BenchGroup]:
    """Decorator adding a benchmark group to :data:`GROUPS` under ``name``."""

    def add(group: BenchGroup) -> BenchGroup:
        GROUPS[name] = group
        return group

    return add


def machine_info(threads: int, clock: str, seed: int | None = None) -> dict[str, Any]:
    """Where, when and with what code the numbers were measured: :func:`aha.report.provenance.run_meta`
    plus the timing clock and whether the C++ kernel loaded."""
    from aha.kernels._cpp_build import cpp_kernel_error, load_cpp_kernel
    from aha.report.provenance import run_meta

    return run_meta(seed=seed, threads=threads) | {
        "clock": clock,
        "cpp_kernel": load_cpp_kernel(),
        "cpp_kernel_error": cpp_kernel_error(),
    }


def run_benchmarks(config: BenchConfig, groups: list[str]) -> dict[str, Any]:
    """Run ``groups`` (names in :data:`GROUPS`) and return the JSON-ready report."""
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"unknown benchmark group(s) {unknown}; choose from {sorted(GROUPS)}")
    if config.timing.clock == "cpu" and config.threads != 1:
        raise ValueError("clock='cpu' measures single-threaded runs only (it would count spin-waiting); use --threads 1")
    if torch.cuda.is_available():  # other processes' CPU load does not slow a GPU kernel: no waiting, no retries
        config.timing = replace(config.timing, max_wait_s=0.0, retries=0)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        results = {name: [asdict(section) for section in GROUPS[name](config)] for name in groups}
    finally:
        torch.set_num_threads(previous_threads)
    meta = machine_info(config.threads, config.timing.clock, config.seed)
    return {"schema": SCHEMA, "meta": meta, "config": asdict(config), "groups": results}


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if fmt and isinstance(value, (int, float)):
        return format(value, fmt)
    return str(value)


def print_report(report: dict[str, Any]) -> None:
    """Render every section of a report as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 200)
    meta = report["meta"]
    commit = meta.get("git_commit")
    console.print(
        f"[bold]aha bench[/bold]  {meta['date']}  {meta['cpu']} ({meta.get('isa', '?')})  threads={meta['threads']}  "
        f"clock={meta['clock']}  torch {meta['torch']}  C++ kernel: {'yes' if meta['cpp_kernel'] else 'no'}  "
        f"GPU: {meta.get('gpu') or meta.get('cuda') or 'none'}  "
        f"commit {commit[:12] + ('+dirty' if meta.get('git_dirty') else '') if commit else 'unknown'}"
    )
    for group, sections in report["groups"].items():
        for section in sections:
            table = Table(title=f"{group}: {section['title']}", title_justify="left")
            for column in section["columns"]:
                table.add_column(column["header"], justify="right")
            for row in section["rows"]:
                table.add_row(*(_cell(row.get(c["key"]), c["fmt"]) for c in section["columns"]))
            console.print(table)
            for note in section["notes"]:
                console.print(f"  {note}", style="dim")


def write_report(report: dict[str, Any], out_dir: Path) -> Path:
    """Save the report as strict JSON (a NaN becomes null), ``out_dir/bench-<UTC timestamp>.json``, and return the path."""
    from aha.report.provenance import write_json_report

    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    return write_json_report(out_dir / f"bench-{stamp}.json", report)


from aha.benchmarking import kernels as _kernels  # registers the "kernels" group
from aha.benchmarking import model as _model  # registers the "model" group
from aha.benchmarking import serve as _serve  # registers the "serve" group
from aha.benchmarking import train_step as _train_step  # registers the "train-step" group

__all__ = [
    "GROUPS",
    "SCHEMA",
    "BenchConfig",
    "Column",
    "Section",
    "TimingPolicy",
    "print_report",
    "register_group",
    "run_benchmarks",
    "write_report",
]
