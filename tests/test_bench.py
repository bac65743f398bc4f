"""The benchmark suite: timing helpers and the `aha bench --quick` smoke run with its JSON schema."""

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from aha import aha_attention
from aha.benchmarking import GROUPS, SCHEMA, BenchConfig, run_benchmarks
from aha.benchmarking.timing import (
    Samples,
    TimingPolicy,
    measure_round_robin,
    median_ratio,
)
from aha.cli import app
from aha.stats import ideal_cost_ratio


def test_median_ratio_pairs_samples_by_round():
    slow = Samples(seconds=[2.0, 9.0, 4.0], noise=[0, 0, 0])
    fast = Samples(seconds=[1.0, 3.0, 1.0], noise=[0, 0, 0])
    assert median_ratio(slow, fast) == 3.0  # ratios 2, 3, 4


def test_round_robin_samples_every_candidate_every_round():
    calls = {"a": 0, "b": 0}

    def bump(name):
        calls[name] += 1

    policy = TimingPolicy(rounds=3, min_sample_s=0.0, retries=0, max_wait_s=0.0)
    samples = measure_round_robin({"a": lambda: bump("a"), "b": lambda: bump("b")}, policy)
    assert [len(samples[n].seconds) for n in "ab"] == [3, 3]
    assert all(s >= 0 for n in "ab" for s in samples[n].noise)
    assert calls == {"a": 5, "b": 5}  # warm-up + calibration + one call per round


def test_unknown_group_is_rejected():
    with pytest.raises(ValueError, match="unknown benchmark group"):
        run_benchmarks(BenchConfig.quick_config(), ["nope"])


def test_cpu_clock_is_single_threaded_only():
    with pytest.raises(ValueError, match="clock must be"):
        TimingPolicy(clock="sundial")
    config = BenchConfig.quick_config()
    config.timing.clock = "cpu"
    with pytest.raises(ValueError, match="--threads 1"):
        run_benchmarks(config, ["kernels"])


ROW_KEYS = {
    "prefill": {"n", "rho", "window", "dtype", "impl", "microkernel", "ms", "sdpa_ms", "cost_ratio", "ideal_cost_ratio", "speedup"},
    "train": {"n", "rho", "window", "dtype", "impl", "microkernel", "ms", "sdpa_ms", "cost_ratio", "ideal_cost_ratio", "speedup"},
    "decode": {"n", "heads", "rho", "dtype", "impl", "microkernel", "us", "roofline_us", "vs_roofline", "must_read_mib",
               "kernel_read_mib", "all_global_us", "vs_all_global", "ideal_vs_all_global", "sdpa_us", "read_gb_s"},
    "memory": {"n", "aha_peak_mib", "sdpa_peak_mib", "output_mib", "dense_scores_mib"},
}


