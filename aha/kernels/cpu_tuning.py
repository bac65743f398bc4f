"""Which C++ CPU kernel runs, decided from measurements on the machine at hand.

The C++ kernel has two microkernels: hand-written AVX-512/AVX2 GEMMs (``vector``) and the
oneDNN micro-GEMMs PyTorch's own CPU flash attention uses (``onednn``: AMX tiles for bf16 where
the CPU has them, JIT-compiled AVX-512/AVX2 elsewhere; bf16 widened to fp32 where oneDNN has no
bf16 micro-GEMMs). Which one is faster, and whether the kernel beats SDPA causal at a high
global fraction, depends on the CPU, the torch build and the dtype: on an Intel Xeon with AMX,
oneDNN is 3-4x faster than the hand-written kernels in bf16, which were the faster choice on AMD
Zen 4 (``benchmarks/RESULTS.md``).

A microkernel counts as available for a dtype only once it has run here: :func:`microkernel_problem`
runs a small forward and backward on it once per process and compares them with the dense
reference (oneDNN decides at run time what it can generate, from the CPU and
``ONEDNN_MAX_CPU_ISA``, so CPU flags cannot tell). Calibration skips a microkernel that fails,
and ``auto`` never lands on one.

Each (CPU model, ISA flags, oneDNN ISA cap, torch version, kernel source, threads, dtype) is
measured once (forward and forward + backward against SDPA at two lengths) and the result is
cached as JSON under ``~/.cache/aha/cpu-tuning/`` (atomic write, validated on load, measured again
when invalid; ``AHA_CACHE_DIR`` moves it). :func:`kernel_choice` reads it; ``make install`` and
``aha calibrate`` measure ahead; concurrent first uses wait for one measurement (a file lock).

Overrides:

* ``AHA_CPU_TUNING=off``: measure nothing and use the built-in rule (oneDNN where the CPU has
  AMX, the hand-written kernels elsewhere; the C++ kernel at every global fraction);
* ``AHA_CPU_MICROKERNEL=vector|onednn``: force the microkernel (the crossover is still measured).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import math
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from aha._cache import write_text_atomically
from aha.kernels._cpp_build import SOURCE, cache_dir, load_cpp_kernel
from aha.kernels.reference import reference_attention

_log = logging.getLogger(__name__)

#: Microkernel names and the codes the C++ ops take (0 = the kernel's built-in rule).
MICROKERNELS = {"default": 0, "vector": 1, "onednn": 2}

#: Query rows per tile (local, global), measured on 2 cores. A local tile of r rows reads
#: r + window - 1 keys, so small local tiles waste less: 32 local rows for GEMMs on fp32 (the
#: hand-written ones on Zen 4, where 16 and 48 were slower; oneDNN's fp32 micro-GEMMs on the AMX
#: Xeon, faster than 64 at rho 0.07). oneDNN's bf16 micro-GEMMs (AMX tiles) amortise each
#: call better over 64 rows.
FP32_TILE_ROWS = (32, 64)
BF16_TILE_ROWS = (64, 64)

#: Calibration runs: B=1, 8 heads, head_dim 64, window 256, at these sequence lengths; the C++
#: kernel at global fractions LOW_FRACTION and 1 (its time is close to linear in the fraction),
#: ``split`` (SDPA's kernel for a global majority) at SPLIT_FRACTION.
CALIBRATION_LENGTHS = (1024, 4096)
CALIBRATION_WINDOW = 256
LOW_FRACTION = 0.1
SPLIT_FRACTION = 0.9


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), e.g. ``AMD EPYC 9R14 96-Core Processor``."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), platform.processor())
    except OSError:
        return platform.processor()


def cpu_identity() -> str:
    """Vendor, family, model and stepping (``/proc/cpuinfo``), e.g. ``AuthenticAMD family 25 model 1
    stepping 1`` (Zen 3): the CPU generation where a hypervisor masks the model name ("AMD EPYC")."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("vendor_id", "cpu family", "model", "stepping") and key.strip() not in fields:
                    fields[key.strip()] = value.strip()
                if not line.strip():
                    break
    except OSError:
        return platform.processor()
    return " ".join(
        [fields.get("vendor_id", "?")] + [f"{name} {fields[key]}" for key, name in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping")) if key in fields]
    )


def _capabilities() -> dict:
    return torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}


