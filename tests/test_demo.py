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
    assert "| original model (full attention) |" in (out / "README.md").read_text()

    trained = (out / "run" / "summary.json").stat().st_mtime
    second = runner.invoke(app, ["demo", "--quick", "--out", str(out)])
    assert second.exit_code == 0, second.output
    assert (out / "run" / "summary.json").stat().st_mtime == trained  # training was not redone
