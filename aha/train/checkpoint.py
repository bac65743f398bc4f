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
the next older intact one, with a message. An intact checkpoint (every file as it was saved) that
fails to load is not damaged: its error is raised, with a note that the checkpoint is kept, and
nothing older is tried. Resume is exact or refused: RNG states that accelerate could not restore
(it skips them silently) raise :class:`CheckpointError` naming the file.

A full disk while saving raises :class:`DiskFullError`, which says what failed, the free space, and
that the previous checkpoint is intact (a save never deletes one before its successor is complete).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import yaml
from tqdm import tqdm

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
    """A run's checkpoints cannot be resumed from, or its state cannot be saved; the message says why and what to do."""


class DiskFullError(CheckpointError):
    """Saving a checkpoint or the final model failed because the disk is full (the message says what is kept)."""


_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
#: Free bytes below which a failed write is taken for a full disk: torch.save reports one as a bare
#: RuntimeError ("unexpected pos ..."), and a write that hit the end leaves less than a block free.
_NEARLY_FULL = 1 << 20


def _is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an exception it was raised from, is a full disk or quota (safetensors reports
    it as a SafetensorError that only quotes the OS message)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in _DISK_FULL:
            return True
        if any(os.strerror(code) in str(error) for code in _DISK_FULL):
            return True
        error = error.__cause__ or error.__context__
    return False


def _size(nbytes: int) -> str:
    return tqdm.format_sizeof(nbytes, "B")


def folder_size(folder: Path) -> int:
    """Bytes of the files under ``folder``."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


@contextmanager
def disk_full_reported(what: str, where: Path, kept: str, partial: Path | None = None) -> Iterator[None]:
    """Turn a full disk inside the block into a :class:`DiskFullError`; other errors pass unchanged.

    The message names ``what`` failed and ``where``, the space free there (after removing ``partial``,
    the half-written folder, which frees what it took), and ``kept``: what is intact.
    """
    try:
        yield
    except Exception as error:
        probe = where
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        full = _is_disk_full(error) or shutil.disk_usage(probe).free < _NEARLY_FULL  # before the partial files go
        if partial is not None:
            shutil.rmtree(partial, ignore_errors=True)
        if not full:
            raise
        free = _size(shutil.disk_usage(probe).free)
        raise DiskFullError(
            f"aha train: the disk is full: {what} to {where} failed ({error.__class__.__name__}: {str(error)[:200]}); "
            f"{free} free there now. {kept} Free some space and run the same command again to resume."
        ) from None


def replace_folder(staging: Path, final: Path) -> None:
    """Put the complete folder ``staging`` at ``final`` by renames within one folder: a reader sees the old
    ``final`` or the new one, never a half-written one (a crash between the two renames leaves no ``final``,
    and the staging copy, which the next save replaces)."""
    old = final.with_name(f"{_TMP_PREFIX}old-{final.name}")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def staging_folder(final: Path) -> Path:
    """The temporary sibling that ``final`` is written into before :func:`replace_folder` renames it."""
    return final.with_name(f"{_TMP_PREFIX}{final.name}")


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
    tmp = staging_folder(final)
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{_TMP_PREFIX}*"):
            shutil.rmtree(stale, ignore_errors=True)
    previous = list_checkpoints(folder)
    kept = (
        f"The previous checkpoint, {previous[-1].name}, is intact ({_size(folder_size(previous[-1]))}); nothing was deleted."
        if previous
        else "No checkpoint of this run was saved yet."
    )
    with disk_full_reported(f"saving checkpoint {final.name}", folder, kept, partial=tmp):
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
            write_manifest(tmp, MANIFEST, format=MANIFEST_FORMAT, step=step)
            replace_folder(tmp, final)  # an existing one of this step is damaged: it was skipped when resuming
    if accelerator.is_main_process:
        for old in list_checkpoints(folder)[: -max(1, keep)]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _same(saved: Any, current: Any) -> bool:
    """Whether two RNG states (tensors, arrays, and tuples or lists of them and of numbers) are equal."""
    if isinstance(saved, torch.Tensor) or isinstance(current, torch.Tensor):
        return isinstance(saved, torch.Tensor) and isinstance(current, torch.Tensor) and torch.equal(saved, current)
    if isinstance(saved, np.ndarray) or isinstance(current, np.ndarray):
        return np.array_equal(saved, current)
    if isinstance(saved, (tuple, list)) and isinstance(current, (tuple, list)):
        return len(saved) == len(current) and all(_same(a, b) for a, b in zip(saved, current))
    return bool(saved == current)


def _current_rng_states(saved: dict[str, Any]) -> dict[str, Any]:
    """The generators' states now, under the keys accelerate saves them with (those in ``saved``)."""
    from accelerate.utils import get_torch_accelerator_backend

    current = {"random_state": random.getstate(), "numpy_random_seed": np.random.get_state(), "torch_manual_seed": torch.get_rng_state()}
    device_type, module = get_torch_accelerator_backend()
    key = f"torch_{device_type}_manual_seed"
    if device_type is not None and key in saved:  # read back the way accelerate sets it
        native = torch.get_device_module(device_type)
        current[key] = native.get_rng_state() if module is torch.accelerator or device_type == "mps" else native.get_rng_state_all()
    return current


