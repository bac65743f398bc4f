"""The window sweep: one short training run and one evaluation per window, resumable, with its plot."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from test_eval import char_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from aha.cli import app
from aha.data.passkey import load_haystack
from aha.recipes import finetune
from aha.recipes.sweep import run_sweep
from aha.train import TrainConfig


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    """A tiny plain Llama and a folder of texts, with a 2-step training recipe."""
    monkeypatch.setenv("AHA_CACHE_DIR", str(tmp_path / "cache"))
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
    ))
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    haystack = load_haystack()
    (tmp_path / "texts").mkdir()
    for i in range(12):
        (tmp_path / "texts" / f"doc{i}.txt").write_text(haystack[i * 3000 : (i + 1) * 3000])
    return TrainConfig(
        model=str(tmp_path / "base"), data=[str(tmp_path / "texts")], heldout_fraction=0.3, seq_len=64,
        steps=2, grad_accum=1, warmup_steps=0, lambda_init=0.05, router_init="random", checkpoint_every=1, progress=False,
    )


@pytest.mark.slow
def test_sweep_trains_evaluates_plots_and_resumes(recipe, tmp_path, capsys, monkeypatch):
    out = tmp_path / "sweep"
    lines: list[str] = []
    result = run_sweep(recipe, [8, 4], out, eval_sequences=3, progress=False, log=lines.append)
    assert [p.window for p in result.points] == [4, 8]
    assert all(0.0 < p.global_fraction < 1.0 for p in result.points)  # random routers, learned routes used
    assert all(p.compute_ratio < 1.0 and p.perplexity > 1.0 for p in result.points)
    assert (out / "long_tail.png").stat().st_size > 1000
    assert not (out / "w4" / "checkpoints").exists()  # finished windows keep their model, not the resume state
    saved = json.loads((out / "sweep.json").read_text())
    assert [p["window"] for p in saved["points"]] == [4, 8]
    assert saved["reference_perplexity"] == pytest.approx(result.reference_perplexity)
    assert saved["meta"]["seed"] == recipe.seed and saved["recipe"]["steps"] == recipe.steps and "git_commit" in saved["meta"]
    for point in saved["points"]:  # each window against its own weights forced global, with the interval
        change = point["vs_full"]
        assert change["change"] == pytest.approx(point["perplexity"] / point["full_attention_perplexity"] - 1)
        assert change["low"] <= change["change"] <= change["high"] and change["sequences"] == 3

    # a finished sweep is not redone
    lines.clear()
    again = run_sweep(recipe, [4, 8], out, eval_sequences=3, progress=False, log=lines.append)
    assert again.points == result.points
    assert not any("training" in line or "evaluating" in line for line in lines), lines

    # Ctrl-C during a window's training loses nothing: the rerun resumes from its last checkpoint
    shutil.rmtree(out / "w8")
    save_checkpoint = finetune.save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        save_checkpoint(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(finetune, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(recipe, [4, 8], out, eval_sequences=3, progress=False, log=lines.append)
    assert (out / "w8" / "checkpoints" / "step-00000001").is_dir() and not (out / "w8" / "model").exists()
    monkeypatch.setattr(finetune, "save_checkpoint", save_checkpoint)
    lines.clear()
    capsys.readouterr()
    resumed = run_sweep(recipe, [4, 8], out, eval_sequences=3, progress=False, log=lines.append)
    assert any("window 8: training" in line for line in lines) and not any("window 4: training" in line for line in lines)
    assert "step-00000001" in capsys.readouterr().out  # the trainer says "resumed from .../step-00000001"
    rows = [json.loads(r) for r in (out / "w8" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert resumed.points == result.points  # CPU fp32 resume is exact


def test_sweep_refuses_a_target_global_fraction(recipe, tmp_path):
    recipe.target_global = 0.1
    with pytest.raises(ValueError, match="fixed sparsity weight"):
        run_sweep(recipe, [4, 8], tmp_path / "sweep")


def test_aha_sweep_cli_reports_a_bad_recipe(recipe, tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(f"model: {recipe.model}\ntarget_global: 0.1\n")
    result = CliRunner().invoke(app, ["sweep", "--config", str(config), "--windows", "4,8", "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "--lambda-init" in result.output
    result = CliRunner().invoke(app, ["sweep", "--windows", "4,x", "--out", str(tmp_path / "s")])
    assert result.exit_code != 0 and "comma-separated integers" in result.output


def _finished_sweep(folder, sink: int, points: list[tuple[int, float, float]]):
    (folder / "w8").mkdir(parents=True)
    (folder / "w8" / "config.yaml").write_text(f"window: 8\nsink: {sink}\n")
    rows = [{"window": w, "global_fraction": g, "perplexity": p} for w, g, p in points]
    (folder / "sweep.json").write_text(json.dumps({"reference_perplexity": 20.0, "points": rows}))
    return folder


def test_aha_sweep_compare_draws_finished_sweeps_in_one_plot(tmp_path):
    pure = _finished_sweep(tmp_path / "pure", 0, [(8, 0.6, 30.0), (16, 0.4, 25.0), (32, 0.3, 23.0)])
    sink = _finished_sweep(tmp_path / "sink", 1, [(8, 0.2, 22.0), (16, 0.1, 21.0)])
    result = CliRunner().invoke(app, ["sweep", "--compare", f"{pure},{sink}", "--out", str(tmp_path / "both")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "both" / "long_tail.png").stat().st_size > 1000
    assert not (tmp_path / "both" / "w8").exists()  # nothing trained
    for compare, out, message in [
        (f"{pure},{pure}", tmp_path / "x", "same operator"),
        (f"{pure},{sink}", pure, "one of the compared sweeps"),
        (f"{pure},{tmp_path / 'both'}", tmp_path / "x", "holds no sweep.json"),
    ]:
        result = CliRunner().invoke(app, ["sweep", "--compare", compare, "--out", str(out)])
        assert result.exit_code != 0 and message in " ".join(result.output.replace("│", " ").split()), result.output
