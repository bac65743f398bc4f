"""One call that evaluates a routed model and writes its report folder (what ``aha eval`` runs).

Output folder::

    eval.json                      everything measured (schema: :meth:`EvalRun.to_dict`)
    routing_layer_head.png         AHA global fraction per layer x head on held-out text
    routing_position.png           AHA global fraction vs token position on held-out text
    passkey_answer_layer_head.png  AHA global fraction per layer x head at the passkey answer steps
    token_view.html                one text, each token shaded by how many heads routed it global
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, get_args

import torch

import aha
from aha._fields import option
from aha.data import build_datasets
from aha.data.passkey import PasskeyPromptBuilder
from aha.evaluation.passkey import (
    DEFAULT_CONTEXT_LENGTHS,
    DEFAULT_DEPTHS,
    DEFAULT_OFFSETS,
    PasskeyResult,
    evaluate_passkey,
    greedy_answer,
    stop_token_ids,
)
from aha.evaluation.perplexity import (
    PerplexityReport,
    compare_routing_modes,
    full_length_subset,
)
from aha.evaluation.routing import (
    MODES,
    RoutingMode,
    capture_routes,
    check_modes,
    converted_layers,
    routing_mode,
)
from aha.report.plots import (
    plot_global_fraction_vs_position,
    plot_layer_head_heatmap,
)
from aha.report.provenance import run_meta, write_json_report
from aha.report.token_view import write_token_view

SCHEMA = "aha-eval/2"

Task = Literal["perplexity", "passkey"]
TASKS: tuple[Task, ...] = get_args(Task)


@dataclass
class EvalSettings:
    """What :func:`run_evaluation` measures.

    Args:
        tasks: ``"perplexity"`` and/or ``"passkey"``.
        modes: routing modes compared (see :mod:`aha.evaluation.routing`).
        data: data specs of the held-out text (see :mod:`aha.data`); use the training run's specs.
        heldout_fraction: held-out share of documents; must equal the training run's so no
            training document is scored.
        seq_len: tokens per held-out sequence.
        max_sequences: held-out sequences scored (evenly spaced over the corpora).
        batch_size: sequences per forward pass.
        passkey_lengths, passkey_depths, passkey_offsets: the passkey grid (see :func:`evaluate_passkey`;
            the defaults give 100 prompts per length, what a published accuracy needs).
        seed: the passkeys.
    """

    tasks: Sequence[Task] = option("comma-separated: perplexity, passkey", default=TASKS)
    modes: Sequence[RoutingMode] = option("comma-separated routing modes: full, local, aha", default=MODES)
    data: Sequence[str] = option("held-out data spec(s), as for `aha train --data` (repeatable or comma-separated)", default=("default",))
    heldout_fraction: float = option("held-out share of documents; use the training run's value", default=0.1)
    seq_len: int = option("tokens per held-out sequence", default=1024)
    max_sequences: int = option("held-out sequences scored (evenly spaced over the corpora)", default=16)
    batch_size: int = option("sequences per forward pass", default=1)
    passkey_lengths: Sequence[int] = option("passkey prompt lengths in tokens", default=DEFAULT_CONTEXT_LENGTHS)
    passkey_depths: Sequence[float] = option(
        "needle depths in [0, 1] (0 = start of the haystack, 1 = right before the question)", default=DEFAULT_DEPTHS
    )
    passkey_offsets: int = option(
        "haystack offsets per (length, depth): prompts per length = depths x offsets (100 by default)", default=DEFAULT_OFFSETS
    )
    seed: int = option("seed of the passkeys", default=0)

    def __post_init__(self) -> None:
        unknown = [task for task in self.tasks if task not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"unknown evaluation tasks {unknown}; choose from {list(TASKS)}")
        check_modes(self.modes)


@dataclass
class EvalRun:
    """What :func:`run_evaluation` measured and wrote."""

    model: str
    settings: EvalSettings
    perplexity: PerplexityReport | None
    passkey: PasskeyResult | None
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "meta": run_meta(seed=self.settings.seed),
            "model": self.model,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": {k: list(v) if isinstance(v, (tuple, list)) else v for k, v in vars(self.settings).items()},
            "perplexity": self.perplexity.to_dict() if self.perplexity else None,
            "passkey": self.passkey.to_dict() if self.passkey else None,
            "files": self.files,
        }


def _token_strings(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def _passkey_token_view(model: torch.nn.Module, tokenizer: Any, settings: EvalSettings, path: Path) -> Path:
    """Token view of one passkey prompt plus the AHA model's answer (needle early, beyond the window if possible)."""
    window = aha.AhaSettings.of(model.config).window
    lengths = sorted(settings.passkey_lengths)
    length = next((n for n in lengths if n >= 2 * window), lengths[-1])
    prompt = PasskeyPromptBuilder(tokenizer).build(length, 0.1, "48213", rng=random.Random(settings.seed))
    with routing_mode(model, "aha"):
        answer_ids, _, _ = greedy_answer(model, prompt.input_ids, max_new_tokens=16, eos_token_ids=stop_token_ids(model, tokenizer))
    ids = prompt.input_ids + answer_ids
    answer = tokenizer.decode(answer_ids, skip_special_tokens=True).strip()
    return write_token_view(
        _token_strings(tokenizer, ids),
        capture_routes(model, torch.tensor(ids)),
        path,
        layer_names=[f"layer {i}" for i in converted_layers(model)],
        title="Where the AHA model attends globally: passkey retrieval",
        subtitle=(
            f"window {window}; {len(prompt.input_ids)}-token prompt, needle ends at token {prompt.needle_end} "
            f"({prompt.needle_distance} tokens before the answer); passkey {prompt.passkey}, answer {answer!r}. "
            "Shade = share of heads that routed the token's query to full attention."
        ),
    )


