"""The window sweep's measurements: one routed model per window on the same held-out sequences.

:func:`evaluate_window` scores one window's trained model (its learned routes, and the same weights
forced global), :func:`reference_perplexity` the original model with full attention, and
:func:`write_sweep` writes ``sweep.json`` and the long-tail plot. The training of each window is the
recipe :mod:`aha.recipes.sweep` (``aha sweep``), which also documents the sweep folder's layout.
"""

from __future__ import annotations

import dataclasses
import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils.data import Subset

import aha
from aha.evaluation.perplexity import compare_routing_modes
from aha.report.plots import WindowPoint, plot_global_fraction_vs_window
from aha.report.provenance import run_meta, write_json_report
from aha.train.config import load_config

#: Routing modes each window's model is evaluated in: its learned routes, and the same weights forced global.
SWEEP_MODES = ("full", "aha")


@dataclass(frozen=True)
class SweepPoint:
    """One window's trained model on the held-out sequences; ``vs_full``: its perplexity change against
    the same weights forced global, with the paired bootstrap interval (see
    :meth:`~aha.evaluation.perplexity.PerplexityResult.change_against`; None in sweeps evaluated before it)."""

    window: int
    global_fraction: float
    operations_replaced: float
    compute_ratio: float
    perplexity: float
    full_attention_perplexity: float
    per_layer: list[float]
    vs_full: dict[str, Any] | None = None


SCHEMA = "aha-sweep/2"


@dataclass
class SweepResult:
    """The sweep's points (ascending window) and the original model's full-attention perplexity;
    ``recipe`` is the training recipe every window shared (its ``window`` and ``out`` vary)."""

    points: list[SweepPoint]
    reference_perplexity: float
    files: dict[str, str]
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "meta": run_meta(seed=self.recipe.get("seed")),
            "recipe": self.recipe,
            "reference_perplexity": self.reference_perplexity,
            "points": [dataclasses.asdict(p) for p in self.points],
            "files": self.files,
        }


def reference_perplexity(model: Any, sequences: Subset, window: int, batch_size: int = 1, progress: bool = True) -> float:
    """Held-out perplexity of the original ``model`` with full attention (a plain model is converted
    with open routers at ``window`` first, then forced global)."""
    if not aha.is_aha_model(model):
        model = aha.convert(model, window=window).eval()  # open routers; forced global below
    report = compare_routing_modes(model, sequences, modes=("full",), batch_size=batch_size, progress=progress)
    return report.results["full"].perplexity


def evaluate_window(model_dir: Path, sequences: Subset, batch_size: int = 1, progress: bool = True) -> SweepPoint:
    """One window's point: the AHA model saved at ``model_dir`` on ``sequences`` (learned routes and forced global)."""
    model, _ = aha.load_model(model_dir)
    report = compare_routing_modes(model, sequences, modes=SWEEP_MODES, batch_size=batch_size, progress=progress)
    routed = report.results["aha"]
    point = SweepPoint(
        window=report.window,
        global_fraction=routed.routing.global_fraction,
        operations_replaced=routed.routing.operations_replaced,
        compute_ratio=routed.routing.compute_ratio,
        perplexity=routed.perplexity,
        full_attention_perplexity=report.results["full"].perplexity,
        per_layer=routed.routing.per_layer().tolist(),
        vs_full=routed.change_against(report.results["full"]),
    )
    del model
    gc.collect()
    return point


def write_sweep(
    points: list[SweepPoint], reference: float, out: Path, *, title: str, recipe: dict[str, Any] | None = None
) -> SweepResult:
    """Plot the long-tail curve (``long_tail.png``) and write ``sweep.json`` into ``out`` (``recipe``:
    the shared training recipe, recorded in the report)."""
    plot = plot_global_fraction_vs_window(
        [WindowPoint(p.window, p.global_fraction, p.perplexity) for p in points],
        out / "long_tail.png",
        full_attention_perplexity=reference,
        full_attention_label="perplexity (original model, full attention)",
        title=title,
    )
    result = SweepResult(points, reference, {"plot": str(plot), "json": str(out / "sweep.json")}, recipe or {})
    write_json_report(out / "sweep.json", result.to_dict())
    return result


def operator_label(sink: int) -> str:
    """How a sweep's local heads see the keys: the window alone (the paper's operator), or with sink keys."""
    return "window only (the paper's operator)" if sink == 0 else f"window + {sink} sink key{'s' if sink > 1 else ''}"


def compare_sweeps(folders: list[Path], out: Path) -> Path:
    """Draw finished sweeps (their ``sweep.json``) in one long-tail plot, ``out/long_tail.png``, one
    colour per sweep, labelled by its local operator (from a window run's ``config.yaml``).

    Raises:
        ValueError: a folder holds no finished sweep, ``out`` is one of them, or two sweeps have the
            same operator (their curves would share a label).
    """
    if any(Path(folder).resolve() == Path(out).resolve() for folder in folders):
        raise ValueError(f"--out {out} is one of the compared sweeps: write the comparison to a folder of its own")
    series: dict[str, list[WindowPoint]] = {}
    references = []
    for folder in map(Path, folders):
        if not (folder / "sweep.json").exists():
            raise ValueError(f"{folder} holds no sweep.json: finish that sweep first (re-run its aha sweep command)")
        result = json.loads((folder / "sweep.json").read_text())
        configs = sorted(folder.glob("w*/config.yaml"))
        label = operator_label(load_config(configs[0]).sink if configs else 0)
        if label in series:
            raise ValueError(f"two of the compared sweeps use the same operator ({label}); compare sweeps of different sinks")
        series[label] = [WindowPoint(p["window"], p["global_fraction"], p["perplexity"]) for p in result["points"]]
        references.append(result["reference_perplexity"])
    # one reference line where every sweep scored the original model on the same held-out sequences
    reference = references[0] if max(references) - min(references) <= 1e-6 * references[0] else None
    return plot_global_fraction_vs_window(
        series, Path(out) / "long_tail.png", full_attention_perplexity=reference,
        full_attention_label="perplexity (original model, full attention)", title="Global attention needed vs window",
    )  # fmt: skip
