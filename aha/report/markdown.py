"""The demo's report: headline rows, the Markdown ``README.md``, and the sentences both print.

Every number comes from the report dict the demo recipe (:mod:`aha.recipes.demo`) computed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from aha.stats import bootstrap_perplexity_change

REPORT_NAME = "README.md"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def sliding_window_name(window: int, sink: int) -> str:
    """Headline name of the original model run with local attention only."""
    if not sink:
        return f"pure sliding window (w={window}), no training"
    return f"sliding window (w={window}) + {sink} sink key{'s' if sink > 1 else ''}, no training"


def _vs_original(result: dict[str, Any], original: dict[str, Any]) -> tuple[float, float | None, float | None]:
    """Perplexity change of ``result`` against the original model's full attention, with its paired
    bootstrap interval when both scored the same sequences (the demo scores both on the same ones)."""
    change = result["perplexity"] / original["perplexity"] - 1.0
    if result is original or result.get("sequence_ids") != original.get("sequence_ids"):
        return change, None, None
    _, low, high = bootstrap_perplexity_change(result["sequence_nll"], original["sequence_nll"], result["sequence_tokens"])
    return change, low, high


def headline_rows(baseline: dict[str, Any], evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model variant: perplexity, change vs the original (with its 95% interval), routing,
    and passkey accuracy (with its Wilson 95% interval and prompt count)."""
    original = baseline["perplexity"]["modes"]["full"]
    local_routing = baseline["perplexity"]["modes"]["local"]["routing"]
    variants = [
        ("original model (full attention)", baseline, "full"),
        (sliding_window_name(local_routing["window"], local_routing["sink"]), baseline, "local"),
        ("AHA: fine-tuned, learned routes", evaluation, "aha"),
        ("AHA model forced to full attention", evaluation, "full"),
    ]
    rows = []
    for name, source, mode in variants:
        result = source["perplexity"]["modes"][mode]
        change, low, high = _vs_original(result, original)
        row = {
            "variant": name,
            "perplexity": result["perplexity"],
            "vs_original": change,
            "vs_original_low": low,
            "vs_original_high": high,
            "global_fraction": result["routing"]["global_fraction"],
            "operations_replaced": result["routing"]["operations_replaced"],
            "compute_ratio": result["routing"]["compute_ratio"],
        }
        intervals = source["passkey"]["intervals"][mode] if source.get("passkey") else {}
        for key, part in (("passkey", "all"), ("passkey_beyond_window", "needle_beyond_window")):
            found = intervals.get(part) or {}
            row |= {key: found.get("accuracy"), f"{key}_low": found.get("low"), f"{key}_high": found.get("high"),
                    f"{key}_prompts": found.get("prompts")}  # fmt: skip
        rows.append(row)
    return rows


def interval_text(row: dict[str, Any], key: str, *, signed: bool = False) -> str:
    """``row[key]`` as a percentage with its ``[low, high]`` interval (``row[key + "_low"]`` / ``"_high"``)
    and, where the row has one, the number of prompts behind it; "-" when the value is missing."""
    value = row.get(key)
    if value is None:
        return "-"
    spec = "+.1f" if signed else ".1f"
    text = f"{100 * value:{spec}}%"
    low, high = row.get(f"{key}_low"), row.get(f"{key}_high")
    if low is not None and high is not None:
        text += f" [{100 * low:{spec}}, {100 * high:{spec}}]"
    prompts = row.get(f"{key}_prompts")
    return text + (f" (n={prompts})" if prompts else "")


HEADLINE_COLUMNS: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
    ("model", lambda r: r["variant"]),
    ("held-out ppl", lambda r: f"{r['perplexity']:.2f}"),
    ("vs original [95% CI]", lambda r: interval_text(r, "vs_original", signed=True)),
    ("global pairs", lambda r: _pct(r["global_fraction"])),
    ("full-attn ops replaced", lambda r: _pct(r["operations_replaced"])),
    ("attn compute vs full", lambda r: _pct(r["compute_ratio"])),
    ("passkey [95% CI]", lambda r: interval_text(r, "passkey")),
    ("passkey, needle beyond window [95% CI]", lambda r: interval_text(r, "passkey_beyond_window")),
]


def comparison_sentences(evaluation: dict[str, Any]) -> list[str]:
    """The routed model against its own weights forced global, on the same sequences and prompts,
    each difference with its 95% interval (perplexity: paired bootstrap; passkey: Newcombe)."""
    lines = []
    perplexity = (evaluation.get("perplexity") or {}).get("perplexity_vs_full_interval", {}).get("aha")
    if perplexity:
        lines.append(
            f"Held-out perplexity of the learned routes against the same weights forced global: "
            f"{100 * perplexity['change']:+.2f}% [95% CI {100 * perplexity['low']:+.2f}, {100 * perplexity['high']:+.2f}] "
            f"over {perplexity['sequences']} sequences."
        )
    passkey = ((evaluation.get("passkey") or {}).get("vs_full") or {}).get("aha")
    if passkey:
        parts = [
            f"{length} tokens {100 * d['difference']:+.0f} points [{100 * d['low']:+.0f}, {100 * d['high']:+.0f}] (n={d['prompts']})"
            for length, d in passkey["by_context_length"].items()
            if d
        ]
        lines.append("Passkey accuracy of the learned routes minus forced global, on the same prompts: " + "; ".join(parts) + ".")
    return lines


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def speed_sentence(speed: list[dict[str, Any]]) -> str:
    prefill = next(r for r in speed if r["phase"] == "prefill")
    return (
        f"At {prefill['n']} tokens the learned routes send {_pct(prefill['global_fraction'])} of (token, head) pairs to full "
        f"attention; attention inside the model takes {prefill['attention_ms']:.0f} ms with AHA vs "
        f"{prefill['sdpa_attention_ms']:.0f} ms with SDPA causal ({prefill['attention_speedup']:.2f}x faster, ideal "
        f"{prefill['ideal_attention_speedup']:.2f}x); the whole forward pass is {prefill['speedup']:.2f}x faster."
    )


