"""Gate-gradient estimators (aha.kernels.gate_estimators) against the exact STE gradient on small shapes.

Every estimator leaves the forward output and the q/k/v gradients bit-identical to the STE's; the
sampled estimator is unbiased (checked in expectation over seeds), the compressed one is exact in its
limits and within its stated error bound otherwise.
"""

from __future__ import annotations

import math

import pytest
import torch
from kernel_support import FAST_IMPLS

import aha
from aha.kernels import GateGradient, gate_gradient
from aha.kernels.gate_estimators import current_gate_gradient

BATCH, Q_HEADS, KV_HEADS, SEQ, DIM, WINDOW = 2, 4, 2, 70, 16, 8


def _inputs(seed: int = 0, seq: int = SEQ) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator)

    return {
        "q": randn(BATCH, Q_HEADS, seq, DIM),
        "k": randn(BATCH, KV_HEADS, seq, DIM),
        "v": randn(BATCH, KV_HEADS, seq, DIM),
        "logits": randn(BATCH, Q_HEADS, seq),  # about half the pairs global
        "upstream": randn(BATCH, Q_HEADS, seq, DIM),  # d loss / d out
    }


def _run(x: dict[str, torch.Tensor], estimator: GateGradient | str, impl: str = "split", sink: int = 0,
         padding: torch.Tensor | None = None, window: int = WINDOW) -> dict[str, torch.Tensor]:
    """Output, and the gradients of logits, q, k, v, of ``(out * upstream).sum()`` under ``estimator``."""
    logits, q, k, v = (x[name].clone().requires_grad_(True) for name in ("logits", "q", "k", "v"))
    route, _ = aha.route_from_logits(logits, straight_through=True)
    with gate_gradient(estimator):
        out = aha.aha_attention(q, k, v, route, window, impl=impl, sink=sink, key_padding_mask=padding, route_is_binary=True)
    (out * x["upstream"]).sum().backward()
    return {"out": out.detach(), "gate": logits.grad, "q": q.grad, "k": k.grad, "v": v.grad}


def _gap_grad(result: dict[str, torch.Tensor], x: dict[str, torch.Tensor]) -> torch.Tensor:
    """``<upstream, gap>`` per pair: the logits' gradient divided by the sigmoid's derivative."""
    g = torch.sigmoid(x["logits"])
    return result["gate"] / (g * (1 - g))


ESTIMATORS = [
    GateGradient("sampled", sample_fraction=0.3, generator=torch.Generator().manual_seed(1)),
    GateGradient("compressed", block=4),
    GateGradient("none"),
]


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda e: e.name)
@pytest.mark.parametrize("sink", [0, 1])
def test_output_and_qkv_gradients_equal_the_stes(impl, estimator, sink):
    x = _inputs()
    exact, got = _run(x, "ste", impl, sink), _run(x, estimator, impl, sink)
    for name in ("out", "q", "k", "v"):
        assert torch.equal(got[name], exact[name]), name
    if estimator.name == "none":
        assert got["gate"] is None or not got["gate"].any()  # frozen routes: no gradient reaches the gate
    else:
        assert not torch.allclose(got["gate"], exact["gate"])  # an estimate, not the exact gradient (tested below)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("sink", [0, 3])
def test_exact_limits_equal_the_ste(impl, sink):
    """Sampling every local pair, or compressing blocks of one key, is the exact gap."""
    x = _inputs(1)
    exact = _run(x, "ste", impl, sink)["gate"]
    for estimator in (GateGradient("sampled", sample_fraction=1.0), GateGradient("compressed", block=1)):
        torch.testing.assert_close(_run(x, estimator, impl, sink)["gate"], exact, rtol=1e-5, atol=1e-6)


def test_compressed_is_exact_with_left_padding_and_sink():
    """Padded keys and the sink keys (from the first real key) are excluded from the blocks as from every branch."""
    x = _inputs(2)
    padding = torch.ones(BATCH, SEQ, dtype=torch.bool)
    padding[1, :9] = False
    exact = _run(x, "ste", "split", 2, padding)["gate"]
    torch.testing.assert_close(_run(x, GateGradient("compressed", block=1), "split", 2, padding)["gate"], exact, rtol=1e-5, atol=1e-6)