def run_evaluation(
    model: torch.nn.Module,
    tokenizer: Any,
    out_dir: str | Path,
    settings: EvalSettings | None = None,
    *,
    model_name: str = "",
    progress: bool = True,
) -> EvalRun:
    """Evaluate an AHA model (perplexity and/or passkey, in every routing mode) and write the report folder.

    Args:
        model: an AHA-converted causal LM (``aha.convert`` or a saved AHA model), in eval mode.
        tokenizer: its (fast) tokenizer.
        out_dir: the report folder (created; files listed in the module docstring).
        settings: what to measure (default :class:`EvalSettings`).
        model_name: recorded in ``eval.json``.
    """
    if not aha.is_aha_model(model):
        raise TypeError("run_evaluation needs an AHA model; convert it first with aha.convert(model, window=...)")
    settings = settings or EvalSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    run = EvalRun(model=model_name, settings=settings, perplexity=None, passkey=None)

    if "perplexity" in settings.tasks:
        heldout = build_datasets(
            list(settings.data), tokenizer, seq_len=settings.seq_len, heldout_fraction=settings.heldout_fraction
        ).heldout
        sequences = full_length_subset(heldout, settings.max_sequences)
        run.perplexity = compare_routing_modes(
            model, sequences, modes=settings.modes, batch_size=settings.batch_size, progress=progress
        )
        aha_stats = run.perplexity.results.get("aha")
        if aha_stats is not None:
            stats = aha_stats.routing
            run.files["routing_layer_head"] = str(plot_layer_head_heatmap(stats, out / "routing_layer_head.png"))
            run.files["routing_position"] = str(
                plot_global_fraction_vs_position(stats, out / "routing_position.png", bucket=max(1, settings.seq_len // 64))
            )

    if "passkey" in settings.tasks:
        run.passkey = evaluate_passkey(
            model,
            tokenizer,
            context_lengths=settings.passkey_lengths,
            depths=settings.passkey_depths,
            offsets=settings.passkey_offsets,
            modes=settings.modes,
            seed=settings.seed,
            progress=progress,
        )
        if run.passkey.answer_stats is not None:
            run.files["passkey_answer_layer_head"] = str(
                plot_layer_head_heatmap(
                    run.passkey.answer_stats,
                    out / "passkey_answer_layer_head.png",
                    title="Global fraction at the passkey answer steps",
                )
            )
        run.files["token_view"] = str(_passkey_token_view(model, tokenizer, settings, out / "token_view.html"))
    elif run.perplexity is not None:
        first = sequences[0]["input_ids"]
        run.files["token_view"] = str(
            write_token_view(
                _token_strings(tokenizer, first.tolist()),
                capture_routes(model, first),
                out / "token_view.html",
                layer_names=[f"layer {i}" for i in converted_layers(model)],
                subtitle=f"first held-out sequence ({first.numel()} tokens), window {run.perplexity.window}",
            )
        )

    run.files["json"] = str(out / "eval.json")
    write_json_report(out / "eval.json", run.to_dict())
    return run