def test_quick_bench_cli_writes_a_complete_report(tmp_path):
    result = CliRunner().invoke(app, ["bench", "--quick", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "prefill forward" in result.output
    (path,) = tmp_path.glob("bench-*.json")
    report = json.loads(path.read_text())
    assert report["schema"] == SCHEMA
    assert set(report["meta"]) >= {"date", "cpu", "cpu_id", "isa", "isa_flags", "threads", "torch", "transformers", "accelerate",
                                   "command", "seed", "git_commit", "git_dirty", "kernel_sources_sha256", "cpp_kernel"}
    assert "NaN" not in path.read_text()  # strict JSON
    assert report["meta"]["isa"] in ("amx", "avx512_bf16", "avx512", "avx2", "scalar")
    assert set(GROUPS) >= set(report["groups"]) == {"kernels"}
    sections = {s["name"]: s for s in report["groups"]["kernels"]}
    assert list(sections) == ["prefill", "train", "decode", "memory"]
    for name, section in sections.items():
        assert section["rows"], name
        for row in section["rows"]:
            assert ROW_KEYS[name] <= set(row), (name, set(ROW_KEYS[name]) - set(row))
            numbers = [v for k, v in row.items() if isinstance(v, float) and k != "noise"]
            assert all(math.isfinite(x) and x >= 0 for x in numbers), row
    for row in sections["prefill"]["rows"] + sections["train"]["rows"]:
        assert row["ideal_cost_ratio"] == pytest.approx(ideal_cost_ratio(row["global_fraction"], row["window"], row["n"]))
        assert row["speedup"] == pytest.approx(1 / row["cost_ratio"])
    assert {r["rho"] for r in sections["prefill"]["rows"]} == {0.07, 1.0}


def _serve_point(tokens_per_s: float, requests: list[tuple[float, int]]) -> dict:
    generated = sum(tokens for _, tokens in requests)
    return {"wall_s": generated / tokens_per_s, "tokens_per_s": tokens_per_s, "generated": generated,
            "requests": [{"latency_s": latency, "tokens": tokens, "prompt_tokens": 100} for latency, tokens in requests]}


def test_a_serve_row_is_one_round_its_speedup_its_tokens_per_s_ratio_and_latency_fair():
    """The serve table's columns agree: the row is the round of the median speedup (the old rows put
    medians of each column beside the median of the per-round ratios: 18.24 vs 19.40 tok/s beside
    1.02), and latency counts only the requests that generated as many tokens on both servers."""
    from aha.benchmarking.serve import _summarise

    rounds = [
        {"aha": _serve_point(10.0, [(1.0, 8), (2.0, 8)]), "sdpa": _serve_point(9.0, [(1.5, 8), (3.0, 8)])},
        {"aha": _serve_point(11.0, [(1.0, 8), (1.2, 3)]), "sdpa": _serve_point(8.0, [(1.6, 8), (3.2, 8)])},  # early stop
        {"aha": _serve_point(9.0, [(1.1, 8), (2.2, 8)]), "sdpa": _serve_point(9.5, [(1.4, 8), (2.9, 8)])},
    ]
    row = _summarise(rounds)
    assert row["speedup"] == pytest.approx(10.0 / 9.0)  # the median of 1.11, 1.375, 0.947: round 1
    assert row["speedup"] == pytest.approx(row["aha_tokens_per_s"] / row["sdpa_tokens_per_s"])
    assert (row["speedup_min"], row["speedup_max"]) == (pytest.approx(9.0 / 9.5), pytest.approx(11.0 / 8.0))
    assert row["latency_requests"] == 2 and row["aha_p99_s"] == 2.0 and row["sdpa_p50_s"] == 1.5
    unfair = _summarise([rounds[1]])
    assert unfair["latency_requests"] == 1 and unfair["aha_p99_s"] == 1.0 and unfair["sdpa_p99_s"] == 1.6
    assert (unfair["aha_generated"], unfair["sdpa_generated"]) == (11, 16)


def test_sink_option_reaches_every_timed_call(tmp_path, monkeypatch):
    from aha.benchmarking import kernels

    sinks = []

    def recording(*args, sink=0, **kwargs):
        sinks.append(sink)
        return aha_attention(*args, sink=sink, **kwargs)

    monkeypatch.setattr(kernels, "aha_attention", recording)
    result = CliRunner().invoke(app, ["bench", "--quick", "--parts", "prefill,decode", "--sink", "2", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "sink 2" in result.output
    assert sinks and set(sinks) == {2}
    (path,) = tmp_path.glob("bench-*.json")
    rows = [row for section in json.loads(path.read_text())["groups"]["kernels"] for row in section["rows"]]
    assert rows and all(row["sink"] == 2 for row in rows)


def test_each_cpp_row_names_its_microkernel(tmp_path):
    from aha.kernels.cpu_tuning import microkernel_name

    impls = [f"cpp:{m}" for m in ("vector", "onednn") if microkernel_name(torch.float32, m)] + ["split"]
    result = CliRunner().invoke(app, ["bench", "--quick", "--parts", "prefill", "--impl", ",".join(impls), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("bench-*.json")
    rows = json.loads(path.read_text())["groups"]["kernels"][0]["rows"]
    labels = {row["impl"]: row["microkernel"] for row in rows}
    assert labels["split"] == "-"
    for impl in impls[:-1]:
        expected = microkernel_name(torch.float32, impl.split(":")[1])
        assert labels[impl] == expected and expected in result.output


def test_calibrate_cli_prints_and_caches_the_choice(monkeypatch, tmp_path):
    from aha.kernels import cpu_tuning
    from aha.kernels.cpu_tuning import CostModel, KernelChoice

    monkeypatch.setenv("AHA_CACHE_DIR", str(tmp_path))
    choice = KernelChoice(microkernel="vector", forward=CostModel((4096,), (1.5,), (0.24,), (1.05,)))
    monkeypatch.setattr(cpu_tuning, "calibrate", lambda dtype, lengths: choice)
    monkeypatch.setattr(cpu_tuning, "_choices", {})
    result = CliRunner().invoke(app, ["calibrate", "--dtype", "bfloat16"])
    if not cpu_tuning.load_cpp_kernel():
        assert result.exit_code != 0 and "unavailable" in result.output
        return
    assert result.exit_code == 0, result.output
    assert "bfloat16" in result.output and "never" in result.output  # train: no model, never split
    assert cpu_tuning.KernelChoice.from_json(cpu_tuning.tuning_path(torch.bfloat16).read_text()) == choice
    bad = CliRunner().invoke(app, ["calibrate", "--dtype", "float64"])
    assert bad.exit_code != 0 and "unknown dtype" in bad.output


def test_user_errors_end_in_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    from aha.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1\n")
    for argv, expected in (
        (["train", "--config", str(bad)], "bad.yaml:2 is not valid YAML"),  # a usage error, as typer shows them
        (["eval", "--model", str(tmp_path / "nowhere")], "aha: error: no model folder at"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        err = " ".join(capsys.readouterr().err.replace("│", " ").split())
        assert stop.value.code == 2 and expected in err and "Traceback" not in err
    with pytest.raises(FileNotFoundError, match="no model folder"):
        main(["eval", "--model", str(tmp_path / "nowhere"), "--debug"])


def test_a_value_error_from_outside_aha_is_a_bug_with_its_traceback(monkeypatch, capsys):
    """Every ValueError once read as a user error (one line, exit 2), so bugs in torch or aha's use of it hid."""
    from aha.cli import main
    from aha.cli import bench as bench_cli

    def raises_inside_json(*args, **kwargs):
        json.loads("{")  # json.JSONDecodeError, a ValueError raised in the standard library

    monkeypatch.setattr(bench_cli, "replace", raises_inside_json)
    with pytest.raises(json.JSONDecodeError):
        main(["bench", "--quick"])

    from aha.kernels.cpu_tuning import KernelChoice

    monkeypatch.setattr(bench_cli, "replace", lambda *args, **kwargs: KernelChoice(microkernel="amx"))  # aha's own check
    with pytest.raises(SystemExit) as stop:
        main(["bench", "--quick"])
    assert stop.value.code == 2 and "aha: error: unknown microkernel 'amx'" in capsys.readouterr().err
