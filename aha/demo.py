"""``aha demo``: one command from a pretrained LLM to a routed model, its evaluation and its report.

Stages (each one's result is cached in the output folder, so re-running resumes; Ctrl-C during
training stops after the current step with a checkpoint):

1. load the model (default: the offline SmolLM2-135M) and the built-in corpora;
2. score the original model on held-out text: full attention, and local attention only (the demo's
   sliding window plus its sink keys) (perplexity and passkey retrieval);
3. convert it to AHA and fine-tune with a global-fraction target (:func:`aha.train.train`);
4. evaluate the routed model (:func:`aha.evaluation.run_evaluation`: perplexity, routing
   statistics, passkey, plots, token view);
5. time attention inside the model at a long context, learned routes vs SDPA
   (:func:`aha.benchmarking.model.measure_model`);
6. write ``README.md`` (headline table and details), ``demo.json`` and the pictures.

Every number in the report is computed by the run that writes it.
"""

from __future__ import annotations

import copy
import json
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

import aha  # noqa: E402
from aha.benchmarking import BenchConfig  # noqa: E402
from aha.benchmarking.model import measure_model  # noqa: E402
from aha.benchmarking.timing import TimingPolicy  # noqa: E402
from aha.data import build_datasets  # noqa: E402
from aha.evaluation import EvalSettings, run_evaluation  # noqa: E402
from aha.evaluation.passkey import evaluate_passkey  # noqa: E402
from aha.evaluation.perplexity import compare_routing_modes, full_length_subset  # noqa: E402
from aha.train import TrainConfig, iter_metrics, train  # noqa: E402

REPORT_NAME = "README.md"
HEADLINE_MODES = {"original": "full", "sliding window": "local"}


@dataclass
class DemoSettings:
    """What the demo runs; the defaults fit about 20 minutes on 2 CPU cores (setup included).

    Attributes:
        model, data: any model name/folder for :func:`aha.load_model` and data specs for
            :func:`aha.data.build_datasets` (the demo is the template for real use).
        window: the local window of every routed head.
        sink: attention-sink keys local heads also see (0 = the paper's pure window). The demo
            keeps SmolLM2's first token in view of local heads: a short fine-tune then stays
            within about 1% of the un-routed fine-tune (``benchmarks/RESULTS.md``).
        seq_len, steps, target_global, distill, lr, router_lr, passkey_mix: the fine-tune (see
            :class:`aha.train.TrainConfig`).
        eval_sequences: held-out sequences scored per routing mode.
        passkey_lengths, passkey_depths: the passkey grid.
        speed_seq_len: context length of the attention timing.
        out: the report folder.
    """

    model: str = "smollm2-135m"
    data: Sequence[str] = ("default",)
    window: int = 128
    sink: int = 1
    seq_len: int = 512
    steps: int = 120
    target_global: float = 0.2
    distill: float = 1.0
    lr: float = 5e-5
    router_lr: float = 1e-2
    passkey_mix: float = 0.25
    eval_sequences: int = 16
    passkey_lengths: Sequence[int] = (512, 1024, 2048)
    passkey_depths: Sequence[float] = (0.1, 0.5, 1.0)
    speed_seq_len: int = 4096
    speed_rounds: int = 3
    out: str = "report"
    quick: bool = False

    @classmethod
    def quick_settings(cls, **overrides: Any) -> DemoSettings:
        """The CI smoke run (a few minutes at most): the same stages on a small budget."""
        small = dict(
            data=("shakespeare",),
            window=32,
            seq_len=192,  # room for a passkey training prompt (SmolLM2's chat template alone is 99 tokens)
            steps=3,
            eval_sequences=2,
            passkey_lengths=(256,),
            passkey_depths=(0.1, 1.0),
            speed_seq_len=512,
            speed_rounds=1,
            quick=True,
        )
        return cls(**{**small, **overrides})

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            model=self.model,
            data=list(self.data),
            window=self.window,
            sink=self.sink,
            seq_len=self.seq_len,
            steps=self.steps,
            target_global=self.target_global,
            lambda_init=0.1,  # lambda ends near 0.5-1 on SmolLM2: start close, adapt fast (a short run)
            lambda_lr=0.3,
            distill=self.distill,
            lr=self.lr,
            router_lr=self.router_lr,
            passkey_mix=self.passkey_mix,
            grad_accum=1,
            warmup_steps=min(10, self.steps),
            checkpoint_every=20,
            keep_checkpoints=1,
            eval_every=-1,
            out=str(Path(self.out) / "run"),
        )

    def eval_settings(self) -> EvalSettings:
        return EvalSettings(
            data=tuple(self.data),
            seq_len=self.seq_len,
            max_sequences=self.eval_sequences,
            passkey_lengths=tuple(self.passkey_lengths),
            passkey_depths=tuple(self.passkey_depths),
        )


