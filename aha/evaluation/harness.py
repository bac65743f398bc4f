"""lm-evaluation-harness glue: run benchmarks on AHA models with routing active, and report it.

Saved AHA models load through ``AutoModelForCausalLM`` in any process that has run ``import aha``
(it registers the ``Aha*`` classes and the ``"aha"`` attention). The stock ``lm_eval`` command
does not import aha, so run the harness through ``aha lm-eval``: the same command line as
``lm_eval`` (every flag is passed through), with aha imported first. It also registers the
harness model type ``aha`` -- the harness's ``hf`` model that additionally tracks routing and
prints (and saves next to ``--output_path``) the global fraction of the run.

Needs the optional extra: ``pip install 'aha-attention[eval]'``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, ClassVar

from torch import nn

import aha
from aha.stats import RoutingStats

HARNESS_MODEL_NAME = "aha"
INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'aha-attention[eval]'"


def _require_lm_eval() -> None:
    try:
        import lm_eval
    except ImportError as error:
        raise ImportError(INSTALL_HINT) from error


def register_harness_model() -> type:
    """Register (once) and return the harness model class ``aha`` (``lm_eval --model aha``).

    It is the harness's ``HFLM`` (same ``--model_args``) that accumulates the hard routes of every
    forward pass of the run into :attr:`routing` (an :class:`aha.RoutingStats`; None for a model
    that is not an AHA model).
    """
    _require_lm_eval()
    from lm_eval.api.registry import get_model, register_model
    from lm_eval.models.huggingface import HFLM

    try:
        return get_model(HARNESS_MODEL_NAME)
    except ValueError:
        pass

    @register_model(HARNESS_MODEL_NAME)
    class AhaHarnessLM(HFLM):
        """``HFLM`` that tracks the routing of an AHA model over the whole evaluation."""

        instances: ClassVar[list[AhaHarnessLM]] = []

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("backend", "causal")  # AHA model types are not in the harness's static causal-LM list
            super().__init__(*args, **kwargs)
            self._tracking = ExitStack()
            self.routing: RoutingStats | None = None
            if aha.is_aha_model(self.model):
                self.routing = self._tracking.enter_context(aha.track_routing(self.model))
            AhaHarnessLM.instances.append(self)

        def stop_tracking(self) -> None:
            """Detach the routing tracker from the model (:attr:`routing` keeps its counts)."""
            self._tracking.close()

    return AhaHarnessLM


def evaluate_harness(
    model: nn.Module, tokenizer: Any, tasks: Sequence[str], *, batch_size: int = 1, **simple_evaluate_kwargs: Any
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on an in-memory model; the result has an ``"aha_routing"`` entry.

    Args:
        model: an AHA model (or any causal LM; then ``"aha_routing"`` is None).
        tokenizer: its tokenizer.
        tasks: harness task names (``include_path=`` in ``simple_evaluate_kwargs`` adds local tasks).
        simple_evaluate_kwargs: passed to ``lm_eval.simple_evaluate`` (``limit``, ``num_fewshot``,
            ``include_path`` is turned into a ``task_manager``, ...).

    Returns:
        ``simple_evaluate``'s result dict (``results[task][metric]`` ...) plus ``"aha_routing"``:
        :meth:`aha.RoutingStats.to_dict` of every forward pass the evaluation made.
    """
    _require_lm_eval()
    import lm_eval
    from lm_eval.tasks import TaskManager

    harness_model = register_harness_model()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    include_path = simple_evaluate_kwargs.pop("include_path", None)
    if include_path is not None:
        simple_evaluate_kwargs["task_manager"] = TaskManager(include_path=str(include_path))
    try:
        results = lm_eval.simple_evaluate(model=harness_model, tasks=list(tasks), **simple_evaluate_kwargs)
    finally:
        harness_model.stop_tracking()
    results["aha_routing"] = harness_model.routing.to_dict() if harness_model.routing is not None else None
    return results


def _output_folder(argv: Sequence[str]) -> Path | None:
    for index, arg in enumerate(argv):
        if arg in ("--output_path", "-o") and index + 1 < len(argv):
            return Path(argv[index + 1])
        if arg.startswith("--output_path="):
            return Path(arg.split("=", 1)[1])
    return None


def run_lm_eval_cli(argv: Sequence[str]) -> list[dict[str, Any]]:
    """Run the ``lm_eval`` command line with ``argv`` after importing aha and registering ``--model aha``.

    Returns:
        the routing summary (:meth:`aha.RoutingStats.to_dict`) of each ``--model aha`` model that
        ran (empty for ``--model hf``); also written to ``<output_path>/aha_routing.json`` when
        ``--output_path`` is given.
    """
    harness_model = register_harness_model()
    from lm_eval.__main__ import cli_evaluate

    saved_argv = sys.argv
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved_argv
        for lm in harness_model.instances:
            lm.stop_tracking()
    summaries = [lm.routing.to_dict() for lm in harness_model.instances if lm.routing is not None]
    folder = _output_folder(argv)
    if summaries and folder is not None:
        target = folder if folder.suffix != ".json" else folder.parent
        target.mkdir(parents=True, exist_ok=True)
        (target / "aha_routing.json").write_text(json.dumps(summaries, indent=2))
    return summaries
