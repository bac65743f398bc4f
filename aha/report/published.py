"""Published tables rendered from committed reports (``aha report render`` / ``aha report check``).

A table in README.md, benchmarks/RESULTS.md or docs/ whose numbers were measured is a *block*: an
HTML comment holding a Jinja template (the rest of its first line is a free label), the table
rendered from it, and an end marker::

    <!-- aha:table
    {% set run = report("benchmarks/results/bench-20261205-160632.json") %}
    | n | speedup |
    |---|---|
    {% for row in run.rows("kernels", "prefill", dtype="float32", rho=0.07) %}
    | {{ row.n }} | {{ row.speedup | fmt(".2f") }}x |
    {% endfor %}
    -->
    | n | speedup |
    |---|---|
    | 4096 | 4.58x |
    <!-- aha:end -->

Markdown viewers hide the comment. ``report(path)`` loads a committed JSON report (strict JSON; the
path is relative to the repository root) as a :class:`Report`. :func:`render_text` rewrites every
block's table from its template; :func:`check_text` renders without writing and lists each block
whose table differs from what its reports give, names no report, or names one that is missing.
A block indented inside a list keeps its indentation (the template is written at the block's
indentation too). Prose beside a table may round its numbers, but must not state one that no block
or committed report holds.

Template helpers: ``report(path)``; ``select(items, **where)`` and ``one(items, **where)`` (rows whose
keys equal the given values; ``one`` insists on exactly one); filters ``fmt(spec)`` (``format``, "-"
for null), ``pct(digits=1, signed=False)`` (a fraction as a percentage), ``ci(digits=1, signed=False)``
(an interval dict's ``[low, high]`` as percentages), ``short`` (a commit's first 7 characters).
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aha._optional import reraise_missing

try:
    import jinja2
except ImportError as error:
    raise reraise_missing(error, "aha report (rendering the published tables)") from error

BLOCK = re.compile(
    r"^(?P<indent>[ \t]*)<!-- aha:table[^\n]*\n(?P<template>.*?)\n(?P=indent)-->\n(?P<body>.*?)^(?P=indent)<!-- aha:end -->",
    re.MULTILINE | re.DOTALL,
)

#: The files whose blocks ``aha report render`` / ``check`` handle by default (relative to the root).
PUBLISHED = ("README.md", "benchmarks/RESULTS.md", "docs/*.md")


class ReportError(ValueError):
    """A block cannot be rendered: a report is missing or not strict JSON, a row is not found, or the template fails."""


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (write reports with aha.report.provenance.write_json_report)")


def select(items: Iterable[Mapping[str, Any]], **where: Any) -> list[Mapping[str, Any]]:
    """The items whose keys equal every value in ``where``."""
    return [item for item in items if all(item.get(key) == value for key, value in where.items())]


def one(items: Iterable[Mapping[str, Any]], **where: Any) -> Mapping[str, Any]:
    """The single item matching ``where`` (see :func:`select`); a clear error for none or several."""
    found = select(items, **where)
    if len(found) != 1:
        raise ReportError(f"{len(found)} rows match {where}; the template needs exactly one")
    return found[0]


@dataclass
class Report:
    """A committed JSON report, as a template sees it: its keys (``run.meta``), and the rows of an
    ``aha bench`` report's sections (:meth:`rows`, :meth:`row`)."""

    path: str
    data: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def rows(self, group: str, section: str, *, missing_ok: bool = False, **where: Any) -> list[Mapping[str, Any]]:
        """Rows of section ``section`` of benchmark group ``group`` matching ``where`` (no rows for a
        missing section with ``missing_ok``, else an error)."""
        sections = [s for s in self.data.get("groups", {}).get(group, []) if s["name"] == section]
        if not sections:
            if missing_ok:
                return []
            raise ReportError(f"{self.path} has no section {group}/{section}")
        return select(sections[0]["rows"], **where)

    def row(self, group: str, section: str, **where: Any) -> Mapping[str, Any]:
        """The single row of ``group``/``section`` matching ``where``."""
        return one(self.rows(group, section), **where)


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None, digits: int = 1, signed: bool = False) -> str:
    return "-" if value is None else f"{100 * value:{'+' if signed else ''}.{digits}f}%"


