"""Faults around training checkpoints: hostile, corrupted and partial files, torn logs, kill -9."""

import errno
import io
import json
import os
import pickle
import random
import re
import shutil
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

from aha._cache import write_manifest
from aha.train import train
from aha.train.checkpoint import (
    MANIFEST,
    CheckpointError,
    DiskFullError,
    list_checkpoints,
)
from aha.train.step import Stepper


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def config(out: Path, steps: int = 6, **changes):
    settings = {"steps": steps, "batch_size": 4, "lr": 3e-3, "target_global": 0.5, "checkpoint_every": 2, "keep_checkpoints": 3}
    return toy_config(out, **{**settings, **changes})


class Exploit:
    """Unpickling this creates ``marker``: what a hostile file in a shared run folder would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def run(out: Path, data, steps: int = 6, **changes):
    return train(config(out, steps, **changes), model=tiny_llama(vocab_size=COPY_VOCAB), data=data)


def final_weights_equal(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return all(torch.equal(sa[name], sb[name]) for name in sa)


@pytest.fixture(scope="module")
def straight(tmp_path_factory, copy_data):
    return run(tmp_path_factory.mktemp("straight"), copy_data)


def interrupted_run(out: Path, data, **changes) -> list[Path]:
    """A 6-step run killed during step 5: checkpoints 2 and 4 exist, step 5 was not logged."""
    real_step = Stepper.step

    def killed_in_step_5(self, progress):
        if progress.step == 4:
            raise KeyboardInterrupt
        return real_step(self, progress)

    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(Stepper, "step", killed_in_step_5)
        with pytest.raises(KeyboardInterrupt):
            run(out, data, **changes)
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


def strict_json_line(text: str):
    """``text`` parsed as standard JSON: NaN and Infinity, which strict parsers reject, fail the test."""

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def strict_json(path: Path):
    return strict_json_line(path.read_text())


@pytest.mark.parametrize("where", ["mid-run", "at the end"])
def test_the_summary_after_a_resume_equals_the_uninterrupted_runs(tmp_path, copy_data, where):
    """The achieved global fraction averages the run's last steps from metrics.jsonl, steps before the resume
    included: a resume mid-run, or at the end (killed after the last checkpoint), reports what the straight run did."""
    straight = run(tmp_path / "straight", copy_data, router_init="random")
    assert len({row["global_fraction"] for row in straight.history[-2:]}) == 2  # an average of fewer steps would differ
    out = tmp_path / "run"
    if where == "mid-run":
        interrupted_run(out, copy_data, router_init="random")
    else:
        run(out, copy_data, router_init="random")
    resumed = run(out, copy_data, router_init="random")
    assert [row["step"] for row in resumed.history] == ([5, 6] if where == "mid-run" else [])
    summary, expected = strict_json(out / "summary.json"), strict_json(straight.out / "summary.json")
    assert summary["achieved_global_fraction_train"] == expected["achieved_global_fraction_train"] == straight.achieved_global
    assert resumed.achieved_global == straight.achieved_global
    assert summary["achieved_global_fraction_steps"] == {"first": 1, "last": 6, "count": 6}
    assert {k: v for k, v in summary.items() if k not in ("config", "meta")} == {k: v for k, v in expected.items() if k not in ("config", "meta")}


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
    last = [strict_json_line(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["step"] == 3 and last["loss"] is None and last["non_finite"] == {"loss": "nan"}


def test_a_sequence_longer_than_the_model_was_trained_for_is_flagged(tmp_path):
    data = copy_task(40, block=300)  # 601-token documents
    model = tiny_llama(vocab_size=COPY_VOCAB)
    assert model.config.max_position_embeddings == 512
    with pytest.warns(UserWarning, match="--seq-len 601 exceeds the model's max_position_embeddings"):
        train(toy_config(tmp_path, steps=1, seq_len=601, batch_size=1), model=model, data=data)


def _full_disk_on(monkeypatch, module, name: str, when, error: Exception | None = None):
    """Make ``module.name`` (a writer) fail as on a full disk for the files ``when(path)`` selects: raise ``error``
    (default: OSError ENOSPC) after writing what fitted; with ``error``, the disk then reports no free space."""
    real = getattr(module, name)
    real_usage = shutil.disk_usage

    def writer(obj, path, *args, **kwargs):
        if when(str(path)):
            Path(path).write_bytes(b"\0" * 64)  # what fitted before the disk filled up
            if error is not None:
                monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=0) if Path(path).exists() else real_usage(p))
                raise error
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(obj, path, *args, **kwargs)

    monkeypatch.setattr(module, name, writer)


@pytest.mark.parametrize("error", [None, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")],
                         ids=["ENOSPC", "torch.save-on-a-full-disk"])
def test_a_full_disk_while_saving_a_checkpoint_is_one_clear_error_and_keeps_the_previous_one(tmp_path, copy_data, straight, monkeypatch, error):
    out = tmp_path / "run"
    reported = "OSError: .*No space left on device.*" if error is None else "RuntimeError: .*unexpected pos 704 vs 598"
    with monkeypatch.context() as patched:
        _full_disk_on(patched, torch, "save", lambda path: "step-00000006" in path and path.endswith("optimizer.bin"), error)
        with pytest.raises(DiskFullError, match=rf"the disk is full: saving checkpoint step-00000006 to .*checkpoints failed "
                           rf"\({reported}\); .*B free there now\. The previous checkpoint, step-00000004, "
                           r"is intact \(.*B\); nothing was deleted\. Free some space and run the same command again") as full:
            run(out, copy_data)
    assert full.value.__suppress_context__  # one message, not a chain of tracebacks
    checkpoints = out / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000002", "step-00000004"]
    assert not list(checkpoints.glob(".tmp-*")) and not (out / "model").exists()  # the half-written folder is gone
    assert final_weights_equal(run(out, copy_data), straight)


def test_the_final_model_is_written_whole_or_not_at_all(tmp_path, copy_data, straight, monkeypatch):
    """model/ is staged and renamed into place: a full disk while writing it leaves no half model/ (and an earlier one
    as it was), with a clear error; the rerun writes it."""
    import transformers.modeling_utils

    def fail_the_model_save(patched):
        _full_disk_on(patched, transformers.modeling_utils, "safe_save_file", lambda path: "checkpoints" not in path)

    out = tmp_path / "run"
    with monkeypatch.context() as patched:
        fail_the_model_save(patched)
        with pytest.raises(DiskFullError, match=r"saving the final model to .*model failed .*B free there now\. Training is "
                           "complete and its last checkpoint, step-00000006, is intact"):
            run(out, copy_data)
    assert not (out / "model").exists() and not list(out.glob(".tmp-*")) and not (out / "summary.json").exists()

    run(out, copy_data)  # resumes at the end
    saved = (out / "model" / "model.safetensors").read_bytes()
    assert saved == (straight.out / "model" / "model.safetensors").read_bytes()
    with monkeypatch.context() as patched:
        fail_the_model_save(patched)
        with pytest.raises(DiskFullError):
            run(out, copy_data)
    assert (out / "model" / "model.safetensors").read_bytes() == saved and (out / "model" / "config.json").exists()


def _damage_consistently(checkpoint: Path, name: str, content: bytes | None) -> None:
    """Replace (None: delete) a file of ``checkpoint`` and rewrite its manifest to match, as a tool or a person could."""
    manifest = json.loads((checkpoint / MANIFEST).read_text())
    if content is None:
        (checkpoint / name).unlink()
    else:
        (checkpoint / name).write_bytes(content)
    write_manifest(checkpoint, MANIFEST, format=manifest["format"], step=manifest["step"])


def _half_restorable(states_file: Path) -> bytes:
    """The RNG states file with a broken NumPy state: accelerate restores Python's generator, then gives up."""
    states = torch.load(states_file, weights_only=False)  # the test's own file
    states["numpy_random_seed"] = ("MT19937",)
    buffer = io.BytesIO()
    torch.save(states, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("how", ["not-loadable", "exploit", "missing", "partly"])
def test_rng_states_that_cannot_be_restored_stop_the_resume(tmp_path, copy_data, how):
    """accelerate skips RNG states it cannot load with an INFO log line only: the resume would not be exact."""
    out = tmp_path / "run"
    _, newest = interrupted_run(out, copy_data)
    marker = tmp_path / "pwned"
    content = {
        "not-loadable": b"not a pickle",
        "exploit": pickle.dumps(Exploit(marker)),
        "missing": None,
        "partly": _half_restorable(newest / "random_states_0.pkl"),
    }[how]
    _damage_consistently(newest, "random_states_0.pkl", content)
    expected = "random_states_0.pkl" + {"not-loadable": " does not load", "exploit": " does not load", "missing": " is missing",
                                        "partly": ": numpy_random_seed.* not restored"}[how]
    with pytest.raises(CheckpointError, match=rf"{newest} is intact, but its RNG states were not restored \(process 0: "
                       rf"{expected}.*would not be exact .*The checkpoint is kept") as refused:
        run(out, copy_data)
    assert re.search(r"\brandom_state\b", str(refused.value)) is None  # Python's generator was restored when it could be
    assert not marker.exists() and (newest / "random_states_0.pkl").exists() == (how != "missing")


def test_an_intact_checkpoint_that_fails_to_load_raises_its_error_and_nothing_is_called_damaged(tmp_path, copy_data, monkeypatch, capsys):
    """A checkpoint whose files match its manifest is not damaged: a load error (another accelerate version, a bug) is
    raised as it is, with a note, instead of skipping to older checkpoints and advising to delete the run."""
    from accelerate import Accelerator

    out = tmp_path / "run"
    interrupted_run(out, copy_data)
    calls = []

    def incompatible(self, path, **kwargs):
        calls.append(Path(path).name)
        raise KeyError("param_groups")

    monkeypatch.setattr(Accelerator, "load_state", incompatible)
    with pytest.raises(KeyError, match="param_groups") as failed:
        run(out, copy_data)
    assert calls == ["step-00000004"]
    assert "skipping damaged" not in capsys.readouterr().out
    (note,) = failed.value.__notes__
    assert "step-00000004 is intact" in note and "It is kept" in note and "Delete" not in note
