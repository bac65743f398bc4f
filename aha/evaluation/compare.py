"""Two evaluations of different models on the same held-out sequences and passkey prompts, compared
with intervals (``aha report compare``): what a fine-tune comparison publishes.

``aha eval`` scores one model in several routing modes; a claim such as "the routed fine-tune is
within 2% of the un-routed fine-tune" compares two models, so it compares two ``eval.json``
reports. Both must have scored the same sequences (checked by their content hashes) and, for
passkey, the same prompts (the same grid and seed); the differences are paired over them:
perplexity by a paired bootstrap over sequences, passkey accuracy by Newcombe's interval.
"""

from __future__ import annotations

from typing import Any

from aha.evaluation.passkey import CONFIDENCE
from aha.evaluation.perplexity import BOOTSTRAP_RESAMPLES
from aha.stats import bootstrap_perplexity_change, paired_difference_interval

SCHEMA = "aha-compare/1"


def _perplexity(report: dict[str, Any], mode: str, name: str) -> dict[str, Any]:
    modes = (report.get("perplexity") or {}).get("modes", {})
    if mode not in modes:
        raise ValueError(f"the {name} report has no perplexity in mode {mode!r} (it has {sorted(modes) or 'none'}); "
                         f"run aha eval with --tasks perplexity --modes {mode}")  # fmt: skip
    if "sequence_nll" not in modes[mode]:
        raise ValueError(f"the {name} report predates per-sequence results; evaluate its model again with aha eval")
    return modes[mode]


def _passkey_outcomes(report: dict[str, Any], mode: str) -> dict[tuple[Any, ...], tuple[int, bool]]:
    """``(length, depth, offset, passkey) -> (length, correct)`` of ``mode``'s passkey trials."""
    trials = (report.get("passkey") or {}).get("trials", [])
    return {
        (t["context_length"], t["depth"], t.get("offset"), t["passkey"]): (t["context_length"], t["correct"])
        for t in trials
        if t["mode"] == mode
    }


def _passkey_difference(first: list[bool], second: list[bool]) -> dict[str, Any]:
    difference, low, high = paired_difference_interval(first, second, CONFIDENCE)
    return {"difference": difference, "low": low, "high": high, "prompts": len(first),
            "accuracy": sum(first) / len(first), "reference_accuracy": sum(second) / len(second)}  # fmt: skip


def compare_evaluations(
    report: dict[str, Any], reference: dict[str, Any], *, mode: str = "aha", reference_mode: str = "full"
) -> dict[str, Any]:
    """``report``'s model in ``mode`` against ``reference``'s model in ``reference_mode`` (two ``eval.json`` dicts).

    Returns:
        ``{"perplexity": {"value", "reference", "change", "low", "high", "sequences", ...} | None,
        "passkey": {"all": difference, "by_context_length": {length: difference}} | None}``, where a
        difference is ``{"difference", "low", "high", "prompts", "accuracy", "reference_accuracy"}``
        (accuracy of ``report`` minus ``reference``'s on the prompts both answered).

    Raises:
        ValueError: the reports scored different sequences, or neither task can be compared.
    """
    result: dict[str, Any] = {"confidence": CONFIDENCE, "perplexity": None, "passkey": None}
    if report.get("perplexity") and reference.get("perplexity"):
        ours, theirs = _perplexity(report, mode, "first"), _perplexity(reference, reference_mode, "reference")
        if ours["sequence_ids"] != theirs["sequence_ids"]:
            raise ValueError("the two reports scored different held-out sequences: evaluate both models with the same "
                             "--data, --heldout-fraction, --seq-len and --max-sequences")  # fmt: skip
        change, low, high = bootstrap_perplexity_change(
            ours["sequence_nll"], theirs["sequence_nll"], ours["sequence_tokens"], confidence=CONFIDENCE, resamples=BOOTSTRAP_RESAMPLES
        )
        result["perplexity"] = {
            "value": ours["perplexity"], "reference": theirs["perplexity"], "change": change, "low": low, "high": high,
            "sequences": len(ours["sequence_ids"]), "global_fraction": ours["routing"]["global_fraction"],
            "reference_global_fraction": theirs["routing"]["global_fraction"],
            "method": f"paired bootstrap over sequences, {BOOTSTRAP_RESAMPLES} resamples, seed 0",
        }  # fmt: skip
    ours_pk, theirs_pk = _passkey_outcomes(report, mode), _passkey_outcomes(reference, reference_mode)
    common = sorted(ours_pk.keys() & theirs_pk.keys(), key=str)
    if common:
        lengths = sorted({ours_pk[key][0] for key in common})
        result["passkey"] = {
            "all": _passkey_difference([ours_pk[k][1] for k in common], [theirs_pk[k][1] for k in common]),
            "by_context_length": {
                str(n): _passkey_difference([ours_pk[k][1] for k in common if k[0] == n], [theirs_pk[k][1] for k in common if k[0] == n])
                for n in lengths
            },
            "method": "Newcombe's paired interval (method 10) over the prompts both reports answered",
        }
    if result["perplexity"] is None and result["passkey"] is None:
        raise ValueError(f"nothing to compare: the reports share neither perplexity results nor passkey prompts in modes "
                         f"{mode!r} / {reference_mode!r}")  # fmt: skip
    return result
