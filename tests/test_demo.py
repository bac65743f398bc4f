"""``aha demo --quick`` on the real offline model: every stage runs, the report is complete, re-runs resume."""

import json
import math

import pytest
from typer.testing import CliRunner

from aha.cli import app

pytestmark = pytest.mark.real_model


def test_quick_demo_writes_a_complete_report_and_resumes(tmp_path):
    out = tmp_path / "report"
    runner = CliRunner()
    first = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert first.exit_code == 0, first.output
    for name in ["README.md", "demo.json", "training.png", "eval/eval.json", "eval/token_view.html", "run/model/config.json"]:
        assert (out / name).exists(), name
    report = json.loads((out / "demo.json").read_text())
    variants = [row["variant"] for row in report["headline"]]
    assert len(variants) == 4 and variants[0].startswith("original")
    original, sliding = report["headline"][:2]
    assert original["vs_original"] == 0 and original["global_fraction"] == 1.0
    assert sliding["global_fraction"] == 0.0 and sliding["perplexity"] > original["perplexity"]
    assert all(math.isfinite(row["perplexity"]) for row in report["headline"])
    assert {row["phase"] for row in report["speed"]} == {"prefill", "decode"}
    assert report["meta"]["seed"] == 0 and "demo" in report["meta"]["command"]
    assert {"git_commit", "git_dirty", "cpu", "isa_flags", "torch", "transformers", "accelerate"} <= set(report["meta"])
    trained = report["headline"][2]
    assert trained["passkey_prompts"] == 2 and trained["passkey_low"] <= trained["passkey"] <= trained["passkey_high"]
    assert trained["vs_original_low"] <= trained["vs_original"] <= trained["vs_original_high"]
    assert original["vs_original_low"] is None  # the original against itself has no interval
    json.loads((out / "demo.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in demo.json"))
    readme = (out / "README.md").read_text()
    assert "vs original [95% CI]" in readme and "(n=2)" in readme
    assert "| original model (full attention) |" in readme
    assert "| sliding window (w=32) + 1 sink key, no training |" in readme  # the default keeps one sink key
    assert json.loads((out / "run" / "model" / "config.json").read_text())["aha"]["sink"] == 1

    trained_at = (out / "run" / "summary.json").stat().st_mtime
    second = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert (out / "run" / "summary.json").stat().st_mtime == trained_at  # training was not redone


def test_sliding_window_names_say_whether_the_sink_is_kept():
    from aha.report.markdown import sliding_window_name

    assert sliding_window_name(128, 0) == "pure sliding window (w=128), no training"
    assert sliding_window_name(128, 4) == "sliding window (w=128) + 4 sink keys, no training"


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ([], {"window": 128, "sink": 1, "seq_len": 512, "steps": 120, "target_global": 0.2}),
        (["--preset", "paper"], {"window": 256, "sink": 1, "seq_len": 1024, "steps": 200, "target_global": 0.1}),
        (["--preset", "paper", "--steps", "300"], {"window": 256, "seq_len": 1024, "steps": 300}),
    ],
)
def test_demo_presets_set_the_recipe_and_flags_override_them(monkeypatch, tmp_path, arguments, expected):
    seen = []
    monkeypatch.setattr("aha.recipes.demo.run_demo", seen.append)
    result = CliRunner().invoke(app, ["demo", *arguments, "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    train = seen[0].train_config()
    assert {name: getattr(train, name) for name in expected} == expected
    if "paper" in arguments:
        assert seen[0].passkey_lengths == (2048, 4096, 8192) and train.distill == 1.0
        assert len(seen[0].passkey_depths) * seen[0].passkey_offsets >= 100  # the published passkey grid


def test_quick_is_a_smoke_run_of_the_default_preset_only(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--quick", "--preset", "paper", "--out", str(tmp_path)], env={"COLUMNS": "240"})
    assert result.exit_code != 0 and "drop --quick or --preset" in result.output
