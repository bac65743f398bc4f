"""Noise-robust wall-clock timing on a machine shared with other jobs.

Other processes (and, in a VM, the host: "steal" time) take CPU cores at random moments, which
moves a 2-thread timing by 20% or more. Every sample therefore records how much CPU the rest of
the system used while it ran (``/proc/stat`` busy + steal time minus this process's own CPU
time); samples taken while others used more than ``max_noise_cores`` are retried, and candidates
are measured round-robin so that slow drifts hit all of them alike. Ratios are taken per round
(candidate vs baseline measured back to back) and summarised by their median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_CLOCK_TICKS = 100  # USER_HZ on Linux


def _system_busy_seconds() -> float | None:
    """CPU seconds the whole system spent busy or stolen since boot (None off Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLOCK_TICKS


class NoiseProbe:
    """Measures the CPU cores used by everything except this process over an interval."""

    def __init__(self) -> None:
        self._busy = _system_busy_seconds()
        self._own = time.process_time()
        self._wall = time.perf_counter()

    def other_cores(self) -> float:
        """Average number of cores other processes (or the hypervisor) used since construction."""
        busy = _system_busy_seconds()
        wall = time.perf_counter() - self._wall
        if busy is None or self._busy is None or wall <= 0:
            return 0.0
        other = (busy - self._busy) - (time.process_time() - self._own)
        return max(0.0, other / wall)


def wait_until_quiet(max_noise_cores: float, max_wait_s: float, window_s: float = 0.25) -> float:
    """Sleep until other processes use at most ``max_noise_cores`` (or ``max_wait_s`` passes);
    returns the last measured load."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        probe = NoiseProbe()
        time.sleep(window_s)
        load = probe.other_cores()
        if load <= max_noise_cores or time.perf_counter() >= deadline:
            return load


@dataclass
class TimingPolicy:
    """How hard to try for clean samples.

    Attributes:
        rounds: round-robin rounds (one sample per candidate per round).
        min_sample_s: calls are repeated until a sample lasts at least this long.
        max_noise_cores: a sample during which others used more cores than this is retried.
        retries: retries per sample before keeping a noisy one (it is then flagged).
        max_wait_s: longest wait for a quiet machine before each round.
        clock: ``"wall"`` (perf_counter) or ``"cpu"`` (this process's CPU time). CPU time of a
            single-threaded run barely moves when other jobs take cores, so it measures kernel
            efficiency on a busy machine; with several threads it would also count spin-waiting.
    """

    rounds: int = 5
    min_sample_s: float = 0.25
    max_noise_cores: float = 0.15
    retries: int = 4
    max_wait_s: float = 20.0
    clock: str = "wall"

    def __post_init__(self) -> None:
        if self.clock not in ("wall", "cpu"):
            raise ValueError(f"clock must be 'wall' or 'cpu', got {self.clock!r}")

    def now(self) -> float:
        """The current reading of the chosen clock, in seconds."""
        return time.process_time() if self.clock == "cpu" else time.perf_counter()


@dataclass
class Samples:
    """Per-call seconds of one candidate, one entry per round, with the noise seen in each."""

    seconds: list[float] = field(default_factory=list)
    noise: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def _sample(fn: Callable[[], object], repeats: int, policy: TimingPolicy) -> tuple[float, float]:
    best: tuple[float, float] | None = None
    for _ in range(policy.retries + 1):
        probe = NoiseProbe()
        start = policy.now()
        for _ in range(repeats):
            fn()
        seconds = (policy.now() - start) / repeats
        noise = probe.other_cores()
        if best is None or noise < best[1]:
            best = (seconds, noise)
        if noise <= policy.max_noise_cores:
            break
    assert best is not None
    return best


def measure_round_robin(candidates: dict[str, Callable[[], object]], policy: TimingPolicy) -> dict[str, Samples]:
    """Time every candidate once per round, rotating the order each round.

    Each candidate is called once to warm up (compilation, caches) and once more to choose how
    many calls make a sample of at least ``policy.min_sample_s``.
    """
    repeats: dict[str, int] = {}
    for name, fn in candidates.items():
        fn()
        start = policy.now()
        fn()
        once = max(policy.now() - start, 1e-7)
        repeats[name] = max(1, min(10_000, round(policy.min_sample_s / once)))
    names = list(candidates)
    samples = {name: Samples() for name in names}
    for r in range(policy.rounds):
        if policy.clock == "wall":
            wait_until_quiet(policy.max_noise_cores, policy.max_wait_s)
        for name in names[r % len(names) :] + names[: r % len(names)]:
            seconds, noise = _sample(candidates[name], repeats[name], policy)
            samples[name].seconds.append(seconds)
            samples[name].noise.append(noise)
    return samples


def median_ratio(numerator: Samples, denominator: Samples) -> float:
    """Median over rounds of ``numerator / denominator`` (same-round samples paired)."""
    return statistics.median(a / b for a, b in zip(numerator.seconds, denominator.seconds))