def cpu_isa() -> str:
    """The widest instruction set the kernels use here: ``amx``, ``avx512_bf16``, ``avx512``, ``avx2`` or ``scalar``."""
    caps = _capabilities()
    for name, flag in (("amx", "amx_bf16"), ("avx512_bf16", "avx512_bf16"), ("avx512", "avx512_f"), ("avx2", "avx2")):
        if caps.get(flag):
            return name
    return "scalar"


#: Settings that make this machine run a lower instruction set than it has: oneDNN's JIT cap, the
#: ATen kernels' dispatch cap (SDPA, the baseline) and the C++ kernel's -march target.
ISA_LIMIT_VARIABLES = ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "AHA_CPU_ARCH")


def isa_limits() -> dict[str, str]:
    """The :data:`ISA_LIMIT_VARIABLES` set in this process, e.g. ``{"ONEDNN_MAX_CPU_ISA": "AVX2"}``
    (empty on a run at the machine's own instruction set)."""
    return {name: os.environ[name] for name in ISA_LIMIT_VARIABLES if os.environ.get(name, "").strip()}


@dataclass(frozen=True)
class CostModel:
    """Times relative to SDPA causal (same dtype, same run) at the calibration ``lengths``: the C++
    kernel at global fraction 1 (``full``) and :data:`LOW_FRACTION` (``low``), ``split`` at
    :data:`SPLIT_FRACTION` (``split``). Between lengths the ratios are interpolated in log2(n); past
    the longest they keep rising at half the last measured slope where it rises, and stay where it
    falls; below the shortest they keep its value. (The kernel's ratio to SDPA at fraction 1 grew
    with n on both CPU families, by about half as much from 4K to 16K keys as from 1K to 4K:
    hand-written fp32 on Zen 4 0.59 / 0.73 / 0.79 at 1K / 4K / 16K, oneDNN fp32 on the AMX Xeon
    0.61 / 0.77 / 0.79.)

    The C++ kernel's time is modelled linear in the global fraction; ``split``'s, above half global
    (where it runs SDPA over every query and packs the local minority), as SDPA plus a share
    proportional to the local fraction. Below half global ``split`` is never chosen.
    """

    lengths: tuple[int, ...]
    full: tuple[float, ...]
    low: tuple[float, ...]
    split: tuple[float, ...]

    def __post_init__(self) -> None:
        lengths = self.lengths
        if not lengths or not all(type(n) is int and n > 0 for n in lengths) or list(lengths) != sorted(set(lengths)):
            raise ValueError(f"lengths must be increasing positive ints, got {lengths!r}")
        for name in ("full", "low", "split"):
            values = getattr(self, name)
            if len(values) != len(lengths) or not all(
                isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0 for x in values
            ):
                raise ValueError(f"{name} must hold {len(lengths)} finite positive ratios, got {values!r}")

    def _at(self, values: tuple[float, ...], n: int) -> float:
        logs = [math.log2(length) for length in self.lengths]
        x = math.log2(max(n, 1))
        if len(values) == 1 or x <= logs[0]:
            return values[0]
        i = next((i for i in range(1, len(logs)) if x <= logs[i]), len(logs) - 1)
        slope = (values[i] - values[i - 1]) / (logs[i] - logs[i - 1])
        if x > logs[i]:
            slope = max(slope, 0.0) / 2
        return values[i] + slope * (x - logs[i])

    def kernel(self, n: int, fraction: float) -> float:
        """Modelled C++ kernel time / SDPA at length n and a global fraction."""
        full, low = self._at(self.full, n), self._at(self.low, n)
        local = max(0.0, (low - LOW_FRACTION * full) / (1 - LOW_FRACTION))  # the time at fraction 0
        return local + fraction * (full - local)

    def split_time(self, n: int, fraction: float) -> float:
        """Modelled ``split`` time / SDPA (infinite below half global, where it is not considered)."""
        if fraction < 0.5:
            return math.inf
        per_local = (self._at(self.split, n) - 1.0) / (1 - SPLIT_FRACTION)
        return 1.0 + (1 - fraction) * max(per_local, 0.0)

    def crossover(self, n: int) -> float:
        """The global fraction from which ``split`` is modelled faster at length n (2.0: never)."""
        if self.split_time(n, 1.0) >= self.kernel(n, 1.0):
            return 2.0
        low, high = 0.5, 1.0  # the two models are linear: bisect on their difference
        if self.split_time(n, low) < self.kernel(n, low):
            return low
        for _ in range(30):
            mid = (low + high) / 2
            low, high = (mid, high) if self.split_time(n, mid) >= self.kernel(n, mid) else (low, mid)
        return high


