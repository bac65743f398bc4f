"""The Triton kernels (``impl="triton"``: forward and backward; decode) against the reference.

Runs on a CUDA device, or on CPU under Triton's interpreter (see ``triton_support``). The
interpreter mis-computes ``tl.dot`` on bf16 tensors, so bf16 prefill runs on CUDA only. The
hypothesis property test is in ``test_triton_properties.py`` (GPU images may lack hypothesis).
"""

import pytest
import torch

from aha import AhaInputError, aha_attention

pytest.importorskip("triton")
from triton_support import (
    DEVICE,
    TOLERANCE,
    left_padding,
    needs_a_triton_device,
    random_inputs,
)

from aha.kernels import KeyPadding, choose_impl
from aha.kernels.masks import key_start
from aha.kernels.triton import prefill as triton_prefill
from aha.kernels.triton.decode import triton_decode

pytestmark = needs_a_triton_device
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_kv, window, rho, lengths, sink",
    [
        (1, 4, 2, 500, 500, 100, 0.1, None, 0),  # several local tiles, one or two global ones
        (1, 2, 1, 300, 300, 16, 0.0, None, 100),  # all local: sink segment before each band
        (1, 2, 1, 300, 300, 16, 1.0, None, 0),  # all global: every tile split
        (2, 4, 4, 300, 777, 64, 0.5, (700, 777), 3),  # KV prefix, left padding, mixed tiles
        (1, 2, 2, 130, 130, 500, 0.1, None, 0),  # window covers every key
    ],
)
@pytest.mark.parametrize("split_tiles", [1, triton_prefill.SPLIT_TILES])
def test_triton_prefill_matches_reference(
    monkeypatch, split_tiles, dtype, batch, q_heads, kv_heads, seq_q, seq_kv, window, rho, lengths, sink
):
    """Output and q/k/v gradients. ``split_tiles=1``: global tiles after a head's first run whole
    (as at high global fractions), in the forward and in the dq kernel."""
    monkeypatch.setattr(triton_prefill, "SPLIT_TILES", split_tiles)
    q, k, v = (t.requires_grad_() for t in random_inputs(batch, q_heads, kv_heads, seq_q, seq_kv, dtype))
    route = torch.rand(batch, q_heads, seq_q, device=DEVICE) < rho
    kpm = None if lengths is None else left_padding(batch, seq_kv, lengths)
    grad_out = torch.randn_like(q)
    results = []
    for impl in ["triton", "reference"]:
        out = aha_attention(q, k, v, route, window, impl=impl, key_padding_mask=kpm, sink=sink)
        results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(results[0][0], results[1][0], atol=tol, rtol=tol)
    for got, want in zip(results[0][1:], results[1][1:]):
        torch.testing.assert_close(got, want, atol=tol * 10, rtol=tol * 10)  # sums over hundreds of keys


@pytest.mark.parametrize("sink", [0, 2])
def test_local_rows_never_read_keys_outside_the_sink_and_their_band(sink):
    """Chunked prefill: 200 queries after a 1000-key prefix; local rows need keys from 1000 - window + 1 on."""
    q, k, v = random_inputs(1, 4, 2, 200, 1200)
    route = torch.zeros(1, 4, 200, dtype=torch.bool, device=DEVICE)
    clean = aha_attention(q, k, v, route, 64, impl="triton", sink=sink)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    k_poisoned[:, :, sink : 1000 - 63] = float("nan")
    v_poisoned[:, :, sink : 1000 - 63] = float("nan")
    poisoned = aha_attention(q, k_poisoned, v_poisoned, route, 64, impl="triton", sink=sink)
    torch.testing.assert_close(poisoned, clean, atol=0, rtol=0)


def test_soft_gate_mixes_the_branches():
    q, k, v = random_inputs(1, 2, 1, 150, 150)
    gate = torch.rand(1, 2, 150, device=DEVICE)
    expected = aha_attention(q, k, v, gate, 20, impl="reference")
    torch.testing.assert_close(aha_attention(q, k, v, gate, 20, impl="triton"), expected, atol=1e-5, rtol=1e-5)


