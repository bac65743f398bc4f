"""Sharded training (FSDP2 through accelerate) on CPU: 2 processes over gloo against 1 process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from train_support import char_tokenizer, save_tiny_model, tiny_llama

import aha
from aha.train import TrainConfig, iter_metrics, train
from aha.train.checkpoint import check_resume

# accelerate's FSDP options as `accelerate launch` takes them; ACCELERATE_USE_CPU=1 in the environment makes
# the processes join over gloo on CPU (aha.train.sharding turns the launch into FSDP2 there, see its docstring)
EXACT_KEYS = ("loss", "ce", "kd", "soft_gate", "global_fraction", "lambda", "lr_model", "lr_routers", "grad_norm", "targets_seen")
FSDP_LAUNCH = ["--use_fsdp", "--fsdp_version", "2", "--fsdp_auto_wrap_policy", "TRANSFORMER_BASED_WRAP",
               "--fsdp_reshard_after_forward", "true", "--fsdp_state_dict_type", "SHARDED_STATE_DICT"]


def _documents(folder):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        (folder / f"{i}.txt").write_text(" ".join(rng.choice(["ab", "cd", "ef", "gh"], size=int(rng.integers(10, 60)))))
    return folder


def _launch(tmp_path, config: dict, name: str, port: int, fsdp: list[str] = FSDP_LAUNCH, machines: int = 1) -> subprocess.CompletedProcess:
    """``accelerate launch`` of ``aha train`` with 2 processes in all, on ``machines`` simulated machines (one
    launcher per machine rank, over loopback); returns the machine-rank-0 launcher's result (any other's
    failure is reported in its stderr)."""
    env = {**os.environ, "AHA_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "1"}
    config_file = tmp_path / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(config))
    launches = [
        [sys.executable, "-m", "accelerate.commands.launch", *fsdp, "--num_processes", "2", "--num_machines", str(machines),
         "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
         "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "aha.cli", "train", "--config", str(config_file)]
        for rank in range(machines)
    ]  # fmt: skip
    # each its own session: a hung run (mismatched collectives) is killed with every worker, not left behind
    processes = [subprocess.Popen(launch, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
                 for launch in launches]  # fmt: skip
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=300))
        except subprocess.TimeoutExpired:
            for each in processes:
                os.killpg(each.pid, signal.SIGKILL)
            _, stderr = process.communicate()
            pytest.fail(f"the FSDP run hung for 300 s:\n{stderr[-3000:]}")
    returncode = next((p.returncode for p in processes if p.returncode), 0)
    stderr = "\n".join(err for _, err in outputs)
    return subprocess.CompletedProcess(launches[0], returncode, outputs[0][0], stderr)


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["all", "routers", "lora"])
def test_fsdp_two_processes_match_one_with_the_same_global_batch(tmp_path, trainable):
    """2 FSDP2 processes (parameters, gradients and optimizer state sharded) == 1 process, global batch of 4, with
    distillation (all: a sharded frozen teacher; routers and lora: the student with routes forced global, adapters
    off); the consolidated ``model/`` (lora: adapters merged on the main process) loads on one process and equals
    the 1-process model. Loaded with ``cpu_ram_efficient_loading``: process 1 builds the model empty and gets the main
    process's weights as it is sharded (every process reads the checkpoint in the resume test). routers runs on two
    simulated machines of one process each (machine 1's process is its machine's main but not the run's)."""
    if trainable == "all":  # router rows fused into q_proj (the released AHA-OLMO2 layout), random: they shard inside q_proj
        model_dir = tmp_path / "tiny"
        aha.convert(tiny_llama(), window=8, router_init="random", router_layout="fused").save_pretrained(model_dir)
        char_tokenizer().save_pretrained(model_dir)
    else:  # separate aha.Router modules (what routers-only training needs), converted by the trainer
        model_dir = save_tiny_model(tmp_path / "tiny")
    docs = _documents(tmp_path / "docs")
    routers = {"router_init": "random"} if trainable == "routers" else {}
    common = dict(model=str(model_dir), data=[str(docs)], window=8, seq_len=48, steps=4, batch_size=2, lr=3e-3, router_lr=3e-2,
                  target_global=0.5, lambda_init=1e-2, trainable=trainable, checkpoint_every=2, eval_every=2, eval_sequences=5,
                  heldout_fraction=0.3, distill=0.5, progress=False, precision="fp32", **routers)
    port = {"all": 29527, "routers": 29528, "lora": 29531}[trainable]
    loading = ["--fsdp_cpu_ram_efficient_loading", "true"]
    machines = 2 if trainable == "routers" else 1
    done = _launch(tmp_path, {**common, "grad_accum": 1, "out": str(tmp_path / "two")}, "two", port, FSDP_LAUNCH + loading, machines)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es), FSDP" in done.stdout and "the others build the model empty" in done.stdout, done.stdout[-2000:]

    os.environ["AHA_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        one = train(TrainConfig(**common, grad_accum=2, out=str(tmp_path / "one")))
    finally:
        del os.environ["AHA_CACHE_DIR"]
    rows_one, rows_two = list(iter_metrics(tmp_path / "one")), list(iter_metrics(tmp_path / "two"))
    assert [r["step"] for r in rows_two] == [r["step"] for r in rows_one] == [1, 2, 3, 4]
    for a, b in zip(rows_one, rows_two):
        assert a["targets_seen"] == b["targets_seen"] and a["global_fraction"] == b["global_fraction"]
        for key in ("loss", "ce", "kd", "soft_gate", "lambda", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), key
    evals_one = [r for r in iter_metrics(tmp_path / "one", kind="eval")]
    evals_two = [r for r in iter_metrics(tmp_path / "two", kind="eval")]
    # start, step 2, end; 5 sequences split 3 + 2: 2 batches of 2 on one process, 1 on the other, which repeats one
    # uncounted (a sharded forward is a collective)
    assert len(evals_one) == len(evals_two) == 3
    for a, b in zip(evals_one, evals_two):
        assert a["targets"] == b["targets"] and b["global_fraction"] == a["global_fraction"]
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)

    assert sorted(safe_open(tmp_path / "two" / "model" / "model.safetensors", "pt").keys()) == sorted(
        safe_open(tmp_path / "one" / "model" / "model.safetensors", "pt").keys())  # tied embeddings saved once
    saved, _ = aha.load_model(tmp_path / "two" / "model")
    saved_state = saved.state_dict()
    fused = trainable == "all"
    assert any(".q_proj.router." in name for name in saved_state) != fused
    for name, value in one.model.state_dict().items():
        assert torch.allclose(value, saved_state[name], atol=1e-5), name