@dataclass(frozen=True)
class KernelChoice:
    """How the C++ kernel runs one dtype on this machine.

    Attributes:
        microkernel: ``vector``, ``onednn`` or ``default`` (the kernel's built-in rule).
        forward: cost of a forward without grad relative to SDPA (None: never fall back).
        train: the same for forward + backward.
        measured: where and how it was measured (empty when not measured).
    """

    microkernel: str = "default"
    forward: CostModel | None = None
    train: CostModel | None = None
    measured: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.microkernel not in MICROKERNELS:
            raise ValueError(f"unknown microkernel {self.microkernel!r}; choose one of {sorted(MICROKERNELS)}")

    @property
    def code(self) -> int:
        """The ``microkernel`` argument of the C++ ops."""
        return MICROKERNELS[self.microkernel]

    def crossover(self, seq: int, training: bool) -> float:
        """Global fraction from which ``split`` (SDPA's kernel) is faster at length ``seq`` (> 1: never)."""
        model = self.train if training else self.forward
        return 2.0 if model is None else model.crossover(seq)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> KernelChoice:
        """Parse and validate :meth:`to_json`'s output (ValueError, naming what is wrong, when invalid)."""
        data = json.loads(text)
        if not isinstance(data, dict) or not isinstance(data.get("measured", {}), dict):
            raise ValueError("a kernel choice is a JSON object with a 'microkernel' and an optional 'measured' object")
        models = {}
        for mode in ("forward", "train"):
            model = data.get(mode)
            if model is not None and (not isinstance(model, dict) or set(model) != {"lengths", "full", "low", "split"}):
                raise ValueError(f"{mode!r} must be null or an object with lengths, full, low and split")
            if model is not None and not all(isinstance(v, list) for v in model.values()):
                raise ValueError(f"{mode!r}: lengths, full, low and split must be lists")
            models[mode] = None if model is None else CostModel(**{key: tuple(v) for key, v in model.items()})
        if data.get("microkernel") not in MICROKERNELS:
            raise ValueError(f"unknown microkernel {data.get('microkernel')!r}; choose one of {sorted(MICROKERNELS)}")
        return cls(microkernel=data["microkernel"], measured=data.get("measured", {}), **models)


_problems: dict[tuple[torch.dtype, str, bool], str | None] = {}


def microkernel_problem(dtype: torch.dtype, microkernel: str) -> str | None:
    """Why the C++ kernel's ``microkernel`` cannot run ``dtype`` in this process, or None once it has.

    It counts as able once a small forward and backward on it (GQA, a sink key, mixed routes, one
    partial key block) matched the dense reference: built and run, not inferred from CPU flags.
    Checked once per process (and oneDNN on/off switch); a failure is logged with its reason.
    """
    key = (dtype, microkernel, torch.backends.mkldnn.enabled)
    if key not in _problems:
        with torch.inference_mode(False):  # a caller in inference mode (a vLLM worker) would make the check's tensors inference tensors
            _problems[key] = _run_check(dtype, microkernel) if load_cpp_kernel() else "the C++ kernel is unavailable"
        if _problems[key] is not None:
            _log.warning("aha: the %s microkernel cannot run %s here: %s", microkernel, dtype, _problems[key])
    return _problems[key]


