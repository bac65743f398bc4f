"""Property test of the Triton attention kernels (output and q/k/v gradients) against the reference on random shapes and routes."""

import pytest
import torch

from aha import aha_attention

pytest.importorskip("hypothesis")  # GPU images may lack it
pytest.importorskip("triton")
from hypothesis import given, settings
from hypothesis import strategies as st
from triton_support import DEVICE, left_padding, needs_a_triton_device, random_inputs

pytestmark = needs_a_triton_device


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    seq_q=st.integers(2, 200),
    prefix=st.integers(0, 70),
    window=st.integers(1, 150),
    rho=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    padded=st.booleans(),
    sink=st.sampled_from([0, 1, 4]),
    seed=st.integers(0, 2**16),
)
def test_triton_prefill_matches_reference_on_random_routes(batch, kv_heads, group, seq_q, prefix, window, rho, padded, sink, seed):
    torch.manual_seed(seed)
    seq_kv = seq_q + prefix
    q, k, v = random_inputs(batch, kv_heads * group, kv_heads, seq_q, seq_kv, dim=16, seed=seed)
    route = torch.rand(batch, kv_heads * group, seq_q, device=DEVICE) < rho
    kpm = left_padding(batch, seq_kv, torch.randint(1, seq_kv + 1, (batch,)).tolist()) if padded else None
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad_out = torch.randn_like(q)
    results = []
    for impl in ["triton", "reference"]:
        out = aha_attention(q, k, v, route, window, impl=impl, key_padding_mask=kpm, sink=sink)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    for got, want in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
