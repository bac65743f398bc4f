"""The per-machine choice of the C++ kernel's microkernel and of the crossover to SDPA (fake timings)."""

import json

import pytest
import torch

from aha import aha_attention, choose_impl, gate_gradient, kernels
from aha.kernels import cpp, cpu_tuning
from aha.kernels.cpu_tuning import CostModel, KernelChoice
from aha.kernels.dispatch import select

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
        # unless an estimator replaces the dense branches: its passes are dispatched on their own (hard) routes
        chosen = []

        def spy(inputs, impl):
            chosen.append(select(inputs, impl).name)
            return select(inputs, impl)

        patch.setattr(kernels, "select", spy)
        with gate_gradient("sampled"):
            aha_attention(q, k, k, gate, 8).sum().backward()
        assert chosen == ["cpp", "cpp"] and gate.grad is not None


@needs_kernel
def test_choice_is_measured_once_then_read_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("AHA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AHA_CPU_TUNING")
    monkeypatch.setattr(cpu_tuning, "_choices", {})
    calls = []

    def fake_calibrate(dtype, lengths):
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


VALID = {"lengths": [1024, 4096], "full": [0.8, 0.9], "low": [0.3, 0.3], "split": [1.1, 1.1]}


@pytest.mark.parametrize(
    "text",
    [
        "[1, 2]",
        '{"microkernel": "vector", "forward": {"lengths": [], "full": [], "low": [], "split": []}}',
        json.dumps({"microkernel": "vector", "forward": {**VALID, "lengths": [0, 4096]}}),
        json.dumps({"microkernel": "vector", "forward": {**VALID, "lengths": ["1024", "4096"]}}),
        json.dumps({"microkernel": "vector", "forward": {**VALID, "full": [0.8, float("nan")]}}),
        json.dumps({"microkernel": "vector", "forward": {**VALID, "low": [0.3]}}),
        json.dumps({"microkernel": "vector", "forward": {**VALID, "lengths": [4096, 1024]}}),
        json.dumps({"microkernel": "vector", "forward": VALID, "measured": [1]}),
        json.dumps({"microkernel": "amx", "forward": VALID}),
        json.dumps({"microkernel": "vector", "forward": {**VALID, "extra": [1]}}),
    ],
)
def test_an_invalid_tuning_file_is_measured_again_and_every_call_still_works(monkeypatch, tmp_path, text):
    """A damaged cost model in the cache once made every CPU call raise (AttributeError, IndexError, ...)."""
    monkeypatch.setenv("AHA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AHA_CPU_TUNING")
    monkeypatch.setattr(cpu_tuning, "_choices", {})
    measured = KernelChoice(microkernel="vector", forward=CostModel((1024,), (1.2,), (0.3,), (1.1,)))
    monkeypatch.setattr(cpu_tuning, "calibrate", lambda dtype, lengths: measured)
    path = cpu_tuning.tuning_path(torch.float32)
    path.parent.mkdir(parents=True)
    path.write_text(text)
    with pytest.raises(ValueError):
        KernelChoice.from_json(text)
    assert cpu_tuning.kernel_choice(torch.float32) == measured
    assert KernelChoice.from_json(path.read_text()) == measured
    q = torch.randn(1, 2, 64, 16)
    route = torch.rand(1, 2, 64) < 0.5
    torch.testing.assert_close(aha_attention(q, q, q, route, 8), aha_attention(q, q, q, route, 8, impl="reference"))