def _run_check(dtype: torch.dtype, microkernel: str) -> str | None:
    """Run ``microkernel`` on a small problem; the error or mismatch it shows, or None."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 48, 32, generator=generator).to(dtype)
    k, v = (torch.randn(1, 1, 48, 32, generator=generator).to(dtype) for _ in range(2))
    route = torch.rand(1, 2, 48, generator=generator) < 0.5
    out_grad = torch.randn(1, 2, 48, 32, generator=generator).to(dtype)
    window, sink, scale = 8, 1, 32**-0.5
    settings = (window, sink, scale, *tile_rows(dtype, microkernel), MICROKERNELS[microkernel])
    starts = torch.zeros(1, dtype=torch.int32)
    try:
        with torch.no_grad():
            out, lse, _ = torch.ops.aha.forward(q, k, v, route, starts, *settings)
            grads = torch.ops.aha.backward(out_grad, q, k, v, out, lse, route, starts, *settings)
    except RuntimeError as exc:
        return str(exc).strip().splitlines()[0]
    with torch.enable_grad():  # callers may be inside no_grad (a benchmark's labels)
        wide = [t.float().requires_grad_(True) for t in (q, k, v)]
        want_out = reference_attention(*wide, route, window, scale, sink=sink)
        want = [want_out, *torch.autograd.grad(want_out, wide, out_grad.float())]
    tolerance = 1e-3 if dtype == torch.float32 else 0.1
    for name, got, expected in zip(("output", "dq", "dk", "dv"), (out, *grads), want):
        error = (got.float() - expected.detach()).abs().max().item()
        if not error <= tolerance:  # also catches NaN
            return f"its {name} differs from the reference by {error:.3g} (tolerance {tolerance})"
    return None


@torch.compiler.assume_constant_result
def microkernel_name(dtype: torch.dtype, microkernel: str) -> str | None:
    """What ``microkernel`` runs for ``dtype`` on this CPU (e.g. ``onednn-amx-bf16``), None where it
    cannot run (see :func:`microkernel_problem`)."""
    if microkernel_problem(dtype, microkernel) is not None:
        return None
    return torch.ops.aha.microkernel(dtype, MICROKERNELS[microkernel])


@functools.cache
def tile_rows(dtype: torch.dtype, microkernel: str) -> tuple[int, int]:
    """``(local, global)`` query rows per tile of the C++ kernel for ``dtype`` on ``microkernel``
    (``default`` included): :data:`BF16_TILE_ROWS` where oneDNN's micro-GEMMs compute in bf16 on
    this CPU (``onednn-*bf16``), else :data:`FP32_TILE_ROWS`."""
    try:
        name = torch.ops.aha.microkernel(dtype, MICROKERNELS[microkernel])
    except RuntimeError:  # not supported here: no call will run on it
        return FP32_TILE_ROWS
    return BF16_TILE_ROWS if name.startswith("onednn-") and name.endswith("bf16") else FP32_TILE_ROWS


def tuning_path(dtype: torch.dtype) -> Path:
    """Where the calibration of ``dtype`` on this machine is cached."""
    flags = sorted(name for name, on in _capabilities().items() if on is True)
    machine = [cpu_model(), ",".join(flags), *(f"{name}={value}" for name, value in isa_limits().items())]
    key = hashlib.sha256(
        "|".join([*machine, torch.__version__, str(torch.get_num_threads())]).encode() + SOURCE.read_bytes()
    ).hexdigest()[:16]
    return cache_dir() / "cpu-tuning" / f"{str(dtype).removeprefix('torch.')}-{key}.json"


Timer = Callable[[dict[str, Callable[[], object]]], dict[str, float]]


def _median_seconds(candidates: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Interleaved, noise-aware timing of each candidate (median seconds per call)."""
    from aha.benchmarking.timing import TimingPolicy, measure_round_robin

    policy = TimingPolicy(rounds=3, min_sample_s=0.05, max_wait_s=2.0)
    return {name: samples.median for name, samples in measure_round_robin(candidates, policy).items()}


