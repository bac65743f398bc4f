"""aha's on-disk cache (``$AHA_CACHE_DIR``, default ``~/.cache/aha``): entries that are built once,
checked on every use, and rebuilt when damaged.

An entry is a folder built into a private staging sibling (``.<name>.<pid>.*``) and renamed into
place only when complete, with a manifest of the size and SHA-256 of every file. On use the sizes
are checked every time and the hashes on the first use in a process (every use with
``AHA_VERIFY_CACHE=1``); a damaged entry (a truncated or flipped file, a missing manifest) is
rebuilt with a warning. Staging folders of builders that died are removed by the next build.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

_log = logging.getLogger(__name__)

CACHE_DIR_ENV = "AHA_CACHE_DIR"
MANIFEST = ".aha-manifest.json"
_hash_checked: set[Path] = set()


def cache_dir() -> Path:
    """The cache root: ``$AHA_CACHE_DIR``, else ``~/.cache/aha``."""
    return Path(os.environ.get(CACHE_DIR_ENV) or Path.home() / ".cache" / "aha").expanduser()


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A private temporary sibling of ``path`` to write; when the block ends without error it replaces
    ``path`` in one rename (readers see the old file or the whole new one, never a torn write), and
    it is removed when the block fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    partial = Path(name)
    try:
        yield partial
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through :func:`atomic_file`."""
    with atomic_file(path) as partial:
        partial.write_text(text)


def sha256_file(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path, name: str = MANIFEST, **extra: object) -> None:
    """Record the size and SHA-256 of every file under ``folder`` in ``folder / name`` (with ``extra`` keys)."""
    files = {
        str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != name
    }
    (folder / name).write_text(json.dumps({**extra, "files": files}, indent=1))


def manifest_problem(folder: Path, name: str = MANIFEST, check_hashes: bool = True, strict: bool = False) -> str | None:
    """Why ``folder`` does not match its manifest ``folder / name`` (unreadable; a file missing, of
    another size or, with ``check_hashes``, another hash; with ``strict``, a file it does not
    list), or None."""
    try:
        files = json.loads((folder / name).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable {name} ({exc.__class__.__name__})"
    for file_name, expected in files.items():
        file = folder / file_name
        if not file.is_file():
            return f"{file_name} is missing"
        if file.stat().st_size != expected["size"]:
            return f"{file_name} has {file.stat().st_size} bytes, the manifest says {expected['size']}"
        if check_hashes and sha256_file(file) != expected["sha256"]:
            return f"{file_name} does not match its SHA-256 in the manifest"
    if strict:
        extra = sorted({str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != name} - set(files))
        if extra:
            return f"{extra[0]} is not in the manifest (a file added after the save)"
    return None


def entry_problem(folder: Path, check_hashes: bool | None = None) -> str | None:
    """Why the cache entry ``folder`` cannot be used (missing, or see :func:`manifest_problem`), or
    None. Hashes are checked on the first call per process and folder (or always with
    ``AHA_VERIFY_CACHE=1``, or as ``check_hashes`` says)."""
    if not folder.is_dir():
        return "missing"
    if check_hashes is None:
        check_hashes = os.environ.get("AHA_VERIFY_CACHE") == "1" or folder not in _hash_checked
    problem = manifest_problem(folder, check_hashes=check_hashes)
    if problem is None and check_hashes:
        _hash_checked.add(folder)
    return problem


def _remove_dead_staging(target: Path) -> None:
    """Remove staging siblings of ``target`` whose builder process no longer runs."""
    for staging in target.parent.glob(f".{target.name}.*"):
        try:
            pid = int(staging.name[len(target.name) + 2 :].split(".", 1)[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(staging, ignore_errors=True)
        except (ValueError, PermissionError):
            continue  # not ours, or another user's live process


def build_cached(target: Path, build: Callable[[Path], None], what: str = "cache entry") -> Path:
    """The cache entry ``target``, built with ``build(folder)`` when missing or damaged.

    ``build`` writes into a staging sibling renamed to ``target`` only once it returns (with its
    manifest), so a crash part-way never leaves a half-written ``target``. If another process
    finishes first, its copy is kept.
    """
    problem = entry_problem(target)
    if problem is None:
        return target
    if problem != "missing":
        _log.warning("aha: the cached %s at %s is damaged (%s); rebuilding it", what, target, problem)
        shutil.rmtree(target, ignore_errors=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", dir=target.parent))
    try:
        build(staging)
        write_manifest(staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache entry is an ordinary shared folder
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _hash_checked.add(target)
    return target
