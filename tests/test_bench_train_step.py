"""The ``train-step`` benchmark group on a tiny model: backward timing marks, fixed routes, rows."""

import dataclasses

import pytest
import torch
from train_support import char_tokenizer

import aha
from aha.benchmarking import BenchConfig
from aha.benchmarking.timing import TimingPolicy
from aha.benchmarking.train_step import attention_clock, fix_routes, measure_train_steps
from aha.hf.testing import tiny_model
from aha.train import TrainConfig

TEMPLATE = TrainConfig(model="tiny", window=4, sink=1, distill=1.0, target_global=0.2, lambda_init=0.1, precision="fp32")


def test_attention_clock_times_forward_and_backward_without_changing_gradients():
    model = aha.convert(tiny_model("llama"), window=4).train()
    ids = torch.randint(3, 100, (1, 40))
    model(ids).logits.sum().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with attention_clock() as take:
        model(ids).logits.sum().backward()
        clock = take()
        with torch.no_grad():
            model(ids)
        without_grad = take()
    assert all(torch.equal(p.grad, grad) for p, grad in zip(model.parameters(), expected))
    assert clock.forward > 0 and clock.forward_without_grad == 0
    assert len(clock.backwards) == 2 and clock.backward_seconds() > 0  # one backward per layer
    assert without_grad.forward == 0 and without_grad.forward_without_grad > 0 and not without_grad.backwards


def test_fixed_routes_send_the_first_heads_global():
    model = aha.convert(tiny_model("llama"), window=4).eval()
    fix_routes(model, 1)
    with aha.track_routing(model) as stats:
        model(torch.randint(3, 100, (1, 30)))
    assert stats.per_head()[:, 0].tolist() == [1.0, 1.0] and stats.per_head()[:, 1:].sum() == 0
    with pytest.raises(ValueError, match="model_global_heads"):
        fix_routes(model, 5)


def test_rows_of_every_variant():
    cfg = BenchConfig(model_global_heads=1, timing=TimingPolicy(rounds=1, min_sample_s=0.0, retries=0, max_wait_s=0.0))
    model = tiny_model("llama")
    before = {name: p.clone() for name, p in model.state_dict().items()}
    rows = measure_train_steps(model, char_tokenizer(), [48], cfg, TEMPLATE)
    assert [row["variant"] for row in rows] == ["dense", "aha ste", "aha sampled", "aha compressed", "aha frozen", "aha sampled+frozen"]
    two_phase = rows[-1]
    assert two_phase["gate_gradient"] == "sampled" and two_phase["freeze_routes_at"] == 0.5 and two_phase["timed_steps"] == 2
    for row in rows:
        assert row["n"] == 48 and row["step_ms"] > 0 and row["timed_steps"] == (2 if row is two_phase else 1)
        assert row["attention_forward_ms"] > 0 and row["attention_backward_ms"] > 0
        assert row["global_fraction"] == (1.0 if row["variant"] == "dense" else pytest.approx(0.25))
        assert (row["teacher_ms"] > 0) == (row["variant"] != "dense")
    assert rows[0]["vs_dense"] == 1.0
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())  # the given model is left as it was
    with pytest.raises(ValueError, match="unknown --gate-gradients"):
        measure_train_steps(model, char_tokenizer(), [48], BenchConfig(gate_gradients=["exact"]), TEMPLATE)
    with pytest.raises(ValueError, match="unknown --gate-gradients"):
        measure_train_steps(model, char_tokenizer(), [48], BenchConfig(gate_gradients=["exact+frozen"]), TEMPLATE)


def test_without_distillation_no_teacher_runs_and_the_weight_is_checked():
    from aha.benchmarking.train_step import recipe_template

    assert recipe_template(BenchConfig(model="smollm2-135m")).distill == 1.0  # the demo recipe's
    assert recipe_template(BenchConfig(model="smollm2-135m", train_step_distill=0.0)).distill == 0.0
    with pytest.raises(ValueError, match="train-step-distill must be >= 0"):
        recipe_template(BenchConfig(train_step_distill=-1.0))
    cfg = BenchConfig(model_global_heads=1, gate_gradients=["sampled"], timing=TimingPolicy(rounds=1, min_sample_s=0.0, retries=0, max_wait_s=0.0))
    rows = measure_train_steps(tiny_model("llama"), char_tokenizer(), [48], cfg, dataclasses.replace(TEMPLATE, distill=0.0))
    assert [row["variant"] for row in rows] == ["dense", "aha sampled"] and all(row["teacher_ms"] == 0 for row in rows)
