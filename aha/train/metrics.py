"""The metrics log of a training run: ``metrics.jsonl`` (and TensorBoard under ``tb/`` when installed),
written as strict JSON (:func:`aha.report.provenance.strict_json`, like every report).

A run resumed after a kill drops the rows its last checkpoint does not cover (and a torn last
line), so no step is ever logged twice.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from aha._cache import write_text_atomically
from aha.report.provenance import strict_json


def read_rows(path: Path) -> list[str]:
    """The JSON lines of a metrics file, without a torn (unparseable) last line."""
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if lines:
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return lines


class MetricsLog:
    """Rows of metrics: JSONL at ``path`` (main process), TensorBoard under ``tb/`` when installed."""

    def __init__(self, path: Path, resume_step: int | None, enabled: bool):
        self.path = path
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        if path.exists():
            # the killed run may have logged steps after its last checkpoint (all of them when it
            # had none), and a kill mid-write leaves a torn last line: the steps are redone
            rows = [line for line in read_rows(path) if resume_step is not None and json.loads(line)["step"] <= resume_step]
            write_text_atomically(path, "".join(f"{row}\n" for row in rows))
        if importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(path.parent / "tb"), purge_step=resume_step)

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as fh:
            fh.write(strict_json(row) + "\n")
        if self.writer is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.writer.add_scalar(f"{row['kind']}/{key}", value, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def iter_metrics(out: str | Path, kind: str = "train") -> Iterator[dict[str, Any]]:
    """Rows of ``metrics.jsonl`` in a run folder, of one ``kind`` (``"train"`` or ``"eval"``)."""
    for line in read_rows(Path(out) / "metrics.jsonl"):
        row = json.loads(line)
        if row["kind"] == kind:
            yield row
