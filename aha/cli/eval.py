"""``aha eval``, ``aha sweep`` and ``aha lm-eval``: measure a routed model and make it visible."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from aha._fields import option
from aha.cli import app
from aha.cli.options import config_file, flags, with_flags
from aha.evaluation.run import EvalSettings, run_evaluation
from aha.train.config import TrainConfig, load_config

_DTYPES = ("float32", "bfloat16", "float16")


def load_routed_model(model_name: str, window: int | None, dtype: str, sink: int | None = None):
    """Load ``model_name`` with :func:`aha.load_model`; convert a plain model with open routers at
    ``window`` (and ``sink``, default 0).

    An AHA model keeps its own window and sink (``--window`` / ``--sink`` must then be omitted or equal).
    """
    import torch

    import aha

    if dtype not in _DTYPES:
        raise typer.BadParameter(f"--dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    model, tokenizer = aha.load_model(model_name, dtype=getattr(torch, dtype))
    if aha.is_aha_model(model):
        try:
            aha.AhaSettings.of(model.config).check_matches(model_name, window=window, sink=sink)
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
    elif window is None:
        raise typer.BadParameter(
            f"{model_name} is not an AHA model: pass --window to convert it with open routers "
            "(then 'aha' equals 'full'; train it with `aha train` to learn routes)"
        )
    else:
        try:
            model = aha.convert(model, window=window, sink=sink or 0).eval()
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
    return model, tokenizer


@app.command("eval")
@with_flags(flags(EvalSettings))
def eval_command(
    model: Annotated[str, typer.Option(help="AHA model folder (e.g. a training run's final model), or a plain model with --window")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="report folder: eval.json, PNG plots, token_view.html")] = Path("report/eval"),
    window: Annotated[int | None, typer.Option(help="convert a plain model at this window (open routers)")] = None,
    sink: Annotated[int | None, typer.Option(help="with --window: local heads also see the first N keys (attention sink)")] = None,
    dtype: Annotated[str, typer.Option(help="weight dtype: float32, bfloat16 or float16")] = "float32",
    **given: Any,
) -> None:
    """Perplexity, passkey retrieval and routing of an AHA model vs full attention vs sliding window.

    Held-out perplexity (overall and by token position) and passkey retrieval, each for the routed model,
    the same model forced to full attention and forced to pure sliding window at its window, with the
    routing statistics. Prints the tables and writes the report folder (eval.json, PNG plots,
    token_view.html). See docs/evaluation.md.
    """
    from rich.console import Console

    from aha.report.tables import passkey_table, perplexity_table, position_table

    try:
        settings = EvalSettings(**given)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    routed, tokenizer = load_routed_model(model, window, dtype, sink)
    try:
        run = run_evaluation(routed, tokenizer, out, settings, model_name=model)
    except ValueError as error:  # no usable held-out text: the message names the fix
        raise typer.BadParameter(str(error), param_hint="--data / --heldout-fraction") from None
    console = Console()
    if run.perplexity is not None:
        console.print(perplexity_table(run.perplexity))
        console.print(position_table(run.perplexity))
    if run.passkey is not None:
        console.print(passkey_table(run.passkey))
    console.print(f"report: {out}/ ({', '.join(Path(p).name for p in run.files.values())})")


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
def lm_eval_command(ctx: typer.Context) -> None:
    """lm-evaluation-harness on AHA models: the `lm_eval` command line, routing active.

    Every flag passes through to `lm_eval` (so `aha lm-eval --help` is its help), run after `import aha` so
    saved AHA models load with routing active. `--model aha` (same --model_args as `hf`) also reports the
    global fraction of the run and writes aha_routing.json under --output_path.

    Example: aha lm-eval --model aha --model_args pretrained=runs/smol/model --tasks hellaswag --device cpu
    """
    from rich.console import Console

    from aha.evaluation.harness import run_lm_eval_cli

    try:
        summaries = run_lm_eval_cli(ctx.args)
    except ImportError as error:
        raise typer.BadParameter(str(error)) from None
    for summary in summaries:
        Console().print(
            f"AHA routing over the run: global fraction {summary['global_fraction']:.1%}, "
            f"full-attention operations replaced {summary['operations_replaced']:.1%}, "
            f"attention compute ratio {summary['compute_ratio']:.1%} (window {summary['window']})"
        )


@dataclass
class SweepSettings:
    """The sweep's own options (:func:`aha.recipes.sweep.run_sweep`); the recipe is a :class:`TrainConfig`."""

    windows: Sequence[int] = option("comma-separated local windows", default=(16, 32, 64, 128, 256, 512, 1024))
    out: str = option("sweep folder: one training run per window, sweep.json, long_tail.png", default="runs/sweep")
    eval_sequences: int = option("held-out sequences scored per window (the same for every window)", default=16)
    eval_seq_len: int | None = option("their length (default: the training seq-len)", default=None)
    compare: Sequence[str] = option(
        "instead of training: draw these finished sweep folders (comma-separated, e.g. one per --sink) in one "
        "long-tail plot, --out/long_tail.png", default=(),
    )  # fmt: skip