def _ci(interval: Mapping[str, Any] | None, digits: int = 1, signed: bool = False) -> str:
    if interval is None:
        return "-"
    sign = "+" if signed else ""
    return f"[{100 * interval['low']:{sign}.{digits}f}, {100 * interval['high']:{sign}.{digits}f}]"


@dataclass
class Block:
    """One block of a Markdown file: where it is, its template and its current table."""

    start: int
    end: int
    line: int
    indent: str
    template: str
    body: str


def blocks(text: str) -> list[Block]:
    """The blocks of a Markdown text, in order."""
    return [
        Block(m.start("body"), m.end("body"), text.count("\n", 0, m.start()) + 1, m.group("indent"), m.group("template"), m.group("body"))
        for m in BLOCK.finditer(text)
    ]


def render_block(block: Block, root: Path) -> tuple[str, list[str]]:
    """The table ``block``'s template gives, and the reports it named (relative paths)."""
    named: list[str] = []

    def report(path: str) -> Report:
        named.append(path)
        file = root / path
        if not file.is_file():
            raise ReportError(f"report {path} is missing (commit it, or regenerate it with the command that wrote it)")
        try:
            data = json.loads(file.read_text(), parse_constant=_no_constants)
        except ValueError as error:
            raise ReportError(f"report {path} is not strict JSON: {error}") from None
        return Report(path, data)

    environment = jinja2.Environment(
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True, autoescape=False, extensions=["jinja2.ext.do"]
    )
    environment.filters |= {"fmt": _fmt, "pct": _pct, "ci": _ci, "short": lambda commit: commit[:7] if commit else "-"}
    environment.globals |= {"report": report, "select": select, "one": one}
    try:
        lines = environment.from_string(textwrap.dedent(block.template)).render().strip("\n").splitlines()
    except ReportError:
        raise
    except (jinja2.TemplateError, KeyError, TypeError, ValueError) as error:
        raise ReportError(f"the template fails: {type(error).__name__}: {error}") from None
    return "".join(f"{block.indent}{line}\n" if line.strip() else "\n" for line in lines), named


def render_text(text: str, root: Path) -> tuple[str, list[str]]:
    """``text`` with every block's table rendered from its template, and the problems found
    (``"line N: ..."``; a block that cannot be rendered keeps its table)."""
    problems, pieces, position = [], [], 0
    for block in blocks(text):
        pieces.append(text[position : block.start])
        try:
            body, named = render_block(block, root)
            if not named:
                problems.append(f"line {block.line}: the block names no report")
        except ReportError as error:
            problems.append(f"line {block.line}: {error}")
            body = block.body
        pieces.append(body)
        position = block.end
    pieces.append(text[position:])
    return "".join(pieces), problems


def check_text(text: str, root: Path) -> list[str]:
    """Problems of ``text``'s blocks: rendering failures, and tables that differ from their reports."""
    rendered, problems = render_text(text, root)
    for old, new in zip(blocks(text), blocks(rendered), strict=True):
        if old.body != new.body:
            diff = next(
                (f"{a.strip()!r} should be {b.strip()!r}" for a, b in zip(old.body.splitlines(), new.body.splitlines()) if a != b),
                f"{len(old.body.splitlines())} lines should be {len(new.body.splitlines())}",
            )
            problems.append(f"line {old.line}: the table differs from its report(s): {diff} (run `aha report render`)")
    return problems


def published_files(root: Path, patterns: Iterable[str] = PUBLISHED) -> list[Path]:
    """The existing files matching ``patterns`` under ``root``."""
    return sorted({path for pattern in patterns for path in root.glob(pattern) if path.is_file()})


def render_files(files: Iterable[Path], root: Path, *, write: bool) -> dict[Path, list[str]]:
    """Render (``write=True``: and rewrite) the blocks of ``files``; returns each file's problems.

    With ``write=False`` it only checks: a table that differs from its reports is a problem.
    """
    problems = {}
    for path in files:
        text = path.read_text()
        if write:
            rendered, found = render_text(text, root)
            if rendered != text:
                path.write_text(rendered)
        else:
            found = check_text(text, root)
        problems[path] = found
    return problems


__all__ = ["Block", "Report", "ReportError", "blocks", "check_text", "one", "published_files", "render_files", "render_text", "select"]