def test_compressed_is_exact_when_each_block_holds_equal_keys():
    x = _inputs(3, seq=64)
    for name in ("k", "v"):  # every block of 4 keys: one key and one value repeated
        x[name] = x[name][:, :, ::4].repeat_interleave(4, dim=2)
    exact = _run(x, "ste", sink=0)["gate"]
    torch.testing.assert_close(_run(x, GateGradient("compressed", block=4), sink=0)["gate"], exact, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spread", [0.003, 0.03, 0.3])
def test_compressed_error_within_its_stated_bound(spread):
    """Keys and values within ``spread`` of their block's mean: per pair, ``|error of <upstream, gap>| <=
    |upstream|_1 * ((exp(2 eta) - 1) * dv + (exp(eta) - 1 - eta) * max|v|)`` with
    ``eta = scale * max|q|_2 * max|k - mean|_2`` and ``dv = max|v - mean|`` (the module docstring's
    bound; 1e-5 added for float rounding). At the small spreads the bound is far below the gap itself,
    so a wrong block mass (say, ``log(count)`` left out) breaks it."""
    block = 8
    x = _inputs(4, seq=96)
    for name in ("k", "v"):
        centers = x[name][:, :, ::block].repeat_interleave(block, dim=2)
        x[name] = centers + spread * torch.randn(x[name].shape, generator=torch.Generator().manual_seed(5)).clamp(-1, 1)
    scale = 1 / math.sqrt(DIM)
    blocks = (BATCH, KV_HEADS, 96 // block, block, DIM)
    k_dev = (x["k"].reshape(blocks) - x["k"].reshape(blocks).mean(3, keepdim=True)).norm(dim=-1).max()
    v_dev = (x["v"].reshape(blocks) - x["v"].reshape(blocks).mean(3, keepdim=True)).abs().max()
    eta = scale * x["q"].norm(dim=-1).max() * k_dev
    per_element = (torch.exp(2 * eta) - 1) * v_dev + (torch.exp(eta) - 1 - eta) * x["v"].abs().max()
    bound = x["upstream"].abs().sum(-1) * per_element + 1e-5
    exact = _gap_grad(_run(x, "ste"), x)
    got = _gap_grad(_run(x, GateGradient("compressed", block=block)), x)
    error = (got - exact).abs()
    assert (error <= bound).all(), f"worst error / bound {(error / bound).max():.3f}"
    if spread < 0.01:
        assert bound.median() < 0.01 * exact.abs().median()  # a bound that constrains


def test_sampled_per_pair_values():
    """Global pairs get the exact gap; a local pair gets 0 or the exact gap / fraction."""
    x = _inputs(6)
    fraction = 0.25
    exact = _gap_grad(_run(x, "ste"), x)
    got = _gap_grad(_run(x, GateGradient("sampled", sample_fraction=fraction, generator=torch.Generator().manual_seed(0))), x)
    is_global = x["logits"] > 0
    torch.testing.assert_close(got[is_global], exact[is_global], rtol=1e-4, atol=1e-5)
    local_got, local_exact = got[~is_global], exact[~is_global]
    hit = local_got != 0
    torch.testing.assert_close(local_got[hit], local_exact[hit] / fraction, rtol=1e-4, atol=1e-5)
    assert 0.15 < hit.float().mean() < 0.35  # about `fraction` of the local pairs


def test_sampled_is_unbiased_over_seeds():
    """The mean over 160 seeds of a fixed linear combination of the gate gradients (as a router weight's
    gradient is) is within 4 standard errors of the exact value. A biased estimator (say, one that
    forgot the 1 / fraction rescaling: a 70% shortfall here) fails by dozens of standard errors."""
    x = _inputs(7)
    fraction, seeds = 0.3, 160
    weights = torch.randn(x["logits"].shape, generator=torch.Generator().manual_seed(8))
    exact = float((_run(x, "ste")["gate"] * weights).sum())
    draws = torch.tensor([
        float((_run(x, GateGradient("sampled", sample_fraction=fraction, generator=torch.Generator().manual_seed(seed)))["gate"] * weights).sum())
        for seed in range(seeds)
    ])
    standard_error = float(draws.std()) / math.sqrt(seeds)
    assert standard_error > 0
    assert abs(float(draws.mean()) - exact) <= 4 * standard_error


def test_the_context_nests_and_restores():
    assert current_gate_gradient().name == "ste"
    with gate_gradient("compressed") as outer:
        assert current_gate_gradient() is outer
        with gate_gradient(GateGradient("sampled", sample_fraction=0.5)):
            assert current_gate_gradient().sample_fraction == 0.5
        assert current_gate_gradient() is outer
    assert current_gate_gradient().name == "ste"


def test_bad_settings_name_the_fix():
    with pytest.raises(aha.AhaInputError, match="choose one of ste, sampled, compressed"):
        GateGradient("exact")
    with pytest.raises(aha.AhaInputError, match=r"sample_fraction must be in \(0, 1\]"):
        GateGradient("sampled", sample_fraction=0.0)
    with pytest.raises(aha.AhaInputError, match="block must be an integer >= 1"):
        GateGradient("compressed", block=0)


def test_calls_without_a_gate_gradient_are_untouched():
    """Bool routes, gates without grad, and windows covering every key run the implementation as before."""
    x = _inputs(9)
    hard = x["logits"] > 0
    with torch.no_grad():
        expected = aha.aha_attention(x["q"], x["k"], x["v"], hard, WINDOW, impl="split")
        with gate_gradient("compressed"):
            assert torch.equal(aha.aha_attention(x["q"], x["k"], x["v"], hard, WINDOW, impl="split"), expected)
            assert torch.equal(aha.aha_attention(x["q"], x["k"], x["v"], hard.float(), WINDOW, impl="split"), expected)
    covering = _run(x, GateGradient("sampled", sample_fraction=0.1), window=SEQ)
    assert torch.equal(covering["out"], _run(x, "ste", window=SEQ)["out"]) and not covering["gate"].any()


def test_compressed_compiles_to_the_eager_gradient():
    """Under torch.compile (inductor, one graph) the compressed estimator gives the eager gate gradient
    (its masks once hit an inductor error: a clamp inside a floor division)."""
    x = _inputs(10)
    q, k, v = x["q"], x["k"], x["v"]

    def gate_grad(attention):
        logits = x["logits"].clone().requires_grad_(True)
        route, _ = aha.route_from_logits(logits, straight_through=True)
        (attention(q, k, v, route) * x["upstream"]).sum().backward()
        return logits.grad

    def attention(q, k, v, route):
        return aha.aha_attention(q, k, v, route, WINDOW, sink=1, route_is_binary=True)

    with gate_gradient(GateGradient("compressed", block=4)):
        eager = gate_grad(attention)
        torch._dynamo.reset()
        compiled = gate_grad(torch.compile(attention, fullgraph=True))
    torch._dynamo.reset()
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
