"""Evaluation and analysis of AHA models: what routing replaced, what it cost, and where it reaches back.

* :func:`run_evaluation` -- everything below for one model, written to a report folder (``aha eval``);
* :mod:`~aha.evaluation.perplexity` -- held-out perplexity overall and by token position, per routing mode;
* :mod:`~aha.evaluation.passkey` -- passkey retrieval (needle in a haystack) and the routing at the answer;
* :mod:`~aha.evaluation.sweep` -- one routed model per window: the long-tail curve (``aha sweep``);
* :mod:`~aha.evaluation.plots` and :mod:`~aha.evaluation.token_view` -- PNG figures and the HTML token view;
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
from aha.evaluation.plots import (
    WindowPoint,
    plot_global_fraction_vs_position,
    plot_global_fraction_vs_window,
    plot_layer_head_heatmap,
)
from aha.evaluation.routing import (
    MODES,
    RoutingMode,
    capture_routes,
    routing_mode,
)
from aha.evaluation.run import EvalRun, EvalSettings, run_evaluation
from aha.evaluation.tables import passkey_table, perplexity_table, position_table
from aha.evaluation.token_view import write_token_view

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
    "passkey_table",
    "perplexity_table",
    "plot_global_fraction_vs_position",
    "plot_global_fraction_vs_window",
    "plot_layer_head_heatmap",
    "position_table",
    "routing_mode",
    "run_evaluation",
    "write_token_view",
]
