"""The Triton kernels (prefill: ``impl="triton"``; decode) against the reference.

Runs on a CUDA device, or on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, which
``conftest.py`` sets where there is no GPU; the test extra installs Triton on Linux x86-64).
The interpreter mis-computes ``tl.dot`` on bf16 tensors, so bf16 prefill runs on CUDA only.
"""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aha import AhaInputError, aha_attention

pytest.importorskip("triton")
from aha.kernels import choose_impl, triton_prefill  # noqa: E402
from aha.kernels.cpp import key_start  # noqa: E402
from aha.kernels.triton_decode import triton_decode  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1",
        reason="needs a CUDA device (or TRITON_INTERPRET=1 for Triton's interpreter on CPU)",
    ),
]
DTYPES = [torch.float32] + ([torch.bfloat16] if DEVICE == "cuda" else [])
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


def random_inputs(batch, q_heads, kv_heads, seq_q, seq_kv, dtype=torch.float32, dim=64, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return tuple(
        torch.randn(batch, heads, seq, dim, generator=gen, device=DEVICE, dtype=dtype)
        for heads, seq in ((q_heads, seq_q), (kv_heads, seq_kv), (kv_heads, seq_kv))
    )


def left_padding(batch, seq_kv, lengths):
    return torch.arange(seq_kv, device=DEVICE)[None, :] >= (seq_kv - torch.tensor(lengths, device=DEVICE))[:, None]


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
    """``split_tiles=1``: global tiles after a head's first run whole, as at high global fractions."""
    monkeypatch.setattr(triton_prefill, "SPLIT_TILES", split_tiles)
    q, k, v = random_inputs(batch, q_heads, kv_heads, seq_q, seq_kv, dtype)
    route = torch.rand(batch, q_heads, seq_q, device=DEVICE) < rho
    kpm = None if lengths is None else left_padding(batch, seq_kv, lengths)
    out = aha_attention(q, k, v, route, window, impl="triton", key_padding_mask=kpm, sink=sink)
    expected = aha_attention(q, k, v, route, window, impl="reference", key_padding_mask=kpm, sink=sink)
    torch.testing.assert_close(out, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


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
    out = aha_attention(q, k, v, route, window, impl="triton", key_padding_mask=kpm, sink=sink)
    expected = aha_attention(q, k, v, route, window, impl="reference", key_padding_mask=kpm, sink=sink)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


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


def test_errors_name_the_fix():
    q, k, v = random_inputs(1, 2, 1, 64, 64)
    route = torch.rand(1, 2, 64, device=DEVICE) < 0.5
    with pytest.raises(AhaInputError, match="forward-only.*flex"):
        aha_attention(q.requires_grad_(), k, v, route, 8, impl="triton")
    holes = torch.ones(1, 64, dtype=torch.bool, device=DEVICE)
    holes[0, 10] = False
    with pytest.raises(AhaInputError, match="contiguous run.*flex"):
        aha_attention(q.detach(), k, v, route, 8, impl="triton", key_padding_mask=holes)


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
    first_key = key_start(kpm, batch, q.device)
    scale = 64**-0.5

    def decode(k, v, route):
        out = triton_decode(q, k, v, route, window, scale, first_key, sink)
        return out.masked_fill(~kpm[:, None, -1:, None], 0.0)  # as aha_attention does for padded queries

    expected = aha_attention(q, k, v, route, window, impl="reference", key_padding_mask=kpm, sink=sink)
    torch.testing.assert_close(decode(k, v, route), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    if DEVICE == "cuda":  # where the dispatcher itself picks this kernel
        assert choose_impl(q, k, route, window, kpm) == "decode"
        dispatched = aha_attention(q, k, v, route, window, key_padding_mask=kpm, sink=sink)
        torch.testing.assert_close(dispatched, expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])
    local_only = torch.zeros_like(route)
    k_poisoned, v_poisoned = k.clone(), v.clone()
    for row, first in enumerate(first_key.tolist()):  # keys between the sink and the window are never read
        k_poisoned[row, :, first + sink : seq_kv - window] = float("nan")
        v_poisoned[row, :, first + sink : seq_kv - window] = float("nan")
    torch.testing.assert_close(decode(k_poisoned, v_poisoned, local_only), decode(k, v, local_only), atol=0, rtol=0)
