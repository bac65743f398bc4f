"""The ``model`` benchmark group on a tiny model: attention timing hooks, forced benchmark routes, rows."""

import pytest
import torch
from train_support import char_tokenizer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import aha
from aha.benchmarking import BenchConfig
from aha.benchmarking.model import attention_timer, benchmark_routes, measure_model
from aha.benchmarking.timing import TimingPolicy
from aha.hf.testing import tiny_model


@pytest.fixture
def model():
    return aha.convert(tiny_model("llama"), window=4).eval()


def test_attention_timer_counts_time_and_restores_the_functions(model):
    before = {name: ALL_ATTENTION_FUNCTIONS[name] for name in ("aha", "sdpa")}
    ids = torch.randint(3, 100, (1, 40))
    expected = model(ids).logits
    with attention_timer() as seconds:
        got = model(ids).logits
    torch.testing.assert_close(got, expected)
    assert seconds["aha"] > 0 and seconds["sdpa"] == 0
    assert {name: ALL_ATTENTION_FUNCTIONS[name] for name in ("aha", "sdpa")} == before


def test_benchmark_routes_force_the_first_heads_global(model):
    ids = torch.randint(3, 100, (1, 30))
    with benchmark_routes(model, 1), aha.track_routing(model) as stats:
        model(ids)
    assert stats.per_head()[:, 0].tolist() == [1.0, 1.0]
    assert stats.per_head()[:, 1:].sum() == 0
    with pytest.raises(ValueError, match="model_global_heads"):
        with benchmark_routes(model, 5):
            pass


def test_measure_model_rows(model):
    cfg = BenchConfig(model_global_heads=2, timing=TimingPolicy(rounds=1, min_sample_s=0.0, retries=0, max_wait_s=0.0))
    rows = measure_model(model, char_tokenizer(), [64], cfg, decode_tokens=2)
    assert [row["phase"] for row in rows] == ["prefill", "decode"]
    for row in rows:
        assert row["n"] == 64 and row["global_fraction"] == pytest.approx(0.5)
        assert row["attention_ms"] > 0 and row["sdpa_attention_ms"] > 0 and row["speedup"] > 0
    assert model.config._attn_implementation == "aha"  # switched back after timing SDPA
