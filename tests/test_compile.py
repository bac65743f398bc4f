"""The operator under ``torch.compile`` (inductor, CPU) and ``torch.export``: no graph breaks in
attention (``fullgraph=True``), results equal to eager, and the ``torch.library`` registrations
checked by ``torch.library.opcheck``."""

import pytest
import torch

import aha
from aha import aha_attention
from aha.hf.testing import TINY, tiny_model
from aha.kernels import cpp

needs_kernel = pytest.mark.skipif(not cpp.cpp_available(), reason="C++ kernel unavailable")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def inputs(seq=96, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, seq, 32, generator=gen)
    k, v = torch.randn(2, 2, 2, seq, 32, generator=gen)
    route = torch.rand(2, 4, seq, generator=gen) < 0.3
    padding = torch.ones(2, seq, dtype=torch.bool)
    padding[1, :11] = False  # left padding in one row
    return q, k, v, route, padding


def test_inference_compiles_as_one_graph_and_equals_eager():
    q, k, v, route, padding = inputs()

    def layer(q, k, v, route, padding):
        return aha_attention(q * 1.5, k, v, route, 16, key_padding_mask=padding, sink=1).relu()

    compiled = torch.compile(layer, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v, route, padding), layer(q, k, v, route, padding), atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("gate", ["bool", "ste", "soft"])
def test_training_compiles_as_one_graph_and_matches_eager_gradients(gate):
    """Gradients run through the C++ kernel's registered autograd; a float gate declared binary (the
    STE gate) costs what it costs in eager mode, an undeclared one takes the form exact for any gate."""
    q, k, v, route, _ = inputs()
    logits = torch.randn(route.shape, generator=torch.Generator().manual_seed(1))

    def loss(q, k, v, logits):
        if gate == "bool":
            routes, binary = logits > 0, True
        elif gate == "ste":
            routes, binary = aha.route_from_logits(logits, straight_through=True)[0], True
        else:
            routes, binary = torch.sigmoid(logits), None
        out = aha_attention(q, k, v, routes, 16, sink=1, route_is_binary=binary)
        return (out * torch.linspace(-1, 1, out.shape[-1])).sum()

    def grads(fn):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v, logits)]
        fn(*leaves).backward()
        return [t.grad for t in leaves]

    eager, compiled = grads(loss), grads(torch.compile(loss, fullgraph=True))
    for got, want in zip(compiled, eager):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@needs_kernel
def test_kernel_ops_pass_opcheck():
    """Schema, fake kernel and autograd registration of the C++ forward (FlashAttention's pattern)."""
    q, k, v, route, _ = inputs(seq=40)
    starts = torch.zeros(2, dtype=torch.int32)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    torch.library.opcheck(torch.ops.aha.forward.default, (q, k, v, route, starts, 8, 1, 0.2, 32, 64, 0))


def test_attention_op_passes_opcheck():
    q, k, v, route, padding = inputs(seq=40)
    torch.library.opcheck(torch.ops.aha.attention.default, (q, k, v, route, padding, 8, 1, 0.2, "auto", False))


def test_the_operator_exports():
    q, k, v, route, padding = inputs()

    class Attention(torch.nn.Module):
        def forward(self, q, k, v, route, padding):
            return aha_attention(q, k, v, route, 16, key_padding_mask=padding, sink=1)

    with torch.no_grad():
        exported = torch.export.export(Attention(), (q, k, v, route, padding))
        assert any(node.target is torch.ops.aha.attention.default for node in exported.graph.nodes)
        q2, k2, v2, route2, padding2 = inputs(seed=5)
        torch.testing.assert_close(
            exported.module()(q2, k2, v2, route2, padding2), Attention()(q2, k2, v2, route2, padding2)
        )


@pytest.mark.slow
def test_a_compiled_converted_llama_has_no_graph_break_and_equals_eager():
    """Logits of a padded batch (inference) and every parameter's gradient (training, STE gates)."""
    model = aha.convert(tiny_model("llama"), window=8, sink=1, router_init="random")
    ids = torch.randint(3, TINY["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        assert torch._dynamo.explain(model)(ids, attention_mask=mask).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(model)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        got = compiled(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)

    model.train()

    def gradients(run):
        model.zero_grad()
        run(ids, labels=ids).loss.backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    assert torch._dynamo.explain(lambda ids: model(ids, labels=ids).loss)(ids).graph_break_count == 0
    torch._dynamo.reset()
    eager, graph = gradients(model), gradients(compiled)
    assert eager.keys() == graph.keys() and any("router" in name for name in eager)
    for name, want in eager.items():
        torch.testing.assert_close(graph[name], want, atol=1e-4, rtol=1e-4, msg=name)
