"""Atomic, rotating training checkpoints on top of ``accelerate``'s ``save_state`` / ``load_state``.

A checkpoint is written into ``checkpoints/.tmp-step-XXXXXXXX`` by every process (model, optimizer,
scheduler, per-process RNG states and the registered custom objects), then renamed to
``checkpoints/step-XXXXXXXX`` by the main process. A rename within one folder is atomic, so a run
killed at any moment leaves either a complete checkpoint or a leftover temporary folder that is
ignored and cleaned up by the next save.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from accelerate import Accelerator

_FINAL = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _FINAL.match(p.name)]
    return sorted(found, key=lambda p: int(_FINAL.match(p.name)[1]))  # type: ignore[index]


def checkpoint_step(path: Path) -> int:
    match = _FINAL.match(path.name)
    if match is None:
        raise ValueError(f"{path} is not a checkpoint folder (step-XXXXXXXX)")
    return int(match[1])


def save_checkpoint(accelerator: Accelerator, folder: Path, step: int, keep: int) -> Path:
    """Save the full training state for ``step`` atomically; keep the newest ``keep`` checkpoints.

    Must be called by every process (``save_state`` writes per-process RNG states).
    """
    final = folder / checkpoint_name(step)
    tmp = folder / f"{_TMP_PREFIX}{final.name}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        os.replace(tmp, final)
        for old in list_checkpoints(folder)[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final
