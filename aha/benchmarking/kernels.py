"""The ``kernels`` benchmark group: AHA attention against SDPA causal, measured in the same run.

Sections (``BenchConfig.parts``):

* ``prefill`` -- forward over n queries with i.i.d. Bernoulli(rho) routes;
* ``train`` -- forward + backward (gradients of q, k, v) with hard routes;
* ``decode`` -- one query per head and sequence against a cache of n keys, timed against its
  memory roofline (the K/V bytes it must read over the read bandwidth measured in the same run)
  and against the same call with every head global;
* ``memory`` -- extra peak memory of one prefill forward, AHA vs SDPA: resident memory of a
  fresh process each on CPU, allocated device memory on CUDA (AHA must not materialise anything
  of size n x n).

Each row carries the measured cost ratio AHA / SDPA (median of per-round ratios) beside the
ideal ``rho + (1 - rho) * 2w/n`` (:func:`aha.stats.ideal_cost_ratio`), and both as speedups.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from aha.benchmarking import BenchConfig, Column, Section, register_group
from aha.benchmarking.timing import Samples, measure_round_robin, median_ratio
from aha.kernels import aha_attention, choose_impl
from aha.kernels.cpu_tuning import kernel_choice, microkernel_name
from aha.stats import ideal_cost_ratio

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_RATIO_COLUMNS = [
    Column("cost_ratio", "AHA/SDPA", ".3f"),
    Column("ideal_cost_ratio", "ideal", ".3f"),
    Column("speedup", "speedup", ".2f"),
    Column("ideal_speedup", "ideal speedup", ".2f"),
    Column("noise", "noise", ".2f"),
]


def _device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _qkv(cfg: BenchConfig, seq_q: int, seq_kv: int, dtype: torch.dtype, grad: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    device = _device()
    q = torch.randn(cfg.batch, cfg.heads, seq_q, cfg.head_dim, dtype=dtype, device=device, requires_grad=grad)
    k = torch.randn(cfg.batch, cfg.kv_heads, seq_kv, cfg.head_dim, dtype=dtype, device=device, requires_grad=grad)
    v = torch.randn(cfg.batch, cfg.kv_heads, seq_kv, cfg.head_dim, dtype=dtype, device=device, requires_grad=grad)
    return q, k, v


def _route(cfg: BenchConfig, seq: int, rho: float, generator: torch.Generator) -> Tensor:
    return (torch.rand(cfg.batch, cfg.heads, seq, generator=generator) < rho).to(_device())


def _sdpa(q: Tensor, k: Tensor, v: Tensor, causal: bool = True) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def _synced(fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        fn()
        _synchronize()

    return call


def _noise(samples: Samples) -> float:
    return max(samples.noise)


def _ratio_fields(samples: Samples, baseline: Samples, ideal: float) -> dict[str, Any]:
    ratio = median_ratio(samples, baseline)
    return {
        "ms": samples.median * 1e3,
        "sdpa_ms": baseline.median * 1e3,
        "cost_ratio": ratio,
        "ideal_cost_ratio": ideal,
        "speedup": 1.0 / ratio,
        "ideal_speedup": 1.0 / ideal,
        "noise": max(_noise(samples), _noise(baseline)),
    }


def _routed_rows(cfg: BenchConfig, bench: str, seq_lens: list[int], rhos: list[float], grad: bool) -> list[dict[str, Any]]:
    """Prefill (grad=False) or forward+backward (grad=True) rows, one round-robin per (dtype, n)."""
    rows = []
    generator = torch.Generator().manual_seed(cfg.seed)
    for dtype_name in cfg.dtypes:
        dtype = DTYPES[dtype_name]
        for n in seq_lens:
            q, k, v = _qkv(cfg, n, n, dtype, grad)
            grad_out = torch.randn_like(q)
            routes = {rho: _route(cfg, n, rho, generator) for rho in rhos}

            def timed(attend: Callable[[], Tensor]) -> Callable[[], None]:
                if not grad:
                    return _synced(attend)
                return _synced(lambda: torch.autograd.grad(attend(), (q, k, v), grad_out))

            candidates: dict[str, Callable[[], None]] = {"sdpa": timed(lambda: _sdpa(q, k, v))}
            cases = []
            for window in cfg.windows:
                for rho in rhos:
                    for impl in cfg.impls:
                        route = routes[rho]
                        name = f"{impl} w={window} rho={rho}"
                        candidates[name] = timed(
                            lambda route=route, window=window, impl=impl: aha_attention(
                                q, k, v, route, window, impl=impl, sink=cfg.sink
                            )
                        )
                        cases.append((name, window, rho, impl))
            with torch.set_grad_enabled(grad):
                samples = measure_round_robin(candidates, cfg.timing)
                used = {(rho, window): choose_impl(q, k, routes[rho], window) for rho in rhos for window in cfg.windows}
            for name, window, rho, impl in cases:
                ran = used[rho, window] if impl == "auto" else impl
                fraction = float(routes[rho].float().mean())
                rows.append(
                    {
                        "bench": bench,
                        "n": n,
                        "rho": rho,
                        "global_fraction": fraction,
                        "window": window,
                        "sink": cfg.sink,
                        "dtype": dtype_name,
                        "impl": ran,
                        "microkernel": kernel_label(ran, dtype),
                        **_ratio_fields(samples[name], samples["sdpa"], ideal_cost_ratio(fraction, window + cfg.sink, n)),
                    }
                )
    return rows


def kernel_label(impl: str, dtype: torch.dtype, decode: bool = False) -> str:
    """What an implementation ran for ``dtype``: the C++ kernel's microkernel (e.g. ``onednn-amx-bf16``,
    ``avx512-fp32 decode`` for its one-query path, which runs on the vector units), else ``-``."""
    name, _, forced = impl.partition(":")
    if name == "cpp" and decode:
        return f"{microkernel_name(dtype, 'vector')} decode"
    if name == "cpp":
        return microkernel_name(dtype, forced or kernel_choice(dtype).microkernel) or "-"
    return "-"


def _shape(cfg: BenchConfig) -> str:
    """The kernel shapes of a section title (and the sink, when there is one)."""
    shape = f"B={cfg.batch} H={cfg.heads}/{cfg.kv_heads} D={cfg.head_dim}"
    return f"{shape}, sink {cfg.sink}" if cfg.sink else shape


_ROUTED_COLUMNS = [
    Column("n", "n"), Column("rho", "rho"), Column("window", "w"), Column("dtype", "dtype"),
    Column("impl", "impl"), Column("microkernel", "microkernel"), Column("ms", "AHA ms", ".1f"),
    Column("sdpa_ms", "SDPA ms", ".1f"), *_RATIO_COLUMNS,
]  # fmt: skip


def prefill_section(cfg: BenchConfig) -> Section:
    """Forward time of AHA attention vs SDPA causal over the (dtype, n, window, rho) sweep."""
    return Section(
        name="prefill",
        title=f"prefill forward, {_shape(cfg)}",
        columns=_ROUTED_COLUMNS,
        rows=_routed_rows(cfg, "prefill", cfg.seq_lens, cfg.rhos, grad=False),
        notes=[
            "AHA/SDPA: median over rounds of the per-round time ratio; ideal = rho + (1-rho)*2w/n;",
            "noise: most CPU cores other processes used during a sample of that row.",
        ],
    )


def train_section(cfg: BenchConfig) -> Section:
    """Forward + backward (q, k, v gradients, hard routes) vs SDPA causal forward + backward."""
    return Section(
        name="train",
        title=f"forward+backward, {_shape(cfg)}",
        columns=_ROUTED_COLUMNS,
        rows=_routed_rows(cfg, "train", cfg.train_seq_lens, cfg.train_rhos, grad=True),
        notes=["Hard (bool) routes: training with the STE gate adds a no-grad full + local pass for d out/d g."],
    )


def read_bandwidth(cfg: BenchConfig) -> float:
    """Streaming read bandwidth here (bytes/s): the median time to sum a 512 MiB fp32 tensor (well
    past any L3) with the run's threads, the denominator of the decode roofline."""
    values = torch.ones(2**27, device=_device())
    samples = measure_round_robin({"read": _synced(lambda: values.sum())}, cfg.timing)["read"]
    return values.numel() * values.element_size() / samples.median


