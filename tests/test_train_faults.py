"""Faults around training checkpoints: hostile, corrupted and partial files, torn logs, kill -9."""

import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import COPY_VOCAB, EXACT_KEYS, toy_config, train_rows
from train_support import copy_task, tiny_llama

from aha.train import train
from aha.train.checkpoint import MANIFEST, CheckpointError, list_checkpoints
from aha.train.step import Stepper


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def config(out: Path, steps: int = 6):
    return toy_config(out, steps=steps, batch_size=4, lr=3e-3, target_global=0.5, checkpoint_every=2, keep_checkpoints=3)


class Exploit:
    """Unpickling this creates ``marker``: what a hostile file in a shared run folder would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def run(out: Path, data, steps: int = 6):
    return train(config(out, steps), model=tiny_llama(vocab_size=COPY_VOCAB), data=data)


def final_weights_equal(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return all(torch.equal(sa[name], sb[name]) for name in sa)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, copy_data):
    return run(tmp_path_factory.mktemp("straight"), copy_data)


def interrupted_run(out: Path, data) -> list[Path]:
    """A 6-step run killed during step 5: checkpoints 2 and 4 exist, step 5 was not logged."""
    real_step = Stepper.step

    def killed_in_step_5(self, progress):
        if progress.step == 4:
            raise KeyboardInterrupt
        return real_step(self, progress)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(Stepper, "step", killed_in_step_5)
        with pytest.raises(KeyboardInterrupt):
            run(out, data)
    return list_checkpoints(out / "checkpoints")


@pytest.mark.parametrize(
    "damage", ["model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "trainer_state.json", MANIFEST]
)
@pytest.mark.parametrize("how", ["exploit", "truncate", "empty"])
def test_a_damaged_newest_checkpoint_is_skipped_and_never_executed(tmp_path, copy_data, straight, capsys, damage, how):
    out = tmp_path / "run"
    _, newest = interrupted_run(out, copy_data)
    marker = tmp_path / "pwned"
    target = newest / damage
    if how == "exploit":
        target.write_bytes(pickle.dumps(Exploit(marker)))
    elif how == "truncate":
        target.write_bytes(target.read_bytes()[: max(1, target.stat().st_size // 2)])
    else:
        target.write_bytes(b"")
    resumed = run(out, copy_data)
    assert not marker.exists(), "a file in the checkpoint ran code"
    assert f"skipping damaged checkpoint {newest}" in capsys.readouterr().out
    assert [row["step"] for row in resumed.history] == [3, 4, 5, 6]  # resumed from the older one
    assert final_weights_equal(resumed, straight)
    assert [r["step"] for r in train_rows(out)] == list(range(1, 7))


def test_planted_custom_pickles_are_never_loaded(tmp_path, copy_data, straight, capsys):
    """accelerate unpickles registered custom objects with weights_only=False: the trainer registers
    none, and a checkpoint holding files its manifest does not list is skipped before any load."""
    out = tmp_path / "run"
    _, newest = interrupted_run(out, copy_data)
    marker = tmp_path / "pwned"
    for index in range(3):
        (newest / f"custom_checkpoint_{index}.pkl").write_bytes(pickle.dumps(Exploit(marker)))
    resumed = run(out, copy_data)
    assert not marker.exists()
    assert "custom_checkpoint_0.pkl is not in the manifest" in capsys.readouterr().out
    assert [row["step"] for row in resumed.history] == [3, 4, 5, 6] and final_weights_equal(resumed, straight)


def test_no_loadable_checkpoint_is_a_clear_error(tmp_path, copy_data):
    out = tmp_path / "run"
    for checkpoint in interrupted_run(out, copy_data):
        (checkpoint / "optimizer.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be loaded(.|\n)*optimizer.bin(.|\n)*new --out"):
        run(out, copy_data)


def test_a_torn_metrics_line_and_a_rerun_before_any_checkpoint(tmp_path, copy_data, straight):
    out = tmp_path / "run"
    interrupted_run(out, copy_data)
    with (out / "metrics.jsonl").open("a") as fh:
        fh.write('{"kind": "train", "step": 5, "lo')  # killed mid-write
    resumed = run(out, copy_data)
    assert [r["step"] for r in train_rows(out)] == list(range(1, 7)) and final_weights_equal(resumed, straight)

    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "metrics.jsonl").write_text(json.dumps({"kind": "train", "step": 1}) + "\n")  # killed before checkpoint 2
    run(fresh, copy_data)
    assert [r["step"] for r in train_rows(fresh)] == list(range(1, 7))


_CHILD = """
import sys, torch
sys.path.insert(0, sys.argv[2])
torch.set_num_threads(1)
from pathlib import Path
from test_train_faults import config, COPY_VOCAB
from train_support import copy_task, tiny_llama
from aha.train import train
train(config(Path(sys.argv[1]), steps=12), model=tiny_llama(vocab_size=COPY_VOCAB), data=copy_task(400, block=12))
"""


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_gives_the_same_weights(tmp_path, copy_data):
    """SIGKILL (no handler runs) at seeded random moments of a real run; the finished run equals a straight one."""
    straight = run(tmp_path / "straight", copy_data, steps=12)
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    rng = random.Random(0)
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", _CHILD, str(out), str(Path(__file__).parent)], env=env)
        time.sleep(rng.uniform(4.0, 9.0))  # imports take a few seconds, then a step is ~0.1 s
        child.send_signal(signal.SIGKILL)
        child.wait()
    resumed = train(config(out, steps=12), model=tiny_llama(vocab_size=COPY_VOCAB), data=copy_data)
    assert [r["step"] for r in train_rows(out)] == list(range(1, 13))
    for a, b in zip(train_rows(tmp_path / "straight"), train_rows(out)):
        assert {k: a[k] for k in EXACT_KEYS} == {k: b[k] for k in EXACT_KEYS}
    assert final_weights_equal(resumed, straight)
    final = load_file(str(out / "model" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in final.values())


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"router_lr": float("inf")}, "router_lr must be a finite number"),
        ({"weight_decay": -0.1}, "weight_decay must be >= 0"),
        ({"distill": -1.0}, "distill must be >= 0"),
        ({"warmup_steps": -3}, "warmup_steps"),
        ({"heldout_fraction": 1.0}, "heldout_fraction must be in"),
        ({"steps": 2.5}, "steps must be an integer"),
        ({"lr": 0.0, "router_lr": 0.0}, "nothing would train"),
        ({"keep_checkpoints": 0}, "keep_checkpoints"),
    ],
)
def test_nonsense_training_settings_are_refused(tmp_path, change, message):
    with pytest.raises(ValueError, match=message):
        toy_config(tmp_path, **change)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, copy_data, monkeypatch):
    out = tmp_path / "run"
    real_step = Stepper.step

    def diverging(self, progress):
        row = real_step(self, progress)
        return {**row, "loss": float("nan")} if progress.step == 3 else row

    monkeypatch.setattr(Stepper, "step", diverging)
    with pytest.raises(FloatingPointError, match="loss became nan at step 3(.|\n)*step-00000002(.|\n)*Lower --lr"):
        run(out, copy_data)
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-00000002"]
    assert not (out / "model").exists()


def test_a_sequence_longer_than_the_model_was_trained_for_is_flagged(tmp_path):
    data = copy_task(40, block=300)  # 601-token documents
    model = tiny_llama(vocab_size=COPY_VOCAB)
    assert model.config.max_position_embeddings == 512
    with pytest.warns(UserWarning, match="--seq-len 601 exceeds the model's max_position_embeddings"):
        train(toy_config(tmp_path, steps=1, seq_len=601, batch_size=1), model=model, data=data)
