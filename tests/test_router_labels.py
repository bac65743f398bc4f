"""Router warm start (issue 19): labels of where heads need global attention, routers fitted to them."""

from __future__ import annotations

import pytest
import torch

import aha
from aha.hf.testing import tiny_model
from aha.train.config import TrainConfig
from aha.train.router_labels import (
    collect_route_labels,
    need_threshold,
    warm_start_routers,
)


def _model():
    return aha.convert(tiny_model("llama", num_hidden_layers=3), window=8, sink=1).eval()


def _sequences(count: int = 6, length: int = 96) -> torch.Tensor:
    return torch.randint(3, 128, (count, length), generator=torch.Generator().manual_seed(1))


def test_needs_are_zero_inside_the_window_and_positive_beyond() -> None:
    labels = collect_route_labels(_model(), _sequences(2, 40))
    assert len(labels.inputs) == len(labels.needs) == 3
    needs = labels.needs[0].reshape(2, 40, -1)
    assert labels.inputs[0].shape == (80, 64)
    assert float(needs[:, :9].abs().max()) < 1e-5  # window 8 + 1 sink key: every key of the first 9 tokens is seen
    assert bool((needs[:, 9:] > 0).all())


def test_warm_start_opens_about_the_labelled_share_and_leaves_full_attention_alone() -> None:
    model, sequences = _model(), _sequences()
    with torch.no_grad(), aha.force_routing(model, "global"):
        before = model(sequences).logits
    fitted = warm_start_routers(model, sequences, 0.2)
    assert fitted["need_threshold"] > 0
    with torch.no_grad(), aha.force_routing(model, "global"):
        torch.testing.assert_close(model(sequences).logits, before, rtol=0, atol=0)
    with torch.no_grad(), aha.track_routing(model) as stats:
        model(sequences)
    assert stats.global_fraction == pytest.approx(0.2, abs=0.02)  # each head opens on as many tokens as its labels
    labelled = sum(layer["labelled"] for layer in fitted["layers"]) / 3
    assert labelled == pytest.approx(0.2, abs=0.01)


def test_need_threshold_picks_the_top_share() -> None:
    needs = [torch.arange(10.0).reshape(5, 2), torch.arange(10.0, 20.0).reshape(5, 2)]
    assert need_threshold(needs, 0.25) == 15.0  # 5 of the 20 values are >= 15


def test_warm_start_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="warm_start_global"):
        TrainConfig(router_warm_start=4)
    with pytest.raises(ValueError, match="force_routing"):
        TrainConfig(router_warm_start=4, warm_start_global=0.1, force_routing="global")
    assert TrainConfig(router_warm_start=4, target_global=0.1).warm_start_fraction == 0.1
    with pytest.raises(aha.UnsupportedModelError, match="separate routers"):
        fused = aha.convert(tiny_model("llama"), window=8, router_layout="fused")
        warm_start_routers(fused, _sequences(1, 32), 0.2)
