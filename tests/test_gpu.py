"""GPU paths (FlexAttention prefill/training, a converted model) against the reference; the Triton kernels are in test_triton.py.

Skipped where there is no CUDA device (CI); run on a GPU machine with ``pytest -m gpu``.
"""

import pytest
import torch

import aha
from aha import aha_attention
from aha.hf.testing import tiny_model
from aha.kernels import choose_impl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def random_inputs(batch, q_heads, kv_heads, seq_q, seq_kv, dtype, grad=False, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype).requires_grad_(grad)

    return randn(batch, q_heads, seq_q, 64), randn(batch, kv_heads, seq_kv, 64), randn(batch, kv_heads, seq_kv, 64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_kv, window, rho, padded, sink",
    [
        (1, 4, 2, 500, 500, 100, 0.1, False, 0),
        (2, 4, 4, 300, 777, 64, 0.5, True, 0),
        (1, 2, 1, 129, 129, 500, 0.1, False, 0),
        (1, 4, 2, 500, 500, 100, 0.1, False, 1),
        (2, 4, 4, 300, 777, 64, 0.5, True, 200),
    ],
)
def test_flex_forward_matches_reference(dtype, batch, q_heads, kv_heads, seq_q, seq_kv, window, rho, padded, sink):
    q, k, v = random_inputs(batch, q_heads, kv_heads, seq_q, seq_kv, dtype)
    route = torch.rand(batch, q_heads, seq_q, device="cuda") < rho
    kpm = None
    if padded:  # left padding
        kpm = torch.ones(batch, seq_kv, dtype=torch.bool, device="cuda")
        kpm[0, :40] = False
    assert choose_impl(q, k, route, window, kpm) == "flex"
    with torch.no_grad():
        out = aha_attention(q, k, v, route, window, key_padding_mask=kpm, sink=sink)
        expected = aha_attention(q, k, v, route, window, impl="reference", key_padding_mask=kpm, sink=sink)
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sink", [0, 4])
def test_flex_backward_with_the_ste_gate_matches_reference(dtype, sink):
    route_gen = torch.Generator(device="cuda").manual_seed(3)
    logits = torch.randn(1, 4, 500, generator=route_gen, device="cuda")
    results = []
    for impl in ["reference", "flex"]:
        q, k, v = random_inputs(1, 4, 2, 500, 500, dtype, grad=True)
        soft = torch.sigmoid(logits).requires_grad_(True)
        gate = (soft > 0.5).float() + soft - soft.detach()
        out = aha_attention(q, k, v, gate, 100, impl=impl, sink=sink)
        out.float().square().sum().backward()
        results.append([out.detach().float(), q.grad.float(), k.grad.float(), v.grad.float(), soft.grad.float()])
    tol = TOLERANCE[dtype]
    for got, want in zip(results[1], results[0]):
        torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol)  # sums over 500 keys


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_converted_model_on_cuda_equals_the_original_and_generates_with_cache(family):
    original = tiny_model(family).cuda()
    ids = torch.randint(3, 128, (2, 40), device="cuda")
    with torch.no_grad():
        expected = original(ids).logits
    model = aha.convert(tiny_model(family), window=8).cuda()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, atol=1e-4, rtol=1e-4)
        with aha.force_routing(model, "local"):
            cached = model.generate(ids, max_new_tokens=12, do_sample=False)
            uncached = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_flex_compiles_once_per_shape_not_once_per_route():
    from torch._dynamo.utils import counters

    q, k, v = random_inputs(1, 4, 2, 700, 700, torch.bfloat16)
    with torch.no_grad():
        aha_attention(q, k, v, torch.rand(1, 4, 700, device="cuda") < 0.1, 64)
        compiled = counters["stats"]["unique_graphs"]
        for _ in range(3):
            aha_attention(q, k, v, torch.rand(1, 4, 700, device="cuda") < 0.1, 64)
    assert counters["stats"]["unique_graphs"] == compiled
