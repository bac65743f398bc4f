"""The per-machine choice of the C++ kernel's microkernel and of the crossover to SDPA (fake timings)."""

import json

import pytest
import torch

from aha import choose_impl
from aha.kernels import cpp, cpu_tuning
from aha.kernels.cpu_tuning import CostModel, KernelChoice

needs_kernel = pytest.mark.skipif(not cpp.cpp_available(), reason="C++ kernel unavailable")


@pytest.fixture(autouse=True)
def _no_forced_microkernel(monkeypatch):
    monkeypatch.delenv("AHA_CPU_MICROKERNEL", raising=False)


def fake_timer(costs, split=1.05):
    """A timer answering seconds from ``costs`` (microkernel -> seconds at fraction 1 and at 0.1),
    ``split`` at fraction 0.9, and 1 s for SDPA."""

    def timer(candidates):
        seconds = {}
        for name in candidates:
            if name in ("sdpa", "split"):
                seconds[name] = 1.0 if name == "sdpa" else split
            else:
                microkernel, rho = name.split()
                seconds[name] = costs[microkernel][0 if rho == "1.0" else 1]
        return seconds

    return timer


def test_cost_model_interpolates_and_only_rises_past_the_longest_length():
    model = CostModel(lengths=(1024, 4096), full=(0.8, 1.0), low=(0.3, 0.3), split=(1.1, 1.1))
    assert model._at(model.full, 512) == pytest.approx(0.8)
    assert model._at(model.full, 2048) == pytest.approx(0.9)
    assert model._at(model.full, 16384) == pytest.approx(1.1)  # half the measured slope
    falling = CostModel(lengths=(1024, 4096), full=(1.0, 0.8), low=(0.3, 0.3), split=(1.1, 1.1))
    assert falling._at(falling.full, 16384) == pytest.approx(0.8)


def test_split_is_chosen_only_where_its_model_is_faster():
    fast_kernel = CostModel(lengths=(4096,), full=(0.9,), low=(0.2,), split=(1.05,))
    assert fast_kernel.crossover(4096) > 1  # faster than split even at fraction 1
    slow_kernel = CostModel(lengths=(4096,), full=(1.5,), low=(0.24,), split=(1.05,))  # 0.1 at fraction 0
    rho = slow_kernel.crossover(4096)
    assert 0.5 < rho < 1
    assert slow_kernel.kernel(4096, rho) == pytest.approx(slow_kernel.split_time(4096, rho), rel=1e-6)
    assert slow_kernel.split_time(4096, 0.4) == float("inf")  # below half global split is never modelled
    hopeless = CostModel(lengths=(4096,), full=(3.0,), low=(2.0,), split=(1.05,))
    assert hopeless.crossover(4096) == 0.5


@needs_kernel
def test_calibration_keeps_the_faster_microkernel(monkeypatch):
    monkeypatch.setattr(cpu_tuning, "microkernel_name", lambda dtype, m: m)
    costs = {"vector": (1.4, 0.3), "onednn": (0.8, 0.2)}
    choice = cpu_tuning.calibrate(torch.float32, fake_timer(costs), lengths=(64, 128))
    assert choice.microkernel == "onednn"
    assert choice.crossover(128, training=False) > 1 and choice.crossover(10**6, training=True) > 1
    assert set(choice.measured["seconds"]) == {"forward n=64", "forward n=128", "train n=64", "train n=128"}


@needs_kernel
def test_calibration_falls_back_above_the_measured_crossover(monkeypatch):
    monkeypatch.setattr(cpu_tuning, "microkernel_name", lambda dtype, m: m)
    costs = {"vector": (1.5, 0.24), "onednn": (3.0, 0.5)}
    choice = cpu_tuning.calibrate(torch.float32, fake_timer(costs), lengths=(64,))
    assert choice.microkernel == "vector"
    rho = choice.crossover(64, training=False)
    assert 0.6 < rho < 0.8
    q, k = torch.randn(2, 1, 8, 64, 16)
    with monkeypatch.context() as patch:
        patch.setitem(cpu_tuning._choices, torch.float32, choice)
        assert choose_impl(q, k, torch.rand(1, 8, 64) < rho - 0.15, 8) == "cpp"
        assert choose_impl(q, k, torch.ones(1, 8, 64, dtype=torch.bool), 8) == "split"
        # a gate that needs a gradient also runs the dense full branch: it counts as fraction 1
        gate = (torch.rand(1, 8, 64) < 0.1).float().requires_grad_(True)
        assert choose_impl(q, k, gate, 8) == "split"


@needs_kernel
def test_choice_is_measured_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("AHA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AHA_CPU_TUNING")
    monkeypatch.setattr(cpu_tuning, "_choices", {})
    calls = []

    def fake_calibrate(dtype):
        calls.append(dtype)
        return KernelChoice(microkernel="vector", forward=CostModel((1024,), (1.2,), (0.3,), (1.1,)))

    monkeypatch.setattr(cpu_tuning, "calibrate", fake_calibrate)
    first = cpu_tuning.kernel_choice(torch.bfloat16)
    path = cpu_tuning.tuning_path(torch.bfloat16)
    assert json.loads(path.read_text())["microkernel"] == "vector"
    assert not list(path.parent.glob("*.tmp"))
    monkeypatch.setattr(cpu_tuning, "_choices", {})
    assert cpu_tuning.kernel_choice(torch.bfloat16) == first and calls == [torch.bfloat16]
    path.write_text("{not json")  # a torn or corrupted cache file is measured again
    monkeypatch.setattr(cpu_tuning, "_choices", {})
    assert cpu_tuning.kernel_choice(torch.bfloat16) == first and calls == [torch.bfloat16] * 2


def test_overrides(monkeypatch):
    monkeypatch.setattr(cpu_tuning, "_choices", {})
    monkeypatch.setenv("AHA_CPU_MICROKERNEL", "vector")
    assert cpu_tuning.kernel_choice(torch.float32) == KernelChoice(microkernel="vector")  # tuning is off in tests
    monkeypatch.setattr(cpu_tuning, "_choices", {})
    monkeypatch.setenv("AHA_CPU_MICROKERNEL", "amx")
    with pytest.raises(ValueError, match="choose one of"):
        cpu_tuning.kernel_choice(torch.float32)


@needs_kernel
def test_a_real_calibration_run_gives_a_usable_choice(monkeypatch):
    """The measuring path end to end on tiny shapes (no verdict on the numbers)."""
    choice = cpu_tuning.calibrate(torch.float32, lengths=(64,))
    assert choice.microkernel in ("vector", "onednn")
    assert choice.measured["isa"] == cpu_tuning.cpu_isa()
    assert KernelChoice.from_json(choice.to_json()) == choice
