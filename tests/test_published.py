"""Published numbers trace to committed reports: the ``meta`` of every report, strict JSON, and
``aha report render`` / ``check`` over README.md, benchmarks/RESULTS.md and docs/."""

import json
import re
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from aha.cli import app
from aha.kernels.cpu_tuning import ISA_LIMIT_VARIABLES
from aha.report.provenance import git_state, run_meta, strict_json, write_json_report
from aha.report.published import check_text, published_files, render_files, render_text

ROOT = Path(__file__).resolve().parent.parent
TABLE = """intro
<!-- aha:table
{% set run = report("results/bench.json") %}
| n | speedup |
|---|---|
{% for row in run.rows("kernels", "prefill", dtype="float32") %}
| {{ row.n }} | {{ row.speedup | fmt(".2f") }}x |
{% endfor %}
-->
| n | speedup |
|---|---|
| 4096 | 1.00x |
<!-- aha:end -->
outro
"""


@pytest.fixture
def root(tmp_path: Path) -> Path:
    rows = [{"n": 4096, "dtype": "float32", "speedup": 4.5751}, {"n": 16384, "dtype": "float32", "speedup": 9.4}, {"n": 4096, "dtype": "bfloat16", "speedup": 4.2}]
    write_json_report(tmp_path / "results" / "bench.json", {"groups": {"kernels": [{"name": "prefill", "rows": rows}]}})
    return tmp_path


def test_the_published_tables_match_their_committed_reports():
    """What `make test` checks: every table block of README.md, benchmarks/RESULTS.md and docs/ renders
    from its committed report(s) to exactly the numbers printed."""
    files = published_files(ROOT)
    assert ROOT / "README.md" in files and ROOT / "benchmarks" / "RESULTS.md" in files
    problems = render_files(files, ROOT, write=False)
    assert not any(problems.values()), "\n".join(f"{path.name}: {p}" for path, found in problems.items() for p in found)
    assert sum(len(re.findall("<!-- aha:table", path.read_text())) for path in files) >= 10


def test_render_rewrites_the_table_from_its_report_and_check_then_passes(root):
    rendered, problems = render_text(TABLE, root)
    assert problems == []
    assert rendered.startswith("intro\n<!-- aha:table\n") and rendered.endswith("| 4096 | 4.58x |\n| 16384 | 9.40x |\n<!-- aha:end -->\noutro\n")
    assert check_text(rendered, root) == []
    assert render_text(rendered, root)[0] == rendered  # rendering is idempotent


def test_check_names_the_number_that_differs_from_its_report(root):
    rendered, _ = render_text(TABLE, root)
    problems = check_text(rendered.replace("| 16384 | 9.40x |", "| 16384 | 9.50x |"), root)
    assert len(problems) == 1 and "'| 16384 | 9.50x |' should be '| 16384 | 9.40x |'" in problems[0]
    assert problems[0].startswith("line 2:")


def test_check_fails_when_a_named_report_is_missing_or_not_strict_json(root):
    (root / "results" / "bench.json").unlink()
    assert "report results/bench.json is missing" in check_text(TABLE, root)[0]
    (root / "results" / "bench.json").write_text('{"groups": {}, "x": NaN}')
    assert "not strict JSON" in check_text(TABLE, root)[0]


def test_check_fails_on_a_block_without_a_report_or_a_broken_template(root):
    constant = "<!-- aha:table\n| a |\n|---|\n| 1 |\n-->\n| a |\n|---|\n| 1 |\n<!-- aha:end -->\n"
    assert check_text(constant, root) == ["line 1: the block names no report"]
    broken = TABLE.replace('rows("kernels", "prefill", dtype="float32")', 'rows("kernels", "decode")')
    assert "has no section kernels/decode" in check_text(broken, root)[0]
    ambiguous = TABLE.replace('{% for row in run.rows("kernels", "prefill", dtype="float32") %}', '{% for row in [run.row("kernels", "prefill", n=4096)] %}')
    assert "2 rows match" in check_text(ambiguous, root)[0]


def test_a_block_inside_a_list_keeps_its_indentation(root):
    indented = "- item\n\n" + "".join(f"  {line}\n" if line else "\n" for line in TABLE.splitlines()[1:-1])
    rendered, problems = render_text(indented, root)
    assert problems == [] and "\n  | 16384 | 9.40x |\n  <!-- aha:end -->" in rendered


def test_report_cli_render_and_check(root):
    page = root / "RESULTS.md"
    page.write_text(TABLE)
    runner = CliRunner()
    failed = runner.invoke(app, ["report", "check", str(page), "--root", str(root)])
    assert failed.exit_code == 1 and "should be" in failed.output
    assert runner.invoke(app, ["report", "render", str(page), "--root", str(root)]).exit_code == 0
    assert "| 16384 | 9.40x |" in page.read_text()
    assert runner.invoke(app, ["report", "check", str(page), "--root", str(root)]).exit_code == 0


def test_run_meta_records_code_command_seed_machine_and_versions():
    meta = run_meta(seed=7, command="aha eval --seed 7")
    commit, dirty = git_state()
    assert meta["git_commit"] == commit and meta["git_dirty"] == dirty
    if (ROOT / ".git").exists():
        assert re.fullmatch("[0-9a-f]{40}", commit) and isinstance(dirty, bool)
    assert meta["command"] == "aha eval --seed 7" and meta["seed"] == 7
    for key in ("date", "cpu", "isa", "isa_flags", "threads", "torch", "transformers", "accelerate", "aha", "kernel_sources_sha256"):
        assert meta[key] is not None, key
    json.loads(strict_json({"meta": meta}))


def test_run_meta_names_the_settings_that_capped_the_instruction_set(monkeypatch):
    for name in ISA_LIMIT_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert run_meta()["isa_limits"] == {}
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_VNNI")
    monkeypatch.setenv("AHA_CPU_ARCH", "icelake-server")
    assert run_meta()["isa_limits"] == {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI", "AHA_CPU_ARCH": "icelake-server"}


def test_reports_written_through_the_cli_name_the_aha_command_line():
    seen = []

    @app.command("meta-probe", hidden=True)
    def probe(seed: int = 0) -> None:
        seen.append(run_meta(seed=seed)["command"])

    try:
        result = CliRunner().invoke(app, ["meta-probe", "--seed", "3"])  # inside pytest: sys.argv is pytest's
    finally:
        app.registered_commands.pop()
    assert result.exit_code == 0, result.output
    assert seen == ["aha meta-probe --seed 3"]
    assert run_meta()["command"] != seen[0]  # cleared once the command ends


def test_git_state_outside_a_checkout_is_unknown_not_an_error(tmp_path):
    assert git_state(tmp_path) == (None, None)
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "site-packages").mkdir()
    assert git_state(tmp_path / "site-packages") == (None, None)  # installed inside some other repository


def test_reports_are_strict_json(tmp_path):
    path = write_json_report(tmp_path / "r.json", {"ratio": float("nan"), "rows": [{"x": float("inf")}, (1, 2)]})
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["ratio"] is None and json.loads(text)["rows"][0]["x"] is None
    assert json.loads(text)["non_finite"] == {"ratio": "nan", "rows[0].x": "inf"}  # no value silently lost
