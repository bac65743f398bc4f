"""The demo's report: headline rows, the Markdown ``README.md``, and the sentences both print.

Every number comes from the report dict the demo recipe (:mod:`aha.recipes.demo`) computed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

REPORT_NAME = "README.md"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def sliding_window_name(window: int, sink: int) -> str:
    """Headline name of the original model run with local attention only."""
    if not sink:
        return f"pure sliding window (w={window}), no training"
    return f"sliding window (w={window}) + {sink} sink key{'s' if sink > 1 else ''}, no training"


def headline_rows(baseline: dict[str, Any], evaluation: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model variant: perplexity, change vs the original, routing and passkey accuracy."""
    original_ppl = baseline["perplexity"]["modes"]["full"]["perplexity"]
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
        accuracy = source["passkey"]["accuracy"][mode] if source.get("passkey") else {}
        rows.append(
            {
                "variant": name,
                "perplexity": result["perplexity"],
                "vs_original": result["perplexity"] / original_ppl - 1.0,
                "global_fraction": result["routing"]["global_fraction"],
                "operations_replaced": result["routing"]["operations_replaced"],
                "compute_ratio": result["routing"]["compute_ratio"],
                "passkey": accuracy.get("all"),
                "passkey_beyond_window": accuracy.get("needle_beyond_window"),
            }
        )
    return rows


HEADLINE_COLUMNS = [
    ("variant", "model", str),
    ("perplexity", "held-out ppl", lambda x: f"{x:.2f}"),
    ("vs_original", "vs original", lambda x: f"{100 * x:+.1f}%"),
    ("global_fraction", "global pairs", _pct),
    ("operations_replaced", "full-attn ops replaced", _pct),
    ("compute_ratio", "attn compute vs full", _pct),
    ("passkey", "passkey", _pct),
    ("passkey_beyond_window", "passkey, needle beyond window", _pct),
]


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
    lines = [
        f"# AHA demo report: {s['model']}, window {s['window']}",
        "",
        f"Run {report['created']} on {report['machine']['cpu']} ({report['machine']['threads']} threads), "
        f"torch {report['machine']['torch']}, aha {report['machine']['aha']}; total {report['seconds'] / 60:.1f} min."
        + (" **Quick smoke run: numbers are not meaningful.**" if s["quick"] else ""),
        "",
        "## Headline",
        "",
        markdown_table(
            [header for _, header, _ in HEADLINE_COLUMNS],
            [[fmt(r[key]) if r[key] is not None else "-" for key, _, fmt in HEADLINE_COLUMNS] for r in rows],
        ),
        "",
        f"Held-out perplexity on {report['evaluation']['perplexity']['sequences']} held-out sequences of "
        f"{s['seq_len']} tokens (documents never seen in training). *Global pairs*: share of (token, head) decisions "
        "routed to full attention; *full-attention ops replaced* is the paper's figure (1 - global); *attn compute* counts "
        "attention score entries computed relative to full causal attention. Passkey: exact-match retrieval of a 5-digit "
        f"key hidden in Paul Graham essays at {', '.join(map(str, s['passkey_lengths']))} tokens, depths "
        f"{', '.join(map(str, s['passkey_depths']))}.",
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
        "Everything above is computed by this run; the raw numbers are in `demo.json` and `eval/eval.json`.",
        "",
    ]
    path = out / REPORT_NAME
    path.write_text("\n".join(lines))
    return path
