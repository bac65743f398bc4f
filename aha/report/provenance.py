"""Where a published number comes from: the ``meta`` block of every JSON report, and strict JSON.

Every run whose numbers the project publishes (``aha demo``, ``aha eval``, ``aha sweep``,
``aha train``'s ``summary.json``, ``aha report compare``, ``aha bench`` with its ``model`` and
``serve`` groups, ``benchmarks/fsdp_loading_memory.py``) writes a JSON report of metrics only (no
weights) whose ``meta`` is :func:`run_meta`, through :func:`write_json_report` (strict JSON:
:func:`strict_json`, also the writer of training's ``metrics.jsonl`` and ``summary.json``). ``aha report
check`` (:mod:`aha.report.published`) then ties each table of README.md and benchmarks/RESULTS.md
to the committed report it was rendered from.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

import aha
from aha._cache import write_text_atomically

#: The folder holding the ``aha`` package: a git checkout's root when aha runs from one.
SOURCE_ROOT = Path(aha.__file__).resolve().parent.parent
KERNEL_SOURCES = Path(aha.__file__).resolve().parent / "kernels"


def git_state(root: Path = SOURCE_ROOT) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git checkout whose root is ``root``; ``(None, None)`` when ``root``
    is not the root of a checkout (an installed wheel) or git is missing.

    ``dirty`` is True when tracked files differ from the commit (untracked files are not counted, so
    reports written by the same session do not mark the next one).
    """

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30, check=True).stdout

    try:
        if Path(git("rev-parse", "--show-toplevel").strip()).resolve() != root.resolve():
            return None, None  # aha is installed inside some other repository
        commit = git("rev-parse", "--verify", "HEAD").strip()
        dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty


def kernel_sources_sha256(folder: Path = KERNEL_SOURCES) -> str:
    """SHA-256 over the kernel sources (``aha/kernels``: Python, C++ and Triton), names included:
    the version of the kernels a timing measured, also outside a git checkout."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.suffix in (".py", ".cpp") and "__pycache__" not in p.parts):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


#: The ``aha`` command line being run (set by the CLI for the length of one invocation), so a report
#: names ``aha demo --quick`` also when the CLI runs inside another program (pytest, a notebook).
_cli_command: str | None = None


def record_cli_command(command: str | None) -> str | None:
    """Set the command line :func:`run_meta` records (``None`` clears it); returns the previous one."""
    global _cli_command
    previous, _cli_command = _cli_command, command
    return previous


def run_meta(*, seed: int | None = None, threads: int | None = None, command: str | None = None) -> dict[str, Any]:
    """The ``meta`` block of a report: code, command, seed, date, machine and library versions.

    Args:
        seed: the run's seed (``None`` where the run has none).
        threads: torch threads the run used (default: ``torch.get_num_threads()`` now).
        command: the command line (default: the ``aha`` command being run, else this process's ``sys.argv``).

    Returns:
        ``{"git_commit", "git_dirty", "kernel_sources_sha256", "command", "seed", "date", "cpu",
        "cpu_id", "isa", "isa_flags", "isa_limits", "logical_cpus", "gpu", "threads", "python", "torch",
        "transformers", "accelerate", "aha"}``; ``git_commit`` / ``git_dirty`` are None outside a git checkout,
        ``isa_limits`` names the settings that capped the instruction set (``{}`` on an uncapped run),
        ``gpu`` is None without CUDA, ``accelerate`` None when it is not installed.
    """
    from aha.kernels.cpu_tuning import cpu_identity, cpu_isa, cpu_model, isa_limits

    commit, dirty = git_state()
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "kernel_sources_sha256": kernel_sources_sha256(),
        "command": command if command is not None else (_cli_command or shlex.join(sys.argv)),
        "seed": seed,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_id": cpu_identity(),
        "isa": cpu_isa(),
        "isa_flags": sorted(name for name, present in capabilities.items() if present is True),
        "isa_limits": isa_limits(),
        "logical_cpus": os.cpu_count(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "accelerate": _version("accelerate"),
        "aha": aha.__version__,
    }


#: Key under which :func:`strict_json` lists the non-finite values it wrote as null.
NON_FINITE = "non_finite"


def _finite_or_null(value: Any, path: str, replaced: dict[str, str]) -> Any:
    """``value`` (JSON-ready dicts, lists and scalars) with every non-finite float replaced by None
    (recorded in ``replaced`` as ``{dotted path: "nan" | "inf" | "-inf"}``), tuples by lists and paths
    by strings."""
    if isinstance(value, float) and not math.isfinite(value):
        replaced[path] = str(value)
        return None
    if isinstance(value, Mapping):
        return {str(key): _finite_or_null(item, f"{path}.{key}" if path else str(key), replaced) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(item, f"{path}[{index}]", replaced) for index, item in enumerate(value)]
    return str(value) if isinstance(value, Path) else value


def strict_json(record: Mapping[str, Any], indent: int | None = None) -> str:
    """Standard JSON (RFC 8259, which has no NaN or Infinity) of ``record``: a non-finite float is
    written as null and listed, with its value, under ``"non_finite"`` (``{"loss": "nan"}``), so strict
    parsers read the file and no value is silently lost. Every report and training record is written
    with it."""
    replaced: dict[str, str] = {}
    clean = _finite_or_null(record, "", replaced)
    if replaced:
        clean[NON_FINITE] = replaced
    return json.dumps(clean, indent=indent, allow_nan=False)


def write_json_report(path: str | Path, report: Mapping[str, Any]) -> Path:
    """Write ``report`` to ``path`` as indented :func:`strict_json`, atomically (readers never see half a report)."""
    path = Path(path)
    write_text_atomically(path, strict_json(report, indent=2) + "\n")
    return path


__all__ = ["NON_FINITE", "git_state", "kernel_sources_sha256", "run_meta", "strict_json", "write_json_report"]