def _cached_stage(path: Path, key: dict[str, Any], compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Return the stage result stored at ``path`` when it was computed with the same ``key``, else compute and store it atomically."""
    if path.exists():
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            return stored["result"]
    result = compute()
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"key": key, "result": result}, indent=2))
    tmp.replace(path)
    return result


def _baseline(model: torch.nn.Module, tokenizer: Any, settings: DemoSettings) -> dict[str, Any]:
    """The original model with full attention and with the sliding window of AHA's local heads: perplexity and passkey."""
    # open routers: equals the original
    original = aha.convert(copy.deepcopy(model), window=settings.window, sink=settings.sink)
    original.eval()
    heldout = build_datasets(list(settings.data), tokenizer, seq_len=settings.seq_len).heldout
    sequences = full_length_subset(heldout, settings.eval_sequences)
    modes = tuple(HEADLINE_MODES.values())
    perplexity = compare_routing_modes(original, sequences, modes=modes)
    passkey = evaluate_passkey(
        original,
        tokenizer,
        context_lengths=settings.passkey_lengths,
        depths=settings.passkey_depths,
        modes=modes,
    )
    return {"perplexity": perplexity.to_dict(), "passkey": passkey.to_dict()}


def _train(model: torch.nn.Module, tokenizer: Any, settings: DemoSettings) -> tuple[torch.nn.Module, dict[str, Any]]:
    config = settings.train_config()
    summary_path = Path(config.out) / "summary.json"
    if summary_path.exists() and json.loads(summary_path.read_text()).get("config") == config.to_dict():
        trained, _ = aha.load_model(Path(config.out) / "model")
        return trained, json.loads(summary_path.read_text())
    started = time.perf_counter()
    result = train(config, model=model, tokenizer=tokenizer)
    summary = json.loads(summary_path.read_text())
    summary["seconds_this_run"] = time.perf_counter() - started
    summary_path.write_text(json.dumps(summary, indent=2))
    return result.model, summary


def _speed(model: torch.nn.Module, tokenizer: Any, settings: DemoSettings) -> list[dict[str, Any]]:
    timing = TimingPolicy(rounds=settings.speed_rounds, min_sample_s=0.0, retries=1, max_wait_s=2.0)
    cfg = BenchConfig(model_global_heads=None, timing=timing)
    return measure_model(model, tokenizer, [settings.speed_seq_len], cfg)


def plot_training(run_dir: Path, path: Path, target: float) -> Path:
    """Global fraction and loss per training step (from ``metrics.jsonl``)."""
    rows = list(iter_metrics(run_dir))
    steps = [r["step"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    top.plot(steps, [r["global_fraction"] for r in rows], label="global fraction (train batch)")
    top.axhline(target, color="grey", linestyle="--", label=f"target {target:g}")
    top.set_ylim(0, 1.02)
    top.set_ylabel("global fraction")
    top.legend(loc="upper right")
    bottom.plot(steps, [r["ce"] for r in rows], label="cross-entropy")
    if any(r.get("kd") for r in rows):
        bottom.plot(steps, [r["kd"] for r in rows], label="distillation KL")
    bottom.set_xlabel("step")
    bottom.set_ylabel("loss")
    bottom.legend(loc="upper right")
    fig.suptitle("AHA fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def sliding_window_name(window: int, sink: int) -> str:
    """Headline name of the original model run with local attention only."""
    if not sink:
        return f"pure sliding window (w={window}), no training"
    return f"sliding window (w={window}) + {sink} sink key{'s' if sink > 1 else ''}, no training"


def headline_rows(baseline: dict[str, Any], evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model variant: perplexity, change vs the original, routing and passkey accuracy."""
    original_ppl = baseline["perplexity"]["modes"]["full"]["perplexity"]
    local_routing = baseline["perplexity"]["modes"]["local"]["routing"]
    variants = [
        ("original model (full attention)", baseline, "full"),
        (sliding_window_name(local_routing["window"], local_routing["sink"]), baseline, "local"),
        ("AHA: fine-tuned, learned routes", evaluation, "aha"),
        ("AHA model forced to full attention", evaluation, "full"),
    ]
    rows = []
    for name, source, mode in variants:
        result = source["perplexity"]["modes"][mode]
        accuracy = source["passkey"]["accuracy"][mode] if source.get("passkey") else {}
        rows.append(
            {
                "variant": name,
                "perplexity": result["perplexity"],
                "vs_original": result["perplexity"] / original_ppl - 1.0,
                "global_fraction": result["routing"]["global_fraction"],
                "operations_replaced": result["routing"]["operations_replaced"],
                "compute_ratio": result["routing"]["compute_ratio"],
                "passkey": accuracy.get("all"),
                "passkey_beyond_window": accuracy.get("needle_beyond_window"),
            }
        )
    return rows


HEADLINE_COLUMNS = [
    ("variant", "model", str),
    ("perplexity", "held-out ppl", lambda x: f"{x:.2f}"),
    ("vs_original", "vs original", lambda x: f"{100 * x:+.1f}%"),
    ("global_fraction", "global pairs", _pct),
    ("operations_replaced", "full-attn ops replaced", _pct),
    ("compute_ratio", "attn compute vs full", _pct),
    ("passkey", "passkey", _pct),
    ("passkey_beyond_window", "passkey, needle beyond window", _pct),
]


def headline_table(rows: list[dict[str, Any]], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for _, header, _ in HEADLINE_COLUMNS:
        table.add_column(header, justify="left" if header == "model" else "right")
    for row in rows:
        table.add_row(*(fmt(row[key]) if row[key] is not None else "-" for key, _, fmt in HEADLINE_COLUMNS))
    return table


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def speed_sentence(speed: list[dict[str, Any]]) -> str:
    prefill = next(r for r in speed if r["phase"] == "prefill")
    return (
        f"At {prefill['n']} tokens the learned routes send {_pct(prefill['global_fraction'])} of (token, head) pairs to full "
        f"attention; attention inside the model takes {prefill['attention_ms']:.0f} ms with AHA vs "
        f"{prefill['sdpa_attention_ms']:.0f} ms with SDPA causal ({prefill['attention_speedup']:.2f}x faster, ideal "
        f"{prefill['ideal_attention_speedup']:.2f}x); the whole forward pass is {prefill['speedup']:.2f}x faster."
    )


def write_report(report: dict[str, Any], out: Path) -> Path:
    """Write ``README.md`` (the human-readable report) from the demo's JSON."""
    s = report["settings"]
    rows = report["headline"]
    training = report["training"]
    lines = [
        f"# AHA demo report: {s['model']}, window {s['window']}",
        "",
        f"Run {report['created']} on {report['machine']['cpu']} ({report['machine']['threads']} threads), "
        f"torch {report['machine']['torch']}, aha {report['machine']['aha']}; total {report['seconds'] / 60:.1f} min."
        + (" **Quick smoke run: numbers are not meaningful.**" if s["quick"] else ""),
        "",
        "## Headline",
        "",
        _markdown_table(
            [header for _, header, _ in HEADLINE_COLUMNS],
            [[fmt(r[key]) if r[key] is not None else "-" for key, _, fmt in HEADLINE_COLUMNS] for r in rows],
        ),
        "",
        f"Held-out perplexity on {report['evaluation']['perplexity']['sequences']} held-out sequences of "
        f"{s['seq_len']} tokens (documents never seen in training). *Global pairs*: share of (token, head) decisions "
        "routed to full attention; *full-attention ops replaced* is the paper's figure (1 - global); *attn compute* counts "
        "attention score entries computed relative to full causal attention. Passkey: exact-match retrieval of a 5-digit "
        f"key hidden in Paul Graham essays at {', '.join(map(str, s['passkey_lengths']))} tokens, depths "
        f"{', '.join(map(str, s['passkey_depths']))}.",
        "",
        "## Speed",
        "",
        speed_sentence(report["speed"]),
        "",
        _markdown_table(
            ["phase", "n", "global", "attn ms", "SDPA attn ms", "attn speedup", "ideal", "model ms", "SDPA model ms", "e2e speedup"],
            [
                [
                    r["phase"], str(r["n"]), _pct(r["global_fraction"]), f"{r['attention_ms']:.1f}", f"{r['sdpa_attention_ms']:.1f}",
                    f"{r['attention_speedup']:.2f}x", f"{r['ideal_attention_speedup']:.2f}x", f"{r['ms']:.1f}", f"{r['sdpa_ms']:.1f}",
                    f"{r['speedup']:.2f}x",
                ]
                for r in report["speed"]
            ],
        ),
        "",
        "Decode: one token on a cache of n tokens. Kernel-level numbers: `aha bench` (see benchmarks/RESULTS.md).",
        "",
        "## Training",
        "",
        f"{training['steps']} steps of {s['seq_len']} tokens (window {s['window']}, sink keys {s['sink']}, target global fraction "
        f"{s['target_global']}, distillation weight {s['distill']}, {_pct(s['passkey_mix'])} of the sequences passkey "
        "prompts with a haystack from the training corpora, never the essays); achieved global fraction on the last training batches: "
        f"{_pct(training['achieved_global_fraction_train'])}, final lambda {training['final_lambda']:.3g}.",
        "",
        "![training](training.png)",
        "",
        "This is a short CPU fine-tune sized to fit the demo's time budget. Longer training (`aha demo --steps 1000`, or "
        "`aha train` with a longer sequence) or a GPU gives better routing: a lower global fraction at the same perplexity.",
        "",
        "## Where the model attends globally",
        "",
        "![layer x head](eval/routing_layer_head.png)",
        "",
        "![position](eval/routing_position.png)",
        "",
    ]
    if "passkey_answer_layer_head" in report["evaluation"]["files"]:
        lines += ["At the passkey answer steps (the retrieval point):", "", "![answer steps](eval/passkey_answer_layer_head.png)", ""]
    lines += [
        "Token view (open in a browser): [eval/token_view.html](eval/token_view.html), each token shaded by how many heads "
        "routed it to full attention, per layer.",
        "",
        "Everything above is computed by this run; the raw numbers are in `demo.json` and `eval/eval.json`.",
        "",
    ]
    path = out / REPORT_NAME
    path.write_text("\n".join(lines))
    return path


def run_demo(settings: DemoSettings, console: Console | None = None) -> dict[str, Any]:
    """Run every stage (see the module docstring) and return the report dict (also written to ``demo.json``)."""
    console = console or Console(width=None if sys.stdout.isatty() else 160)
    out = Path(settings.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    key = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items() if k not in ("out",)}

    console.rule(f"[bold]aha demo[/bold]: {settings.model}, window {settings.window}")
    console.print("[1/5] loading the model and the corpora")
    model, tokenizer = aha.load_model(settings.model)
    build_datasets(list(settings.data), tokenizer, seq_len=settings.seq_len)  # tokenizes once, cached

    console.print(f"[2/5] scoring the original model: full attention vs {sliding_window_name(settings.window, settings.sink)}")
    baseline = _cached_stage(out / "baseline.json", key, lambda: _baseline(model, tokenizer, settings))

    console.print(f"[3/5] fine-tuning with AHA routing ({settings.steps} steps, target global fraction {settings.target_global})")
    trained, training = _train(model, tokenizer, settings)
    plot_training(Path(settings.train_config().out), out / "training.png", settings.target_global)

    console.print("[4/5] evaluating the routed model")
    evaluation = _cached_stage(
        out / "evaluation.json",
        key,
        lambda: run_evaluation(trained, tokenizer, out / "eval", settings.eval_settings(), model_name=settings.model).to_dict(),
    )

    console.print(f"[5/5] timing attention at {settings.speed_seq_len} tokens: learned routes vs SDPA")
    speed = _speed(trained, tokenizer, settings)

    from aha.benchmarking import machine_info

    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": key,
        "machine": {k: machine_info(torch.get_num_threads(), "wall")[k] for k in ("cpu", "threads", "torch", "aha")} | {"python": platform.python_version()},
        "headline": headline_rows(baseline, evaluation),
        "baseline": baseline,
        "training": {k: v for k, v in training.items() if k not in ("config", "data")},
        "evaluation": evaluation,
        "speed": speed,
        "seconds": time.perf_counter() - started,
    }
    (out / "demo.json").write_text(json.dumps(report, indent=2))
    path = write_report(report, out)
    console.print(headline_table(report["headline"], f"AHA on {settings.model}, window {settings.window}"))
    console.print(speed_sentence(speed))
    console.print(f"report: [bold]{path}[/bold] (plots and the token view next to it)")
    return report


__all__ = ["DemoSettings", "headline_rows", "plot_training", "run_demo", "write_report"]
