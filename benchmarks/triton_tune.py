"""Sweep the launch configuration of ``impl="triton"`` (aha.kernels.triton.prefill) on a CUDA GPU.

bf16, B=1, 8 heads, head_dim 64, w=256, rho=0.07 at n = 16384 and 65536, against SDPA causal in
the same process, timed with ``triton.testing.do_bench`` (median). Stage 1 sweeps tile sizes and
warps at the default splitting; stage 2 sweeps the splits per tile and the split tiles per head
at the best tiles. Each configuration is checked
against flex before it is timed. Writes ``triton-tune.json`` into the output folder.

Usage: python3 benchmarks/triton_tune.py [OUT_DIR]
"""

import itertools
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from aha import aha_attention
from aha.kernels.triton import prefill as triton_prefill

WINDOW, RHO, SEQ_LENS = 256, 0.07, (16384, 65536)
SPLITTING = {"NUM_SPLITS": 8, "SPLIT_TILES": 16}


def inputs(n: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 8, n, 64, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3))
    return q, k, v, torch.rand(1, 8, n, device="cuda", generator=gen) < RHO


def time_config(config: dict[str, int], cases: dict[int, tuple[torch.Tensor, ...]], sdpa_ms: dict[int, float]) -> dict:
    for name, value in config.items():
        setattr(triton_prefill, name, value)
    row: dict = dict(config)
    try:
        for n, (q, k, v, route, expected) in cases.items():
            out = aha_attention(q, k, v, route, WINDOW, impl="triton")
            row[f"max_error_{n}"] = float((out.float() - expected.float()).abs().max())
            ms = do_bench(lambda: aha_attention(q, k, v, route, WINDOW, impl="triton"), return_mode="median")
            row[f"ms_{n}"] = ms
            row[f"speedup_{n}"] = sdpa_ms[n] / ms
    except Exception as exc:  # noqa: BLE001 -- e.g. out of shared memory: record and go on
        row["error"] = repr(exc)[:300]
    print(json.dumps(row), flush=True)
    return row


def best_tiles(row: dict) -> dict[str, int]:
    return {name: row[name] for name in ("BLOCK_M", "BLOCK_N", "NUM_WARPS", "NUM_STAGES")}


def main() -> None:
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results")
    out_dir.mkdir(parents=True, exist_ok=True)
    cases, sdpa_ms = {}, {}
    with torch.no_grad():
        for n in SEQ_LENS:
            q, k, v, route = inputs(n)
            expected = aha_attention(q, k, v, route, WINDOW, impl="flex")
            cases[n] = (q, k, v, route, expected)
            sdpa_ms[n] = do_bench(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True), return_mode="median")
        print(json.dumps({"sdpa_ms": sdpa_ms}), flush=True)
        rows = []
        for block_m, block_n, warps in itertools.product((64, 128), (32, 64, 128), (4, 8)):
            config = {"BLOCK_M": block_m, "BLOCK_N": block_n, "NUM_WARPS": warps, "NUM_STAGES": 3, **SPLITTING}
            rows.append(time_config(config, cases, sdpa_ms))
        timed = [row for row in rows if "error" not in row]
        best = min(timed, key=lambda row: row[f"ms_{SEQ_LENS[-1]}"])
        for splits, split_tiles in itertools.product((4, 8, 16, 32), (8, 16, 32)):
            splitting = {"NUM_SPLITS": splits, "SPLIT_TILES": split_tiles}
            if splitting != SPLITTING:
                rows.append(time_config({**best_tiles(best), **splitting}, cases, sdpa_ms))
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "sdpa_ms": sdpa_ms, "rows": rows}
    (out_dir / "triton-tune.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