#: The training options ``aha sweep`` takes as flags, with what each means in a sweep.
SWEEP_RECIPE_HELP = {
    "model": "base model (the --config recipe's, if it names one)",
    "data": "training data spec(s), as for `aha train --data` (repeatable or comma-separated)",
    "steps": "optimizer steps per window",
    "seq_len": "tokens per training sequence",
    "lambda_init": "fixed sparsity weight lambda, the same for every window",
    "router_lr": "router learning rate (short runs need a high one to move open routers)",
    "grad_accum": "micro-batches per optimizer step",
    "checkpoint_every": "checkpoint every N steps (interrupted windows resume from the last one)",
}


@app.command("sweep")
@with_flags(flags(SweepSettings), flags(TrainConfig, only=SWEEP_RECIPE_HELP, help=SWEEP_RECIPE_HELP))
def sweep_command(
    config: Annotated[Path | None, config_file("training recipe: a YAML/TOML file of `aha train` options")] = None,
    **given: Any,
) -> None:
    """Window sweep: train and evaluate one routed model per window, plot the long-tail curve.

    Every window gets the same short training recipe (a fixed --lambda-init) and the same held-out
    sequences; the plot shows the global fraction needed and the perplexity vs window. Re-running skips
    finished windows and resumes an interrupted one from its last checkpoint. Other training options
    come from --config (the `aha train --config` format).
    """
    from rich.console import Console
    from rich.table import Table

    from aha.recipes.sweep import run_sweep

    sweep = SweepSettings(**{k: v for k, v in given.items() if k not in SWEEP_RECIPE_HELP})
    if sweep.compare:
        from aha.evaluation.sweep import compare_sweeps

        try:
            Console().print(f"plot: {compare_sweeps([Path(f) for f in sweep.compare], Path(sweep.out))}")
        except ValueError as error:
            raise typer.BadParameter(str(error)) from None
        return
    try:
        recipe = load_config(config, {k: v for k, v in given.items() if k in SWEEP_RECIPE_HELP})
        result = run_sweep(recipe, sweep.windows, sweep.out, eval_sequences=sweep.eval_sequences,
                           eval_seq_len=sweep.eval_seq_len, log=Console(stderr=True).print)
    except ValueError as error:
        raise typer.BadParameter(str(error)) from None
    table = Table(title=f"Window sweep: {recipe.model}, {recipe.steps} steps per window, lambda {recipe.lambda_init:g}")
    for name in ("window", "global", "ops replaced", "compute", "perplexity", "same weights, full"):
        table.add_column(name, justify="right")
    for p in result.points:
        table.add_row(str(p.window), f"{p.global_fraction:.1%}", f"{p.operations_replaced:.1%}", f"{p.compute_ratio:.1%}",
                      f"{p.perplexity:.3f}", f"{p.full_attention_perplexity:.3f}")
    table.caption = f"original model, full attention: perplexity {result.reference_perplexity:.3f}"
    console = Console()
    console.print(table)
    console.print(f"plot: {result.files['plot']}  data: {result.files['json']}")