def test_a_directory_in_place_of_the_tuning_file_is_named_and_the_choice_holds(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("AHA_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("AHA_CPU_TUNING")
    monkeypatch.setattr(cpu_tuning, "_choices", {})
    measured = KernelChoice(microkernel="vector")
    monkeypatch.setattr(cpu_tuning, "calibrate", lambda dtype, lengths: measured)
    cpu_tuning.tuning_path(torch.float32).mkdir(parents=True)
    assert cpu_tuning.kernel_choice(torch.float32) == measured
    assert f"remove the directory {cpu_tuning.tuning_path(torch.float32)}" in caplog.text


@needs_kernel
def test_calibration_skips_a_microkernel_that_fails_and_says_why(monkeypatch):
    monkeypatch.setitem(cpu_tuning._problems, (torch.float32, "onednn", torch.backends.mkldnn.enabled), "could not generate a kernel")
    choice = cpu_tuning.calibrate(torch.float32, fake_timer({"vector": (1.4, 0.3), "onednn": (0.1, 0.1)}), lengths=(64,))
    assert choice.microkernel == "vector"
    assert choice.measured["skipped"] == {"onednn": "could not generate a kernel"}
    assert cpu_tuning.microkernel_name(torch.float32, "onednn") is None


@needs_kernel
def test_auto_falls_back_from_a_chosen_microkernel_that_cannot_run(monkeypatch):
    """A cached choice whose microkernel fails in this process (oneDNN switched off or capped since it was
    measured) must not make calls raise: auto takes a microkernel that ran."""
    monkeypatch.setitem(cpu_tuning._choices, torch.bfloat16, KernelChoice(microkernel="onednn"))
    monkeypatch.setitem(cpu_tuning._problems, (torch.bfloat16, "onednn", torch.backends.mkldnn.enabled), "could not generate a kernel")
    assert cpu_tuning.kernel_settings(torch.bfloat16) == (*cpu_tuning.tile_rows(torch.bfloat16, "vector"), cpu_tuning.MICROKERNELS["vector"])
    q, k, v = (torch.randn(1, 2, 50, 32, dtype=torch.bfloat16) for _ in range(3))
    route = torch.rand(1, 2, 50) < 0.5
    got = aha_attention(q, k, v, route, 8)
    torch.testing.assert_close(got.float(), aha_attention(q, k, v, route, 8, impl="reference").float(), atol=3e-2, rtol=3e-2)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_microkernel_runs_every_dtype_here(dtype):
    """bf16 on CPUs without bf16 instructions once raised from oneDNN; now it is widened to fp32."""
    for microkernel in ("vector", "onednn"):
        assert cpu_tuning.microkernel_problem(dtype, microkernel) is None
    assert "widened" in cpu_tuning.microkernel_name(dtype, "onednn") or dtype != torch.float16


def test_concurrent_first_uses_measure_once(monkeypatch, tmp_path):
    """Two processes on first use: the second waits on the lock, then reads the first one's measurement."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent(
        """
        import sys, time, torch
        from aha.kernels import cpu_tuning
        from aha.kernels.cpu_tuning import KernelChoice
        def slow(dtype, lengths):
            print("measuring", flush=True)
            time.sleep(1.5)
            return KernelChoice(microkernel="vector")
        cpu_tuning.calibrate = slow
        cpu_tuning.load_cpp_kernel = lambda: True
        print(cpu_tuning.kernel_choice(torch.float32).microkernel)
        """
    )
    env = {**__import__("os").environ, "AHA_CACHE_DIR": str(tmp_path)}
    env.pop("AHA_CPU_TUNING", None)
    runs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=120)[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    assert sum(out.count("measuring") for out in outputs) == 1, outputs
    assert all(out.strip().endswith("vector") for out in outputs)


@needs_kernel
def test_the_microkernel_check_runs_inside_inference_mode_and_no_grad(monkeypatch):
    """A vLLM worker calls attention in inference mode; the first call's check takes gradients."""
    monkeypatch.setattr(cpu_tuning, "_problems", {})
    with torch.inference_mode(), torch.no_grad():
        assert cpu_tuning.microkernel_problem(torch.float32, "vector") is None


def test_each_instruction_set_limit_is_calibrated_on_its_own(monkeypatch):
    """A capped run (oneDNN, ATen or the kernel's build target) measures other speeds: it must not
    reuse, or overwrite, the machine's own calibration."""
    for name in cpu_tuning.ISA_LIMIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    paths = {cpu_tuning.tuning_path(torch.float32)}
    for name, value in [("ONEDNN_MAX_CPU_ISA", "AVX2"), ("ATEN_CPU_CAPABILITY", "avx2"), ("AHA_CPU_ARCH", "x86-64-v3")]:
        monkeypatch.setenv(name, value)
        paths.add(cpu_tuning.tuning_path(torch.float32))
    assert len(paths) == 4