def test_straight_through_gate_gets_the_branch_difference_and_qkv_their_gradients():
    """Training: a binary float gate that requires grad (the STE's forward values), with a sink."""
    q, k, v = (t.requires_grad_() for t in random_inputs(1, 4, 2, 200, 200))
    gate = (torch.rand(1, 4, 200, device=DEVICE) < 0.2).float().requires_grad_()
    grad_out = torch.randn_like(q)
    results = []
    for impl in ["triton", "reference"]:
        out = aha_attention(q, k, v, gate, 24, impl=impl, sink=1)
        results.append(torch.autograd.grad(out, (q, k, v, gate), grad_out))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_a_padding_mask_with_holes_names_the_fix():
    q, k, v = random_inputs(1, 2, 1, 64, 64)
    route = torch.rand(1, 2, 64, device=DEVICE) < 0.5
    holes = torch.ones(1, 64, dtype=torch.bool, device=DEVICE)
    holes[0, 10] = False
    with pytest.raises(AhaInputError, match="holes.*flex"):
        aha_attention(q, k, v, route, 8, impl="triton", key_padding_mask=holes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_kv, window, sink",
    [(2, 8, 2, 5000, 256, 0), (3, 4, 4, 100, 256, 0), (1, 6, 3, 2100, 1, 0), (2, 8, 2, 3000, 256, 1), (2, 4, 2, 3000, 256, 1500)],
)
def test_triton_decode_matches_reference_and_reads_only_the_sink_and_window(dtype, batch, q_heads, kv_heads, seq_kv, window, sink):
    """Called directly (on CPU the dispatcher gives decode steps to the C++ kernel), and on CUDA through the dispatcher."""
    q, k, v = random_inputs(batch, q_heads, kv_heads, 1, seq_kv, dtype)
    route = torch.rand(batch, q_heads, 1, device=DEVICE) < 0.3
    kpm = left_padding(batch, seq_kv, [seq_kv - seq_kv // 3] + [seq_kv] * (batch - 1))
    first_key = key_start(KeyPadding.of(kpm), batch, q.device)
    scale = 64**-0.5

    def decode(k, v, route):
        out = triton_decode(q, k, v, route, window, scale, first_key, sink)
        return out.masked_fill(~kpm[:, None, -1:, None], 0.0)  # as aha_attention does for padded queries

    expected = aha_attention(q, k, v, route, window, impl="reference", key_padding_mask=kpm, sink=sink)
    torch.testing.assert_close(decode(k, v, route), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    if DEVICE == "cuda":  # where the dispatcher itself picks this kernel
        assert choose_impl(q, k, route, window, kpm) == "triton"
        dispatched = aha_attention(q, k, v, route, window, key_padding_mask=kpm, sink=sink)
        torch.testing.assert_close(dispatched, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    local_only = torch.zeros_like(route)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    for row, first in enumerate(first_key.tolist()):  # keys between the sink and the window are never read
        k_poisoned[row, :, first + sink : seq_kv - window] = float("nan")
        v_poisoned[row, :, first + sink : seq_kv - window] = float("nan")
    torch.testing.assert_close(decode(k_poisoned, v_poisoned, local_only), decode(k, v, local_only), atol=0, rtol=0)


def test_triton_ops_pass_opcheck():
    """Schema, fake kernels and the registered backward of the Triton ops (what torch.compile relies on)."""
    q, k, v = random_inputs(1, 2, 1, 40, 40, dim=16)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    route = torch.rand(1, 2, 40, device=DEVICE) < 0.3
    first_key = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    checks = ("test_schema", "test_faketensor", "test_autograd_registration")
    torch.library.opcheck(torch.ops.aha.triton_prefill.default, (q, k, v, route, first_key, 8, 1, 0.25), test_utils=checks)
    with torch.no_grad():
        step = (q[:, :, -1:].detach(), k.detach(), v.detach(), route[:, :, -1:], first_key, 8, 1, 0.25)
        torch.library.opcheck(torch.ops.aha.triton_decode.default, step, test_utils=checks)