def rng_problem(path: Path, process_index: int) -> str | None:
    """Why this process's RNG states are not those saved in checkpoint ``path``, or None; call right after
    ``load_state``, which skips states it cannot load without a word (it only logs at INFO level)."""
    from accelerate.utils import RNG_STATE_NAME, load

    file = path / f"{RNG_STATE_NAME}_{process_index}.pkl"
    if not file.is_file():
        return f"{file.name} is missing"
    try:
        saved = load(file)  # as accelerate reads it: weights_only
    except Exception as exc:  # noqa: BLE001 -- whatever the reason, the states were not restored
        return f"{file.name} does not load ({exc.__class__.__name__}: {str(exc)[:200]})"
    if not isinstance(saved, dict):
        return f"{file.name} holds a {type(saved).__name__}, not accelerate's dict of RNG states"
    differing = [key for key, state in _current_rng_states(saved).items() if key not in saved or not _same(saved[key], state)]
    return f"{file.name}: {', '.join(differing)} not restored" if differing else None


def load_newest_intact(
    accelerator: Accelerator, folder: Path, report: Callable[[str], None] = print
) -> tuple[Path, dict[str, Any]] | None:
    """Load the newest intact checkpoint in ``folder``; returns (its path, trainer state).

    Damaged checkpoints (files that do not match the manifest) are skipped with a message through
    ``report``. Returns None when ``folder`` holds no checkpoint. Raises :class:`CheckpointError`
    when all are damaged, or when the RNG states of the intact one were not restored (on every
    process: call on every process). An intact checkpoint that fails to load raises its own error,
    noted with what to do: it is not damaged, and older ones are not tried.
    """
    from accelerate.utils import gather_object

    checkpoints = list_checkpoints(folder)
    if not checkpoints:
        return None
    problems = []
    for path in reversed(checkpoints):
        problem = verify_checkpoint(path)
        if problem is not None:
            problems.append(f"{path.name}: {problem}")
            report(f"aha train: skipping damaged checkpoint {path} ({problem})")
            continue
        try:
            accelerator.load_state(str(path))
            state = json.loads((path / TRAINER_STATE).read_text())
        except Exception as exc:
            exc.add_note(
                f"aha train: {path} is intact (every file matches its manifest) but does not load, so it was probably "
                "written by another version of aha, accelerate or torch. It is kept, and so are the older checkpoints: "
                "resume with the versions that wrote it, or pass a new --out to start over."
            )
            raise
        unrestored = [f"process {index}: {p}" for index, p in enumerate(gather_object([rng_problem(path, accelerator.process_index)])) if p]
        if unrestored:
            raise CheckpointError(
                f"aha train: {path} is intact, but its RNG states were not restored ({'; '.join(unrestored)}), so the "
                "resumed run would not be exact (accelerate skips such states silently). The checkpoint is kept. Move it "
                f"out of {folder} to resume from the one before, or pass a new --out to start over."
            )
        return path, state
    raise CheckpointError(
        f"no checkpoint in {folder} can be loaded (each one's files differ from its manifest):\n  " + "\n  ".join(problems) + "\n"
        "They are left as they are. Pass a new --out to start the run over."
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
