"""Optional dependencies: which extra of ``aha-attention`` brings each one, and the error that says so.

``pip install aha-attention`` brings the operator, the Hugging Face integration and model loading
(torch, transformers, safetensors). Everything else is an extra:

* ``train``: accelerate, peft, datasets (``aha train``, :mod:`aha.recipes.finetune`, ``hf:`` data);
* ``eval``: lm-eval, matplotlib (``aha eval`` plots, ``aha lm-eval``);
* ``cli``: typer, rich, matplotlib, gguf, jinja2 (the ``aha`` command; gguf reads the offline SmolLM2,
  jinja2 renders the published tables);
* ``serve``: fastapi, uvicorn, openai, prometheus_client (``aha serve``);
* ``demo``: cli + train + eval; ``dev``: everything.
"""

from __future__ import annotations

import importlib.util

#: Top-level import name -> the extra that installs it.
EXTRA_OF = {
    "accelerate": "train",
    "peft": "train",
    "datasets": "train",
    "lm_eval": "eval",
    "matplotlib": "eval",
    "typer": "cli",
    "rich": "cli",
    "gguf": "cli",
    "jinja2": "cli",
    "fastapi": "serve",
    "uvicorn": "serve",
    "openai": "serve",
    "prometheus_client": "serve",
}


class MissingExtraError(ImportError):
    """An optional package is not installed; the message names the ``pip install`` that brings it."""


def missing_extra(package: str, purpose: str, extra: str | None = None) -> MissingExtraError:
    """The error for ``package`` missing when ``purpose`` needs it."""
    extra = extra or EXTRA_OF.get(package, "dev")
    return MissingExtraError(
        f"{purpose} needs {package}, which is not installed: pip install 'aha-attention[{extra}]'", name=package
    )


def require(package: str, purpose: str, extra: str | None = None) -> None:
    """Raise :class:`MissingExtraError` unless ``package`` can be imported (without importing it)."""
    if importlib.util.find_spec(package) is None:
        raise missing_extra(package, purpose, extra)


def reraise_missing(error: ImportError, purpose: str) -> MissingExtraError | ImportError:
    """Turn an ``ImportError`` of an optional package (``error.name``) into a :class:`MissingExtraError`;
    any other import error is returned unchanged."""
    top = (error.name or "").split(".")[0]
    return missing_extra(top, purpose) if top in EXTRA_OF else error
