"""``aha eval``, ``aha sweep`` and ``aha lm-eval``: measure a routed model and make it visible."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from aha.cli import app

_DTYPES = ("float32", "bfloat16", "float16")


def _ints(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{flag} takes comma-separated integers, e.g. 512,1024, got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{flag} needs at least one value")
    return values


def _floats(text: str, flag: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter(f"{flag} takes comma-separated numbers, e.g. 0.1,0.5,0.9, got {text!r}") from None
    if not values:
        raise typer.BadParameter(f"{flag} needs at least one value")
    return values


def _words(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


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
def eval_command(
    model: Annotated[str, typer.Option(help="AHA model folder (e.g. a training run's final model), or a plain model with --window")] = "smollm2-135m",
    out: Annotated[Path, typer.Option(help="report folder: eval.json, PNG plots, token_view.html")] = Path("report/eval"),
    window: Annotated[int | None, typer.Option(help="convert a plain model at this window (open routers)")] = None,
    sink: Annotated[int | None, typer.Option(help="with --window: local heads also see the first N keys (attention sink)")] = None,
    tasks: Annotated[str, typer.Option(help="comma-separated: perplexity, passkey")] = "perplexity,passkey",
    modes: Annotated[str, typer.Option(help="comma-separated routing modes: full, local, aha")] = "full,local,aha",
    data: Annotated[list[str], typer.Option(help="held-out data spec(s), as for `aha train --data` (repeatable)")] = ["default"],  # noqa: B006
    heldout_fraction: Annotated[float, typer.Option(help="held-out share of documents; use the training run's value")] = 0.1,
    seq_len: Annotated[int, typer.Option(help="tokens per held-out sequence")] = 1024,
    max_sequences: Annotated[int, typer.Option(help="held-out sequences scored (evenly spaced over the corpora)")] = 16,
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 1,
    passkey_lengths: Annotated[str, typer.Option(help="passkey prompt lengths in tokens")] = "512,1024,2048,4096",
    passkey_depths: Annotated[str, typer.Option(help="needle depths in [0, 1] (0 = start of the haystack, 1 = right before the question)")] = "0.1,0.5,1.0",
    passkey_trials: Annotated[int, typer.Option(help="prompts per (length, depth)")] = 1,
    seed: Annotated[int, typer.Option(help="seed of passkeys and haystack starts")] = 0,
    dtype: Annotated[str, typer.Option(help="weight dtype: float32, bfloat16 or float16")] = "float32",
) -> None:
    """Perplexity, passkey retrieval and routing of an AHA model vs full attention vs sliding window.

    Held-out perplexity (overall and by token position) and passkey retrieval, each for the routed model,
    the same model forced to full attention and forced to pure sliding window at its window, with the
    routing statistics. Prints the tables and writes the report folder (eval.json, PNG plots,
    token_view.html). See docs/evaluation.md.
    """
    from rich.console import Console

    from aha.evaluation.run import EvalSettings, run_evaluation
    from aha.report.tables import passkey_table, perplexity_table, position_table

    try:
        settings = EvalSettings(
            tasks=_words(tasks),
            modes=_words(modes),
            data=data,
            heldout_fraction=heldout_fraction,
            seq_len=seq_len,
            max_sequences=max_sequences,
            batch_size=batch_size,
            passkey_lengths=_ints(passkey_lengths, "--passkey-lengths"),
            passkey_depths=_floats(passkey_depths, "--passkey-depths"),
            passkey_trials=passkey_trials,
            seed=seed,
        )
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


@app.command("sweep")
def sweep_command(
    windows: Annotated[str, typer.Option(help="comma-separated local windows")] = "16,32,64,128,256,512,1024",
    out: Annotated[Path, typer.Option(help="sweep folder: one training run per window, sweep.json, long_tail.png")] = Path("runs/sweep"),
    config: Annotated[Path | None, typer.Option("--config", "-c", help="training recipe: a YAML/TOML file of `aha train` options", exists=True, dir_okay=False)] = None,
    model: Annotated[str | None, typer.Option(help="base model (default: the recipe's, else smollm2-135m)")] = None,
    data: Annotated[list[str] | None, typer.Option(help="training data spec(s), as for `aha train --data` (repeatable)")] = None,
    steps: Annotated[int | None, typer.Option(help="optimizer steps per window")] = None,
    seq_len: Annotated[int | None, typer.Option(help="tokens per training sequence")] = None,
    lambda_init: Annotated[float | None, typer.Option(help="fixed sparsity weight lambda, the same for every window")] = None,
    router_lr: Annotated[float | None, typer.Option(help="router learning rate (short runs need a high one to move open routers)")] = None,
    grad_accum: Annotated[int | None, typer.Option(help="micro-batches per optimizer step")] = None,
    checkpoint_every: Annotated[int | None, typer.Option(help="checkpoint every N steps (interrupted windows resume from the last one)")] = None,
    eval_sequences: Annotated[int, typer.Option(help="held-out sequences scored per window (the same for every window)")] = 16,
    eval_seq_len: Annotated[int | None, typer.Option(help="their length (default: the training seq-len)")] = None,
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
    from aha.train import load_config

    overrides = {
        "model": model, "data": data or None, "steps": steps, "seq_len": seq_len,
        "lambda_init": lambda_init, "router_lr": router_lr, "grad_accum": grad_accum, "checkpoint_every": checkpoint_every,
    }
    try:
        recipe = load_config(config, overrides)
        result = run_sweep(recipe, _ints(windows, "--windows"), out, eval_sequences=eval_sequences,
                           eval_seq_len=eval_seq_len, log=Console(stderr=True).print)
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