def _decode_route(batch: int, heads: int, rho: float, generator: torch.Generator) -> Tensor:
    """``[batch, heads, 1]``: ``round(rho * batch * heads)`` (at least one, for rho > 0) rows global, chosen at random."""
    rows = batch * heads
    count = rows if rho >= 1 else max(1 if rho > 0 else 0, round(rho * rows))
    route = torch.zeros(rows, dtype=torch.bool)
    route[torch.randperm(rows, generator=generator)[:count]] = True
    return route.view(batch, heads, 1).to(_device())


def decode_key_reads(route: Tensor, kv_heads: int, n: int, local_keys: int) -> tuple[int, int]:
    """Keys one decode step reads, summed over (batch, head): ``(per KV head, per query head)``.

    Per KV head is what the step must read: the whole cache where one of its query heads is global,
    the window (and sink) otherwise. Per query head is what a kernel reads that serves each query
    head on its own: a KV head's prefix once per global query head of its group (GQA).
    """
    local_keys = min(n, local_keys)
    per_query = route[..., 0].long()
    per_kv = per_query.view(per_query.shape[0], kv_heads, -1).amax(-1)
    reads = [int(g.sum()) * n + int((1 - g).sum()) * local_keys for g in (per_kv, per_query)]
    return reads[0], reads[1]