@pytest.mark.slow
def test_fsdp_resume_after_a_kill_reproduces_the_uninterrupted_run(tmp_path):
    """Killed after step 4 was logged but before its checkpoint, a 2-process FSDP2 run resumes from the sharded
    checkpoint of step 2 and reproduces the uninterrupted rows and final model exactly."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    docs = _documents(tmp_path / "docs")
    config = {"model": str(model_dir), "data": [str(docs)], "window": 8, "seq_len": 48, "steps": 4, "batch_size": 2, "grad_accum": 1,
              "lr": 3e-3, "router_lr": 3e-2, "target_global": 0.5, "lambda_init": 1e-2, "checkpoint_every": 2, "keep_checkpoints": 3,
              "eval_every": -1, "progress": False, "precision": "fp32", "out": str(tmp_path / "straight")}
    done = _launch(tmp_path, config, "straight", 29529)
    assert done.returncode == 0, done.stderr[-3000:]

    killed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", killed)
    for leftover in (killed / "checkpoints" / "step-00000004", killed / "model"):
        shutil.rmtree(leftover)
    (killed / "summary.json").unlink()
    done = _launch(tmp_path, {**config, "out": str(killed)}, "resumed", 29529)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stdout and "(step 2)" in done.stdout, done.stdout[-2000:]

    rows_straight, rows_resumed = list(iter_metrics(tmp_path / "straight")), list(iter_metrics(killed))
    assert [r["step"] for r in rows_resumed] == [1, 2, 3, 4]
    for a, b in zip(rows_straight, rows_resumed):
        assert {k: a[k] for k in EXACT_KEYS} == {k: b[k] for k in EXACT_KEYS}
    straight = aha.load_model(tmp_path / "straight" / "model")[0].state_dict()
    resumed = aha.load_model(killed / "model")[0].state_dict()
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_resume_refuses_another_number_of_processes(tmp_path, copy_data):
    config = TrainConfig(model="tiny", window=4, seq_len=25, steps=2, batch_size=4, grad_accum=1, checkpoint_every=1,
                         eval_every=-1, progress=False, precision="fp32", out=str(tmp_path))
    train(config, model=tiny_llama(vocab_size=20), data=copy_data)
    state = tmp_path / "checkpoints" / "step-00000002" / "trainer_state.json"
    assert '"num_processes": 1' in state.read_text()
    assert check_resume(config, tmp_path, 1)
    with pytest.raises(ValueError, match=r"written by 1 process\(es\), this run has 2.*--num_processes 1"):
        check_resume(config, tmp_path, 2)


@pytest.mark.slow
def test_fsdp_refuses_fsdp1(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    docs = _documents(tmp_path / "docs")
    config = {"model": str(model_dir), "data": [str(docs)], "window": 8, "seq_len": 48, "steps": 1, "batch_size": 2, "progress": False,
              "precision": "fp32"}
    fsdp1 = [arg if arg != "2" else "1" for arg in FSDP_LAUNCH]
    version1 = _launch(tmp_path, {**config, "out": str(tmp_path / "fsdp1")}, "fsdp1", 29530, fsdp=fsdp1)
    assert version1.returncode != 0 and "launch with --fsdp_version 2" in version1.stderr, version1.stderr[-3000:]
