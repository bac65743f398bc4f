"""Atomic, verified, rotating training checkpoints on top of ``accelerate``'s ``save_state`` / ``load_state``.

A checkpoint is written into ``checkpoints/.tmp-step-XXXXXXXX`` by every process (model, optimizer,
scheduler, per-process RNG states), completed by the main process with ``trainer_state.json`` (the
trainer's own counters, as JSON) and ``manifest.json`` (size and SHA-256 of every file), then
renamed to ``checkpoints/step-XXXXXXXX``. A rename within one folder is atomic, so a run killed at
any moment leaves either a complete checkpoint or a leftover temporary folder that is ignored and
cleaned up by the next save.

Loading never executes code from the folder: the trainer's state is JSON (no custom objects are
registered with accelerate, whose loader unpickles those with ``weights_only=False``), and
accelerate loads the model from safetensors and everything else with ``weights_only=True``. A
checkpoint whose files do not match its manifest (truncated, corrupted, replaced) is skipped for
the next older intact one, with a message; so is one that fails to load.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from aha._cache import manifest_problem, write_manifest
from aha.train.config import TrainConfig, differing_fields

if TYPE_CHECKING:
    from accelerate import Accelerator

_FINAL = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"
MANIFEST_FORMAT = 1


class CheckpointError(RuntimeError):
    """No checkpoint of a run folder could be loaded (the message lists why for each)."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(folder: Path) -> list[Path]:
    """Complete (renamed) checkpoints in ``folder``, oldest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _FINAL.match(p.name)]
    return sorted(found, key=lambda p: int(_FINAL.match(p.name)[1]))  # type: ignore[index]


def verify_checkpoint(path: Path) -> str | None:
    """Why ``path`` is not intact (no manifest; a file missing, added, of another size or hash), or None."""
    problem = manifest_problem(path, MANIFEST, strict=True)
    if problem is None and not (path / TRAINER_STATE).is_file():
        return f"it holds no {TRAINER_STATE}"
    return problem


def save_checkpoint(accelerator: Accelerator, folder: Path, step: int, keep: int, trainer_state: dict[str, Any]) -> Path:
    """Save the full training state for ``step`` atomically; keep the newest ``keep`` checkpoints.

    ``trainer_state`` (JSON-ready) is the trainer's own state. Must be called by every process
    (``save_state`` writes per-process RNG states).
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
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
        write_manifest(tmp, MANIFEST, format=MANIFEST_FORMAT, step=step)
        if final.exists():  # a damaged checkpoint of this step, skipped when resuming
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in list_checkpoints(folder)[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_newest_intact(
    accelerator: Accelerator, folder: Path, report: Callable[[str], None] = print
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest checkpoint in ``folder`` that verifies and loads; returns (its path, trainer state).

    Damaged checkpoints are skipped with a message through ``report``. Returns None when ``folder``
    holds no checkpoint. Raises :class:`CheckpointError` when none of them can be loaded.
    """
    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        return None
    problems = []
    for path in reversed(checkpoints):
        problem = verify_checkpoint(path)
        if problem is None:
            try:
                accelerator.load_state(str(path))
                return path, json.loads((path / TRAINER_STATE).read_text())
            except Exception as exc:  # noqa: BLE001 -- any failure to load means: try the next older one
                problem = f"failed to load: {exc.__class__.__name__}: {str(exc)[:200]}"
        problems.append(f"{path.name}: {problem}")
        report(f"aha train: skipping damaged checkpoint {path} ({problem})")
    raise CheckpointError(
        f"no checkpoint in {folder} can be loaded:\n  " + "\n  ".join(problems) + "\n"
        "Delete the folder (or pass a new --out) to start the run over."
    )


def check_resume(config: TrainConfig, out: Path, num_processes: int | None = None) -> bool:
    """Whether the run folder ``out`` holds checkpoints to resume; refuses those of a run with another config,
    or (given ``num_processes``) whose newest checkpoint was written by another number of processes."""
    checkpoints = list_checkpoints(out / "checkpoints")
    if checkpoints and num_processes is not None:
        try:
            saved = json.loads((checkpoints[-1] / TRAINER_STATE).read_text()).get("num_processes")
        except (OSError, ValueError, AttributeError):
            saved = None  # damaged or older than the field: left to the loader
        if isinstance(saved, int) and saved != num_processes:
            raise ValueError(
                f"{checkpoints[-1]} was written by {saved} process(es), this run has {num_processes}: the global batch "
                "(batch_size x grad_accum x processes), the batch order, the per-process RNG states and, under FSDP, the "
                f"shards depend on it. Resume with {saved} processes (accelerate launch --num_processes {saved}), or pass a new --out"
            )
    saved_config = out / "config.yaml"
    if checkpoints and saved_config.exists():
        changed = differing_fields(yaml.safe_load(saved_config.read_text()), config)
        if changed:
            raise ValueError(
                f"{out} holds a run with a different config ({', '.join(changed)} differ); resume it with the same "
                "settings, or pass a new --out"
            )
    return bool(checkpoints)