def decode_section(cfg: BenchConfig) -> Section:
    """One decode step (one query per head, ``decode_batch`` sequences) against its memory roofline.

    The roofline is the K/V bytes the step must read (per KV head, see :func:`decode_key_reads`)
    over the streaming read bandwidth measured in the same run. The routed step is also timed
    against the same call with every head global, and SDPA over all heads is shown for scale.
    """
    rows = []
    window = cfg.windows[0]
    bandwidth = read_bandwidth(cfg)
    generator = torch.Generator().manual_seed(cfg.seed)
    for shape in cfg.decode_head_shapes:
        heads, kv_heads = map(int, shape.split("/"))
        shape_cfg = replace(cfg, batch=cfg.decode_batch, heads=heads, kv_heads=kv_heads)
        for dtype_name in cfg.dtypes:
            dtype = DTYPES[dtype_name]
            for n in cfg.decode_lens:
                q, k, v = _qkv(shape_cfg, 1, n, dtype)
                routes = {rho: _decode_route(cfg.decode_batch, heads, rho, generator) for rho in {*cfg.decode_rhos, 1.0}}
                candidates = {
                    f"aha rho={rho}": _synced(lambda route=route: aha_attention(q, k, v, route, window, sink=cfg.sink))
                    for rho, route in routes.items()
                }
                candidates["sdpa"] = _synced(lambda: _sdpa(q, k, v, causal=False))
                with torch.no_grad():
                    samples = measure_round_robin(candidates, cfg.timing)
                row_bytes = 2 * cfg.head_dim * dtype.itemsize  # one key and its value
                must_all, _ = decode_key_reads(routes[1.0], kv_heads, n, window + cfg.sink)
                impl = choose_impl(q, k, routes[1.0], window)
                for rho in cfg.decode_rhos:
                    must, per_query = decode_key_reads(routes[rho], kv_heads, n, window + cfg.sink)
                    aha = samples[f"aha rho={rho}"]
                    roofline_s = must * row_bytes / bandwidth
                    vs_all_global = median_ratio(aha, samples["aha rho=1.0"])
                    rows.append(
                        {
                            "bench": "decode",
                            "n": n,
                            "heads": f"{heads}/{kv_heads}",
                            "batch": cfg.decode_batch,
                            "rho": rho,
                            "global_fraction": float(routes[rho].float().mean()),
                            "window": window,
                            "sink": cfg.sink,
                            "dtype": dtype_name,
                            "impl": impl,
                            "microkernel": kernel_label(impl, dtype, decode=True),
                            "us": aha.median * 1e6,
                            "roofline_us": roofline_s * 1e6,
                            "vs_roofline": aha.median / roofline_s,
                            "must_read_mib": must * row_bytes / 2**20,
                            "kernel_read_mib": per_query * row_bytes / 2**20,
                            "all_global_us": samples["aha rho=1.0"].median * 1e6,
                            "vs_all_global": vs_all_global,
                            "ideal_vs_all_global": must / must_all,
                            "sdpa_us": samples["sdpa"].median * 1e6,
                            "vs_sdpa": median_ratio(aha, samples["sdpa"]),
                            "read_gb_s": bandwidth / 1e9,
                            "noise": max(_noise(s) for s in samples.values()),
                        }
                    )
    return Section(
        name="decode",
        title=f"decode step, batch {cfg.decode_batch}, D={cfg.head_dim}, against the memory roofline",
        columns=[
            Column("n", "cache"), Column("heads", "heads q/kv"), Column("dtype", "dtype"), Column("rho", "rho"),
            Column("global_fraction", "global", ".3f"), Column("microkernel", "microkernel"),
            Column("us", "AHA us", ".0f"), Column("roofline_us", "roofline us", ".0f"),
            Column("vs_roofline", "AHA/roofline", ".2f"), Column("must_read_mib", "must read MiB", ".1f"),
            Column("kernel_read_mib", "read per q head MiB", ".1f"),
            Column("vs_all_global", "AHA/all global", ".3f"), Column("ideal_vs_all_global", "ideal", ".3f"),
            Column("sdpa_us", "SDPA all heads us", ".0f"), Column("noise", "noise", ".2f"),
        ],  # fmt: skip
        rows=rows,
        notes=[
            f"roofline = K/V bytes the step must read (a KV head's whole cache where one of its query heads is global, "
            f"its window + sink otherwise) / the streaming read bandwidth measured in this run ({bandwidth / 1e9:.1f} GB/s, "
            "the sum of a 512 MiB tensor); target AHA/roofline <= 1.5.",
            "read per q head: what a kernel serving each query head on its own reads (a KV head's cache once per "
            "global query head); ideal = must-read bytes / must-read bytes with every head global.",
            "Repeated calls of one candidate may find part of a small working set still in L3 (AHA/roofline < 1).",
        ],
    )


