"""The window-sweep recipe (``aha sweep``): train one routed model per window, evaluate each, plot the long-tail curve.

Every window gets the same training recipe (a fixed sparsity weight lambda, not a target global
fraction -- a target would pin every window to the same fraction and hide the curve) and the
same held-out sequences. The question answered is the paper's: how much global attention does
the model still choose as the window grows?

Layout of the sweep folder (every step resumable: a finished window is skipped, an interrupted
training resumes from its last checkpoint, an evaluated window is not evaluated again)::

    reference.json   the original model's full-attention perplexity on the held-out sequences
    w<window>/       the training run (config.yaml, metrics.jsonl, model/, summary.json; its
                     checkpoints/ exist while it trains and are deleted once its model is saved)
    w<window>/sweep_eval.json   held-out perplexity and routing of that window's model
    sweep.json       every window's point (schema: :meth:`SweepResult.to_dict`)
    long_tail.png    global fraction and perplexity vs window
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import aha
from aha.data import build_datasets
from aha.evaluation.perplexity import full_length_subset
from aha.evaluation.sweep import (
    SweepPoint,
    SweepResult,
    evaluate_window,
    reference_perplexity,
    write_sweep,
)
from aha.recipes.finetune import train
from aha.report.provenance import write_json_report
from aha.train.config import TrainConfig


def window_run_config(base: TrainConfig, window: int, out_dir: Path) -> TrainConfig:
    """The training config of one window: ``base`` with its window and run folder set (no in-training eval)."""
    return dataclasses.replace(base, window=window, out=str(out_dir / f"w{window}"), eval_every=-1)


def _is_trained(run: Path) -> bool:
    return (run / "summary.json").exists() and (run / "model").is_dir()


def run_sweep(
    base: TrainConfig,
    windows: Sequence[int],
    out_dir: str | Path,
    *,
    eval_sequences: int = 16,
    eval_seq_len: int | None = None,
    eval_batch_size: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> SweepResult:
    """Train and evaluate one routed model per window (resumable), then plot the long-tail curve.

    Args:
        base: the training recipe shared by every window (its ``window``, ``out`` and ``eval_every``
            are replaced per window). It must use a fixed ``lambda_init``, not ``target_global``.
        windows: local windows to sweep (distinct, >= 1).
        out_dir: the sweep folder (layout in the module docstring).
        eval_sequences: held-out sequences scored per window (the same ones for every window).
        eval_seq_len: their length (default: the training ``seq_len``).
        log: receives one status line per step.
    """
    if base.target_global is not None:
        raise ValueError(
            "a window sweep needs a fixed sparsity weight (--lambda-init), not --target-global: a target would "
            "pin every window to the same global fraction"
        )
    if base.force_routing is not None:
        raise ValueError("a window sweep trains routed models; drop force_routing")
    windows = sorted(set(windows))
    if not windows or windows[0] < 1:
        raise ValueError(f"windows must be integers >= 1, got {windows}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    original, tokenizer = aha.load_model(base.model)
    heldout = build_datasets(
        base.data, tokenizer, seq_len=eval_seq_len or base.seq_len,
        heldout_fraction=base.heldout_fraction, text_field=base.text_field, min_doc_tokens=base.min_doc_tokens,
    ).heldout
    sequences = full_length_subset(heldout, eval_sequences)

    reference_file = out / "reference.json"
    if reference_file.exists():
        reference = json.loads(reference_file.read_text())["perplexity"]
    else:
        log(f"reference: the original {base.model} with full attention on {len(sequences)} held-out sequences")
        reference = reference_perplexity(original, sequences, windows[0], eval_batch_size, progress)
        write_json_report(reference_file, {"model": base.model, "perplexity": reference, "sequences": len(sequences)})
    del original
    gc.collect()

    points = []
    for window in windows:
        config = window_run_config(base, window, out)
        run = Path(config.out)
        if _is_trained(run):
            log(f"window {window}: trained already ({run})")
        else:
            log(f"window {window}: training {config.steps} steps -> {run} (resumes from its last checkpoint, if any)")
            trained = train(config)
            del trained
            gc.collect()
        # the finished model is saved: the resume checkpoints (weights + optimizer state) are dead weight
        shutil.rmtree(run / "checkpoints", ignore_errors=True)
        eval_file = run / "sweep_eval.json"
        if eval_file.exists():
            point = SweepPoint(**json.loads(eval_file.read_text()))
        else:
            log(f"window {window}: evaluating on {len(sequences)} held-out sequences")
            point = evaluate_window(run / "model", sequences, eval_batch_size, progress)
            write_json_report(eval_file, dataclasses.asdict(point))
        log(f"window {window}: global fraction {point.global_fraction:.1%}, perplexity {point.perplexity:.3f}")
        points.append(point)

    title = f"Global attention needed vs window ({base.model}, {base.steps} steps)"
    return write_sweep(points, reference, out, title=title, recipe=base.to_dict())
