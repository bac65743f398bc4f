"""Settings fields that are also command-line flags.

A settings dataclass (:class:`aha.train.TrainConfig`, :class:`aha.evaluation.EvalSettings`, the
demo's and the benchmarks' settings) declares a field with :func:`option` to give it its help
text, and its flag name where that is not the field's name with dashes. :mod:`aha.cli.options`
turns such fields into the ``aha`` command's flags. This module needs no optional package, so
settings modules import it in a core install.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


def option(
    help: str,
    flag: str | None = None,
    *,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A dataclass field that is a flag: ``help`` is its help text, ``flag`` its name (default:
    ``--`` + the field name with dashes) and ``parse`` turns the flag's text into the value where
    the field's type alone cannot (a ``ValueError`` it raises is reported naming the flag)."""
    metadata: dict[str, Any] = {"help": help}
    if flag is not None:
        metadata["flag"] = flag
    if parse is not None:
        metadata["parse"] = parse
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)