_MEMORY_PROBE = """
import json, sys
import torch
import torch.nn.functional as F
from aha import aha_attention
kind, n, heads, kv_heads, dim, window, rho, threads = sys.argv[1], *map(int, sys.argv[2:7]), float(sys.argv[7]), int(sys.argv[8])
torch.set_num_threads(threads)
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
def call(n):
    q = torch.randn(1, heads, n, dim); k = torch.randn(1, kv_heads, n, dim); v = torch.randn(1, kv_heads, n, dim)
    route = torch.rand(1, heads, n) < rho
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = status_kib("VmRSS")
    with torch.no_grad():
        if kind == "aha":
            out = aha_attention(q, k, v, route, window)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=heads != kv_heads)
    return status_kib("VmHWM") - before
call(256)  # loads libraries and warms the allocator
print(json.dumps({"peak_kib": call(n)}))
"""


def _peak_extra_mib(kinds: list[str], cfg: BenchConfig, n: int, window: int, rho: float) -> dict[str, float]:
    """Extra peak MiB of one forward per kind ("aha" / "sdpa"), each in its own process (run side by side)."""
    shape = [n, cfg.heads, cfg.kv_heads, cfg.head_dim, window, rho, cfg.threads]
    probes = {
        kind: subprocess.Popen(
            [sys.executable, "-c", _MEMORY_PROBE, kind, *map(str, shape)], stdout=subprocess.PIPE, text=True
        )
        for kind in kinds
    }
    peaks = {}
    for kind, probe in probes.items():
        stdout, _ = probe.communicate()
        if probe.returncode != 0:
            raise RuntimeError(f"memory probe for {kind} failed with exit code {probe.returncode}")
        peaks[kind] = json.loads(stdout.strip().splitlines()[-1])["peak_kib"] / 1024
    return peaks


