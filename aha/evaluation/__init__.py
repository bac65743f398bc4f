"""Evaluation and analysis of AHA models: what routing replaced, what it cost, and where it reaches back.

* :func:`run_evaluation` -- everything below for one model, written to a report folder (``aha eval``);
* :mod:`~aha.evaluation.perplexity` -- held-out perplexity overall and by token position, per routing mode;
* :mod:`~aha.evaluation.passkey` -- passkey retrieval (needle in a haystack) and the routing at the answer;
* :mod:`~aha.evaluation.sweep` -- the long-tail curve's points: one trained model per window (the
  training is :mod:`aha.recipes.sweep`, ``aha sweep``);
* the figures, the HTML token view and the tables are written by :mod:`aha.report`;
* :mod:`~aha.evaluation.harness` -- lm-evaluation-harness with routing active (``aha lm-eval``).

Every evaluation compares three routing modes (:data:`MODES`): ``"full"`` (all pairs global),
``"local"`` (all pairs local, pure sliding window at the model's window) and ``"aha"`` (learned routes).
"""

from aha.data.passkey import PasskeyPromptBuilder
from aha.evaluation.passkey import (
    PasskeyResult,
    PasskeyTrial,
    evaluate_passkey,
)
from aha.evaluation.perplexity import (
    PerplexityReport,
    PerplexityResult,
    compare_routing_modes,
    evaluate_perplexity,
)
from aha.evaluation.routing import (
    MODES,
    RoutingMode,
    capture_routes,
    routing_mode,
)
from aha.evaluation.run import EvalRun, EvalSettings, run_evaluation
from aha.report.plots import (
    WindowPoint,
    plot_global_fraction_vs_position,
    plot_global_fraction_vs_window,
    plot_layer_head_heatmap,
)
from aha.report.token_view import write_token_view

__all__ = [
    "MODES",
    "EvalRun",
    "EvalSettings",
    "PasskeyPromptBuilder",
    "PasskeyResult",
    "PasskeyTrial",
    "PerplexityReport",
    "PerplexityResult",
    "RoutingMode",
    "WindowPoint",
    "capture_routes",
    "compare_routing_modes",
    "evaluate_passkey",
    "evaluate_perplexity",
    "plot_global_fraction_vs_position",
    "plot_global_fraction_vs_window",
    "plot_layer_head_heatmap",
    "routing_mode",
    "run_evaluation",
    "write_token_view",
]
