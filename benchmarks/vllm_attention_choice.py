"""Which routed attention the vLLM plugin runs on CPU: the three candidates, timed on one layer.

Run in .venv-vllm (``make vllm-venv``), one thread, as vLLM runs its model on a 2-core machine:

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/vllm_attention_choice.py --out benchmarks/results/vllm-attention-choice.json

Candidates, each writing the step's new keys/values into its cache and attending (SmolLM2's layer
shape: 9 query heads, 3 KV heads, head_dim 64, fp32):

* ``stock``: vLLM's CPU attention op on its own paged cache (dense causal): the baseline;
* ``two_call``: that op twice, full and windowed (``sliding_window=w``, which skips out-of-window
  keys), merged per (token, head) by the route: exact only for ``sink = 0`` (the op has no sink
  mask and returns no log-sum-exp to merge a sink call with);
* ``aha``: the plugin's :class:`~aha.integrations.vllm.attention.AhaAttentionImpl`: one
  :func:`aha.aha_attention` (the C++ kernel, sink supported) per request on the plugin's
  one-block-per-request cache.

Routes: each (token, head) global with probability ``--global-fraction`` (i.i.d.: the hard case
under grouped-query attention). Rounds alternate the candidates' order; the report gives every
round's time and the median per candidate, with the machine's load average.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch

HEADS, KV_HEADS, DIM = 9, 3, 64
STOCK_BLOCK = 128


def _stock_setup(ops, lengths: list[int], queries: list[int], scale: float):
    """vLLM's paged cache holding every request's keys, and a callable running the op on the new queries."""
    blocks_per = [-(-n // STOCK_BLOCK) for n in lengths]
    cache = torch.zeros(sum(blocks_per), KV_HEADS, STOCK_BLOCK * 2, DIM)
    key_cache, value_cache = cache.chunk(2, dim=2)
    table = torch.zeros(len(lengths), max(blocks_per), dtype=torch.int32)
    first = 0
    for i, n in enumerate(blocks_per):
        table[i, :n] = torch.arange(first, first + n)
        first += n
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    starts = torch.tensor([0, *torch.tensor(queries).cumsum(0).tolist()], dtype=torch.int32)
    slots = torch.cat([
        table[i, torch.arange(lengths[i] - q, lengths[i]) // STOCK_BLOCK] * STOCK_BLOCK + torch.arange(lengths[i] - q, lengths[i]) % STOCK_BLOCK
        for i, q in enumerate(queries)
    ]).long()  # fmt: skip
    # the cached prefix (keys before the new queries) is written once, outside the timing
    for i, n in enumerate(lengths):
        positions = torch.arange(n - queries[i])
        prefix_slots = (table[i, positions // STOCK_BLOCK] * STOCK_BLOCK + positions % STOCK_BLOCK).long()
        ops.cpu_attn_reshape_and_cache(torch.randn(len(positions), KV_HEADS, DIM), torch.randn(len(positions), KV_HEADS, DIM), key_cache, value_cache, prefix_slots, "vec")

    def metadata(window_size: int):
        return ops.cpu_attn_get_scheduler_metadata(
            len(lengths), HEADS, KV_HEADS, DIM, seq_lens, torch.float32, starts, True, window_size, "vec", True
        )

    def attend(q, out, window_size: int, sched) -> None:
        ops.cpu_attention_with_kv_cache(q, key_cache, value_cache, out, starts, seq_lens, scale, True, None, window_size, table, 0.0, sched, None)

    def write(k, v) -> None:
        ops.cpu_attn_reshape_and_cache(k, v, key_cache, value_cache, slots, "vec")

    return metadata, attend, write


def _time_case(ops, lengths: list[int], queries: list[int], window: int, global_fraction: float, rounds: int, scale: float) -> dict:
    """Every candidate on requests of ``lengths`` keys whose last ``queries`` are new, rounds alternating order."""
    from aha.integrations.vllm.attention import AhaAttentionImpl, AhaAttentionMetadata

    tokens = sum(queries)
    q = torch.randn(tokens, HEADS, DIM)
    k, v = torch.randn(tokens, KV_HEADS, DIM), torch.randn(tokens, KV_HEADS, DIM)
    route = torch.rand(tokens, HEADS) < global_fraction
    metadata, attend, write = _stock_setup(ops, lengths, queries, scale)
    block = max(lengths)
    aha_cache = torch.randn(len(lengths), KV_HEADS, block, 2 * DIM)
    first = [0, *torch.tensor(queries).cumsum(0).tolist()]
    requests = [(first[i], first[i + 1], lengths[i], i) for i in range(len(lengths))]
    slots = torch.cat([i * block + torch.arange(lengths[i] - n, lengths[i]) for i, n in enumerate(queries)])
    aha_meta = AhaAttentionMetadata(tokens, requests, slots)

    def stock() -> None:
        write(k, v)
        attend(q, torch.empty_like(q), -1, metadata(-1))

    def two_call() -> None:
        full, local = torch.empty_like(q), torch.empty_like(q)
        write(k, v)
        attend(q, full, -1, metadata(-1))
        attend(q, local, window, metadata(window))
        torch.where(route[..., None], full, local)

    def aha(sink: int):
        impl = AhaAttentionImpl(HEADS, DIM, scale, KV_HEADS, None, None, "auto", window=window, sink=sink)
        return lambda: impl.routed_forward(q, k, v, route, aha_cache, aha_meta, torch.empty_like(q))

    candidates = {"stock": stock, "two_call (sink 0)": two_call, "aha (sink 0)": aha(0), "aha (sink 1)": aha(1)}
    for run in candidates.values():  # warm-up: first calls build kernels and scratch
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    order = list(candidates)
    for round_index in range(rounds):
        for name in order if round_index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            candidates[name]()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return {
        "global_pairs": route.float().mean().item(),
        # (token, KV head) pairs with at least one global query head: under GQA the KV head is then read whole
        "open_kv_groups": route.view(tokens, KV_HEADS, HEADS // KV_HEADS).any(-1).float().mean().item(),
        "seconds": times,
        "median_seconds": medians,
        "speedup_vs_stock": {name: medians["stock"] / m for name, m in medians.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--window", type=int, default=128)
    parser.add_argument("--global-fraction", type=float, default=0.15)
    parser.add_argument("--prefill", type=int, default=2048, help="prompt tokens of the prefill case (batch 1)")
    parser.add_argument("--context", type=int, default=2048, help="cached tokens of each request in the decode case")
    parser.add_argument("--batch", type=int, default=8, help="requests of the decode case")
    args = parser.parse_args()

    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    current_platform.import_kernels()

    torch.manual_seed(0)
    scale = DIM**-0.5
    cases = {
        f"prefill 1x{args.prefill}": ([args.prefill], [args.prefill]),
        f"decode {args.batch}x{args.context}": ([args.context] * args.batch, [1] * args.batch),
    }
    results = {}
    for case, (lengths, queries) in cases.items():
        results[case] = _time_case(ops, lengths, queries, args.window, args.global_fraction, args.rounds, scale)
        print(case, {name: f"{m * 1e3:.2f} ms" for name, m in results[case]["median_seconds"].items()})

    import vllm

    from aha.report.provenance import run_meta, write_json_report

    report = {
        "meta": {
            **run_meta(),
            "what": "one attention layer (9 q heads, 3 KV heads, head_dim 64, fp32): cache write + attention",
            "vllm": vllm.__version__,
            "load_average": os.getloadavg(),
            "window": args.window,
            "global_fraction": args.global_fraction,
            "rounds": args.rounds,
        },
        "cases": results,
    }
    write_json_report(args.out, report)


if __name__ == "__main__":
    main()