def _peak_extra_mib_cuda(cfg: BenchConfig, n: int, window: int, rho: float, dtype: torch.dtype) -> dict[str, float]:
    """Extra peak allocated CUDA MiB of one forward per kind (after a warm-up call that compiles)."""
    q, k, v = _qkv(cfg, n, n, dtype)
    route = _route(cfg, n, rho, torch.Generator().manual_seed(cfg.seed))
    calls = {"aha": lambda: aha_attention(q, k, v, route, window), "sdpa": lambda: _sdpa(q, k, v)}
    peaks = {}
    with torch.no_grad():
        for kind, call in calls.items():
            call()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            call()
            torch.cuda.synchronize()
            peaks[kind] = (torch.cuda.max_memory_allocated() - before) / 2**20
    return peaks


def memory_section(cfg: BenchConfig) -> Section:
    """Extra peak memory of one prefill forward (inputs excluded, output included), AHA vs SDPA causal."""
    n, window, rho = cfg.memory_len, cfg.windows[0], 0.07
    if torch.cuda.is_available():
        dtype_name, where = cfg.dtypes[0], "CUDA, allocated memory"
        how = "Extra peak = torch.cuda.max_memory_allocated during the call (reset before it) minus allocated before it"
        peaks = _peak_extra_mib_cuda(cfg, n, window, rho, DTYPES[dtype_name])
    else:
        dtype_name, where = "float32", "CPU, fresh process each"
        how = "Extra peak = peak RSS during the call (VmHWM, reset before it) minus RSS before it"
        peaks = _peak_extra_mib(["aha", "sdpa"], cfg, n, window, rho)
    mib = 1024 * 1024
    element = DTYPES[dtype_name].itemsize
    row = {
        "bench": "memory",
        "n": n,
        "rho": rho,
        "window": window,
        "dtype": dtype_name,
        "aha_peak_mib": peaks["aha"],
        "sdpa_peak_mib": peaks["sdpa"],
        "output_mib": cfg.batch * cfg.heads * n * cfg.head_dim * element / mib,
        "dense_scores_mib": cfg.batch * cfg.heads * n * n * element / mib,
    }
    return Section(
        name="memory",
        title=f"peak memory of one prefill forward ({dtype_name}, {where})",
        columns=[
            Column("n", "n"), Column("rho", "rho"), Column("window", "w"),
            Column("aha_peak_mib", "AHA extra peak MiB", ".1f"), Column("sdpa_peak_mib", "SDPA extra peak MiB", ".1f"),
            Column("output_mib", "output MiB", ".1f"), Column("dense_scores_mib", "n x n scores MiB", ".0f"),
        ],  # fmt: skip
        rows=[row],
        notes=[f"{how}; inputs excluded, output included."],
    )


SECTIONS: dict[str, Callable[[BenchConfig], Section]] = {
    "prefill": prefill_section,
    "train": train_section,
    "decode": decode_section,
    "memory": memory_section,
}


@register_group("kernels")
def kernel_benchmarks(cfg: BenchConfig) -> list[Section]:
    """The sections of ``cfg.parts`` in order."""
    unknown = [p for p in cfg.parts if p not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown kernel benchmark part(s) {unknown}; choose from {list(SECTIONS)}")
    return [SECTIONS[p](cfg) for p in cfg.parts]