def write_report(report: dict[str, Any], out: Path) -> Path:
    """Write ``README.md`` (the human-readable report) from the demo's JSON."""
    s = report["settings"]
    rows = report["headline"]
    training = report["training"]
    meta = report["meta"]
    commit = f"commit {meta['git_commit'][:12]}{' (uncommitted changes)' if meta['git_dirty'] else ''}" if meta["git_commit"] else "no git checkout"
    lines = [
        f"# AHA demo report: {s['model']}, window {s['window']}",
        "",
        f"Run {meta['date']} on {meta['cpu']} ({meta['isa']}, {meta['threads']} threads), {commit}, "
        f"torch {meta['torch']}, transformers {meta['transformers']}, aha {meta['aha']}; total {report['seconds'] / 60:.1f} min."
        + (" **Quick smoke run: numbers are not meaningful.**" if s["quick"] else ""),
        "",
        "## Headline",
        "",
        markdown_table(
            [header for header, _ in HEADLINE_COLUMNS],
            [[cell(r) for _, cell in HEADLINE_COLUMNS] for r in rows],
        ),
        "",
        *comparison_sentences(report["evaluation"]),
        "",
        f"Held-out perplexity on {report['evaluation']['perplexity']['sequences']} held-out sequences of "
        f"{s['seq_len']} tokens (documents never seen in training). *Global pairs*: share of (token, head) decisions "
        "routed to full attention; *full-attention ops replaced* is the paper's figure (1 - global); *attn compute* counts "
        "attention score entries computed relative to full causal attention. Passkey: exact-match retrieval of a 5-digit "
        f"key hidden in Paul Graham essays at {', '.join(map(str, s['passkey_lengths']))} tokens, depths "
        f"{', '.join(map(str, s['passkey_depths']))}, {s['passkey_offsets']} haystack offset(s) each, the same prompts for every "
        "model. Intervals are 95%: vs original, a paired bootstrap over the held-out sequences; passkey, Wilson's interval "
        "over n prompts.",
        "",
        "## Speed",
        "",
        speed_sentence(report["speed"]),
        "",
        markdown_table(
            ["phase", "n", "global", "attn ms", "SDPA attn ms", "attn speedup", "ideal", "model ms", "SDPA model ms", "e2e speedup"],
            [
                [
                    r["phase"], str(r["n"]), _pct(r["global_fraction"]), f"{r['attention_ms']:.1f}", f"{r['sdpa_attention_ms']:.1f}",
                    f"{r['attention_speedup']:.2f}x", f"{r['ideal_attention_speedup']:.2f}x", f"{r['ms']:.1f}", f"{r['sdpa_ms']:.1f}",
                    f"{r['speedup']:.2f}x",
                ]
                for r in report["speed"]
            ],
        ),
        "",
        "Decode: one token on a cache of n tokens. Kernel-level numbers: `aha bench` (see benchmarks/RESULTS.md).",
        "",
        "## Training",
        "",
        f"{training['steps']} steps of {s['seq_len']} tokens (window {s['window']}, sink keys {s['sink']}, target global fraction "
        f"{s['target_global']}, distillation weight {s['distill']}, {_pct(s['passkey_mix'])} of the sequences passkey "
        "prompts with a haystack from the training corpora, never the essays); achieved global fraction on the last training batches: "
        f"{_pct(training['achieved_global_fraction_train'])}, final lambda {training['final_lambda']:.3g}.",
        "",
        "![training](training.png)",
        "",
        "This is a short CPU fine-tune sized to fit the demo's time budget. Longer training (`aha demo --steps 1000`, or "
        "`aha train` with a longer sequence) or a GPU gives better routing: a lower global fraction at the same perplexity.",
        "",
        "## Where the model attends globally",
        "",
        "![layer x head](eval/routing_layer_head.png)",
        "",
        "![position](eval/routing_position.png)",
        "",
    ]
    if "passkey_answer_layer_head" in report["evaluation"]["files"]:
        lines += ["At the passkey answer steps (the retrieval point):", "", "![answer steps](eval/passkey_answer_layer_head.png)", ""]
    lines += [
        "Token view (open in a browser): [eval/token_view.html](eval/token_view.html), each token shaded by how many heads "
        "routed it to full attention, per layer.",
        "",
        "Everything above is computed by this run; the raw numbers, with the commit, command and machine in `meta`, are in "
        "`demo.json` and `eval/eval.json`.",
        "",
    ]
    path = out / REPORT_NAME
    path.write_text("\n".join(lines))
    return path