def calibrate(
    dtype: torch.dtype, timer: Timer = _median_seconds, lengths: tuple[int, ...] = CALIBRATION_LENGTHS
) -> KernelChoice:
    """Measure the microkernels and the crossover to ``split`` for ``dtype`` on this machine (no caching).

    At the longest length the forward of every supported microkernel is timed at global fraction
    :data:`LOW_FRACTION` and 1 against SDPA causal; the one with the smaller summed ratio wins
    (``AHA_CPU_MICROKERNEL`` forces one). The winner's forward and forward + backward, and
    ``split`` at :data:`SPLIT_FRACTION`, are then timed at every length. ``timer`` maps named
    callables to seconds per call (tests pass a fake).
    """
    from aha.kernels.cpp import kernel_attention
    from aha.kernels.split import split_attention

    forced = os.environ.get("AHA_CPU_MICROKERNEL")
    problems = {m: microkernel_problem(dtype, m) for m in ([forced] if forced else ["vector", "onednn"])}
    names = [m for m, problem in problems.items() if problem is None]
    if not names:
        raise RuntimeError(f"no microkernel of the C++ kernel runs {dtype} here: {problems}")
    generator = torch.Generator().manual_seed(0)
    timings: dict[str, dict[str, float]] = {}
    scale = 64**-0.5

    def ratios(seq: int, microkernels: list[str], grad: bool) -> dict[str, float]:
        """Time / SDPA of "<microkernel> <fraction>" for the kernel and of "split" at SPLIT_FRACTION."""
        q, k, v = (torch.randn(1, 8, seq, 64, generator=generator).to(dtype).requires_grad_(grad) for _ in range(3))
        fractions = (1.0, LOW_FRACTION, SPLIT_FRACTION)
        routes = {rho: torch.rand(1, 8, seq, generator=generator) < rho for rho in fractions}
        starts = torch.zeros(1, dtype=torch.int32)
        out_grad = torch.randn_like(q)

        def run(attend: Callable[[], torch.Tensor]) -> Callable[[], object]:
            return (lambda: torch.autograd.grad(attend(), (q, k, v), out_grad)) if grad else attend

        candidates = {
            "sdpa": run(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
            "split": run(lambda: split_attention(q, k, v, routes[SPLIT_FRACTION], CALIBRATION_WINDOW, scale)),
        }
        for name in microkernels:
            for rho in fractions[:2]:
                candidates[f"{name} {rho}"] = run(
                    lambda route=routes[rho], name=name: kernel_attention(
                        q, k, v, route, CALIBRATION_WINDOW, scale, starts, 0, name
                    )[0]
                )
        with torch.set_grad_enabled(grad):
            seconds = timer(candidates)
        timings[f"{'train' if grad else 'forward'} n={seq}"] = seconds
        return {name: t / seconds["sdpa"] for name, t in seconds.items()}

    longest = max(lengths)
    first = ratios(longest, names, grad=False)
    best = min(names, key=lambda m: first[f"{m} 1.0"] + first[f"{m} {LOW_FRACTION}"])
    models = {}
    for mode, grad in (("forward", False), ("train", True)):
        points = [first if n == longest and not grad else ratios(n, [best], grad) for n in sorted(lengths)]
        models[mode] = CostModel(
            lengths=tuple(sorted(lengths)),
            full=tuple(p[f"{best} 1.0"] for p in points),
            low=tuple(p[f"{best} {LOW_FRACTION}"] for p in points),
            split=tuple(p["split"] for p in points),
        )
    measured = {
        "skipped": {m: problem for m, problem in problems.items() if problem is not None},
        "seconds": timings,
        "window": CALIBRATION_WINDOW,
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    return KernelChoice(microkernel=best, measured=measured, **models)


@contextmanager
def _calibration_lock(path: Path) -> Iterator[None]:
    """Hold the machine-wide calibration lock of ``path``'s folder: a second process that needs a
    measurement waits for the first one's (two at once would also time each other)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.parent / ".calibration.lock", "a")  # noqa: SIM115 -- held across the yield
    except OSError:  # an unwritable cache: measure without the lock
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _calibrate_and_cache(dtype: torch.dtype, lengths: tuple[int, ...] = CALIBRATION_LENGTHS) -> KernelChoice:
    path = tuning_path(dtype)
    _log.warning(
        "aha: measuring the C++ CPU kernel for %s once on this machine (a minute or two on 2 cores; "
        "`aha calibrate` does it ahead)", dtype,
    )
    started = time.monotonic()
    choice = calibrate(dtype, lengths=lengths)
    try:
        write_text_atomically(path, choice.to_json())
    except OSError as exc:
        fix = f"remove the directory {path}" if path.is_dir() else f"make {path.parent} writable or set AHA_CACHE_DIR"
        _log.warning("aha: cannot cache the measurement (%s); it holds for this process only: %s", exc, fix)
    _log.warning("aha: measured %s in %.0f s: microkernel %s", dtype, time.monotonic() - started, choice.microkernel)
    return choice


def _load(path: Path) -> KernelChoice | None:
    """The cached choice at ``path``; None (logged) when it is missing or invalid."""
    try:
        return KernelChoice.from_json(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        _log.warning("aha: ignoring the invalid CPU tuning file %s (%s: %s)", path, type(exc).__name__, exc)
        return None


_lock = threading.Lock()
_choices: dict[torch.dtype, KernelChoice] = {}


def kernel_choice(dtype: torch.dtype) -> KernelChoice:
    """The C++ kernel's settings for ``dtype`` here: cached, else measured once (and cached).

    ``AHA_CPU_TUNING=off`` gives the built-in rule without measuring (or ``AHA_CPU_MICROKERNEL``).
    """
    with _lock:
        if dtype in _choices:
            return _choices[dtype]
        forced = os.environ.get("AHA_CPU_MICROKERNEL")
        if forced is not None and forced not in MICROKERNELS:
            raise ValueError(f"AHA_CPU_MICROKERNEL={forced!r}; choose one of {sorted(MICROKERNELS)}")
        if os.environ.get("AHA_CPU_TUNING", "").lower() in ("off", "0", "false") or not load_cpp_kernel():
            choice = KernelChoice(microkernel=forced or "default")
        else:
            path = tuning_path(dtype)
            choice = _load(path)
            if choice is None or (forced and choice.microkernel != forced):
                with _calibration_lock(path):
                    choice = _load(path)  # another process may have measured it while this one waited
                    if choice is None or (forced and choice.microkernel != forced):
                        choice = _calibrate_and_cache(dtype)
        _choices[dtype] = choice
        return choice


def usable_microkernel(dtype: torch.dtype, preferred: str) -> str | None:
    """``preferred`` when it runs ``dtype`` here, else the first microkernel that does (None: none)."""
    return next((m for m in dict.fromkeys([preferred, "vector", "onednn"]) if microkernel_problem(dtype, m) is None), None)


@torch.compiler.assume_constant_result  # a compiled graph bakes the settings in instead of tracing the cache
def kernel_settings(dtype: torch.dtype, microkernel: str | None = None) -> tuple[int, int, int]:
    """``(local_rows, global_rows, microkernel code)``: the C++ ops' tiling arguments for ``dtype``,
    for a forced ``microkernel``, else from :func:`kernel_choice`, falling back to a microkernel that
    runs here when the chosen one does not (oneDNN switched off since, say)."""
    if microkernel is None:
        microkernel = usable_microkernel(dtype, kernel_choice(dtype).microkernel)
        if microkernel is None:
            raise RuntimeError(f"no microkernel of the C++ kernel runs {dtype} here; use impl='split'")
    return (*tile_rows(dtype, microkernel), MICROKERNELS[microkernel])


def recalibrate(
    dtypes: list[torch.dtype], lengths: tuple[int, ...] = CALIBRATION_LENGTHS
) -> dict[torch.dtype, KernelChoice]:
    """Measure ``dtypes`` again at ``lengths`` (ignoring the cache), cache and return the results."""
    results = {}
    for dtype in dtypes:
        with _calibration_lock(tuning_path(dtype)):
            choice = _calibrate_and_cache(dtype, lengths)
        with _lock:
            _choices[dtype] = choice
        results[dtype] = choice
    return results
