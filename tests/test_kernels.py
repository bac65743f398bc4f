"""The AHA operator: every implementation against the dense reference and the SDPA ground truths."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_support import FAST_IMPLS, cpp_microkernels

from aha import AhaInputError, aha_attention


def make_qkv(batch, q_heads, kv_heads, seq_q, seq_kv, dim, dtype=torch.float32, requires_grad=False):
    q = torch.randn(batch, q_heads, seq_q, dim, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(batch, kv_heads, seq_kv, dim, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(batch, kv_heads, seq_kv, dim, dtype=dtype, requires_grad=requires_grad)
    return q, k, v


def sliding_window_sdpa(q, k, v, window, sink=0):
    """Independent ground truth: SDPA with an explicit lower-right band mask (plus the first ``sink`` keys)."""
    seq_q, seq_kv = q.shape[2], k.shape[2]
    qpos = torch.arange(seq_kv - seq_q, seq_kv)[:, None]
    kpos = torch.arange(seq_kv)[None, :]
    mask = (kpos <= qpos) & ((kpos > qpos - window) | (kpos < sink))
    group = q.shape[1] // k.shape[1]
    return F.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask
    )


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_all_global_equals_sdpa_causal(impl, kv_heads):
    q, k, v = make_qkv(2, 4, kv_heads, 67, 67, 16)
    route = torch.ones(2, 4, 67, dtype=torch.bool)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=kv_heads != 4)
    torch.testing.assert_close(aha_attention(q, k, v, route, 8, impl=impl), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize("window", [1, 5, 16, 64])
def test_all_local_equals_sliding_window(impl, window):
    q, k, v = make_qkv(2, 6, 3, 50, 50, 8)
    route = torch.zeros(2, 6, 50, dtype=torch.bool)
    expected = sliding_window_sdpa(q, k, v, window)
    torch.testing.assert_close(aha_attention(q, k, v, route, window, impl=impl), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize("window, sink", [(1, 1), (5, 2), (16, 3), (64, 40)])
def test_all_local_with_sink_equals_window_plus_first_keys(impl, window, sink):
    q, k, v = make_qkv(1, 4, 2, 100, 110, 16)
    route = torch.zeros(1, 4, 100, dtype=torch.bool)
    expected = sliding_window_sdpa(q, k, v, window, sink)
    out = aha_attention(q, k, v, route, window, impl=impl, sink=sink)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - sliding_window_sdpa(q, k, v, window)).abs().max() > 1e-3  # the sink keys matter


def test_sink_keys_start_at_the_first_real_key():
    q, k, v = make_qkv(2, 2, 1, 30, 30, 8)
    route = torch.zeros(2, 2, 30, dtype=torch.bool)
    kpm = torch.ones(2, 30, dtype=torch.bool)
    kpm[1, :6] = False  # row 1 is left-padded: its sequence (and its sink) starts at key 6
    out = aha_attention(q, k, v, route, 4, impl="reference", key_padding_mask=kpm, sink=2)
    torch.testing.assert_close(out[:1], sliding_window_sdpa(q[:1], k[:1], v[:1], 4, 2), atol=1e-5, rtol=1e-5)
    real = slice(6, None)
    expected = sliding_window_sdpa(q[1:, :, real], k[1:, :, real], v[1:, :, real], 4, 2)
    torch.testing.assert_close(out[1:, :, real], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_window_covering_sequence_is_full_attention(impl):
    q, k, v = make_qkv(1, 2, 2, 30, 30, 8)
    route = torch.rand(1, 2, 30) < 0.5
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(aha_attention(q, k, v, route, 30, impl=impl), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aha_attention(q, k, v, route, 1000, impl=impl), expected, atol=1e-5, rtol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 3]),
    seq_q=st.integers(1, 90),
    prefix=st.integers(0, 40),
    dim=st.sampled_from([4, 8, 16]),
    window=st.integers(1, 140),
    rho=st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]),
    padded=st.booleans(),
    sink=st.sampled_from([0, 0, 1, 4]),
    seed=st.integers(0, 2**16),
)
def test_fast_paths_match_reference_on_random_routes(
    batch, kv_heads, group, seq_q, prefix, dim, window, rho, padded, sink, seed
):
    torch.manual_seed(seed)
    q, k, v = make_qkv(batch, kv_heads * group, kv_heads, seq_q, seq_q + prefix, dim)
    route = torch.rand(batch, kv_heads * group, seq_q) < rho
    kpm = None
    if padded:
        lengths = torch.randint(1, seq_q + prefix + 1, (batch,))
        kpm = torch.arange(seq_q + prefix)[None, :] >= (seq_q + prefix - lengths)[:, None]  # left padding
    expected = aha_attention(q, k, v, route, window, impl="reference", key_padding_mask=kpm, sink=sink)
    for impl in ["auto", *FAST_IMPLS] + (["decode"] if seq_q == 1 else []):
        out = aha_attention(q, k, v, route, window, impl=impl, key_padding_mask=kpm, sink=sink)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"{impl}: {m}")


@settings(max_examples=60, deadline=None)
@given(
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    seq_q=st.integers(1, 70),
    prefix=st.integers(0, 30),
    window=st.integers(1, 40),
    rho=st.sampled_from([0.0, 0.3, 1.0]),
    padded=st.booleans(),
    sink=st.sampled_from([0, 2]),
    gate=st.sampled_from(["bool", "binary", "soft"]),
    bad=st.lists(
        st.tuples(st.sampled_from("qkv"), st.floats(0, 1), st.sampled_from([math.nan, math.inf, -math.inf])), max_size=4
    ),
    seed=st.integers(0, 2**16),
)
def test_non_finite_inputs_poison_exactly_the_rows_that_read_them(
    batch, kv_heads, group, seq_q, prefix, window, rho, padded, sink, gate, bad, seed
):
    """NaN/inf in k or v (and NaN in q) reach exactly the rows (elements) that read them, as in the dense reference."""
    torch.manual_seed(seed)
    seq_kv = seq_q + prefix
    q, k, v = make_qkv(batch, kv_heads * group, kv_heads, seq_q, seq_kv, 16)
    tensors = {"q": q, "k": k, "v": v}
    for name, where, value in bad:
        flat = tensors[name].view(-1)
        flat[int(where * (flat.numel() - 1))] = math.nan if name == "q" else value
    route = torch.rand(batch, kv_heads * group, seq_q) < rho
    if gate != "bool":
        route = route.float() if gate == "binary" else torch.rand(route.shape)
    kpm = None
    if padded:
        lengths = torch.randint(1, seq_kv + 1, (batch,))
        kpm = torch.arange(seq_kv)[None, :] >= (seq_kv - lengths)[:, None]
    expected = aha_attention(q, k, v, route, window, impl="reference", key_padding_mask=kpm, sink=sink)
    nan = torch.tensor(math.nan)
    for impl in ["auto", *FAST_IMPLS] + (["decode"] if seq_q == 1 and gate != "soft" else []):
        out = aha_attention(q, k, v, route, window, impl=impl, key_padding_mask=kpm, sink=sink)
        assert torch.equal(torch.isfinite(out), torch.isfinite(expected)), impl
        out, want = (torch.where(torch.isfinite(t), t, nan) for t in (out, expected))  # inf or NaN: both poisoned
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5, equal_nan=True, msg=lambda m, impl=impl: f"{impl}: {m}")


@pytest.mark.parametrize("impl", ["auto", *FAST_IMPLS])
def test_a_nan_key_is_not_hidden_from_the_gradients_of_the_queries_that_read_it(impl):
    """Forward: exactly the reading rows are NaN. Backward: their q gradients are NaN too (the dense
    backward, as SDPA's, may also spread NaN to other rows' gradients: not isolated)."""
    q, k, v = make_qkv(1, 2, 1, 40, 40, 16, requires_grad=True)
    with torch.no_grad():
        k[0, 0, 5, 0] = math.nan
    route = torch.tensor([[[True] * 40, [False] * 40]])  # head 0 global, head 1 local (window 4)
    out = aha_attention(q, k, v, route, 4, impl=impl)
    out.sum().backward()
    reads = torch.tensor([[p >= 5 for p in range(40)], [5 <= p <= 8 for p in range(40)]])
    assert torch.equal(~torch.isfinite(out[0]).all(-1), reads)
    assert (~torch.isfinite(q.grad[0]).all(-1))[reads].all()


def test_the_reference_poisons_only_rows_that_read_a_bad_key():
    q, k, v = make_qkv(1, 2, 1, 30, 30, 8)
    k[0, 0, 5, 3] = math.nan  # key 5
    route = torch.tensor([[[True] * 30, [False] * 30]])  # head 0 global, head 1 local (window 4)
    out = aha_attention(q, k, v, route, 4, impl="reference")
    poisoned = ~torch.isfinite(out).all(-1)[0]  # k[5] scores NaN: whole rows
    assert poisoned[0].tolist() == [p >= 5 for p in range(30)]  # every later global row reads key 5
    assert poisoned[1].tolist() == [5 <= p <= 8 for p in range(30)]  # local rows 5..8 hold it in their window
    clean = aha_attention(q[:, :, :5], k[:, :, :5], v[:, :, :5], route[:, :, :5], 4, impl="reference")
    torch.testing.assert_close(out[:, :, :5], clean)


@pytest.mark.parametrize("impl", ["split", *cpp_microkernels(torch.bfloat16)])
@pytest.mark.parametrize("rho", [0.1, 0.9])
def test_bf16_matches_reference_loosely(impl, rho):
    q, k, v = make_qkv(1, 4, 2, 200, 200, 32, dtype=torch.bfloat16)
    route = torch.rand(1, 4, 200) < rho
    expected = aha_attention(q, k, v, route, 24, impl="reference")
    out = aha_attention(q, k, v, route, 24, impl=impl)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_soft_gate_mixes_branches():
    q, k, v = make_qkv(1, 2, 2, 40, 40, 8)
    g = torch.rand(1, 2, 40)
    full = aha_attention(q, k, v, torch.ones(1, 2, 40, dtype=torch.bool), 6, impl="reference")
    local = aha_attention(q, k, v, torch.zeros(1, 2, 40, dtype=torch.bool), 6, impl="reference")
    expected = g[..., None] * full + (1 - g[..., None]) * local
    for impl in ["reference", *FAST_IMPLS]:
        torch.testing.assert_close(aha_attention(q, k, v, g, 6, impl=impl), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize("binary", [True, False])
def test_gate_gradient_is_branch_difference(impl, binary):
    q, k, v = make_qkv(1, 4, 2, 45, 45, 8)
    g = (torch.rand(1, 4, 45) < 0.3).float() if binary else torch.rand(1, 4, 45)
    g.requires_grad_(True)
    out = aha_attention(q, k, v, g, 7, impl=impl)
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    full = aha_attention(q, k, v, torch.ones(1, 4, 45, dtype=torch.bool), 7, impl="reference")
    local = aha_attention(q, k, v, torch.zeros(1, 4, 45, dtype=torch.bool), 7, impl="reference")
    torch.testing.assert_close(g.grad, (upstream * (full - local)).sum(-1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("rho", [0.0, 0.2, 0.8, 1.0])
@pytest.mark.parametrize("gate", [False, True])
@pytest.mark.parametrize("sink", [0, 2])
def test_qkv_gradients_match_reference(impl, rho, gate, sink):
    route = torch.rand(2, 6, 37) < rho
    if gate:
        route = route.float().requires_grad_(True)
    grads = []
    for name in ["reference", impl]:
        torch.manual_seed(1)
        q, k, v = make_qkv(2, 6, 3, 37, 45, 8, requires_grad=True)
        r = route.detach().clone().requires_grad_(True) if gate else route
        out = aha_attention(q, k, v, r, 9, impl=name, sink=sink)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([q.grad, k.grad, v.grad] + ([r.grad] if gate else []))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_default_scale_is_inverse_sqrt_dim():
    q, k, v = make_qkv(1, 2, 2, 10, 10, 16)
    route = torch.ones(1, 2, 10, dtype=torch.bool)
    a = aha_attention(q, k, v, route, 4)
    b = aha_attention(q, k, v, route, 4, scale=1 / math.sqrt(16))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(q=a["q"][0]), "4 dims"),
        (lambda a: a.update(k=torch.randn(1, 3, 10, 8), v=torch.randn(1, 3, 10, 8)), "multiple of kv_heads"),
        (lambda a: a.update(k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8)), "seq_kv >= seq_q"),
        (lambda a: a.update(v=torch.randn(1, 2, 11, 8)), "same shape"),
        (lambda a: a.update(window=0), "window must be >= 1"),
        (lambda a: a.update(window=2.5), "window must be an int"),
        (lambda a: a.update(sink=-1), "sink must be >= 0"),
        (lambda a: a.update(sink=True), "sink must be an int"),
        (lambda a: a.update(scale=float("nan")), "scale must be a finite number"),
        (lambda a: a.update(scale=float("inf")), "scale must be a finite number"),
        (lambda a: a.update(q=torch.randn(1, 4, 10, 0), k=torch.randn(1, 2, 10, 0), v=torch.randn(1, 2, 10, 0)), "head_dim is 0"),
        (lambda a: a.update(route=torch.ones(1, 4, 9, dtype=torch.bool)), "route must have shape"),
        (lambda a: a.update(route=torch.ones(1, 4, 10, dtype=torch.long)), "route must be bool"),
        (lambda a: a.update(route=torch.full((1, 4, 10), 1.5)), "lie in \\[0, 1\\]"),
        (lambda a: a.update(route=torch.full((1, 4, 10), float("nan"))), "NaN"),
        (lambda a: a.update(k=torch.randn(1, 2, 10, 8, dtype=torch.float64)), "share a dtype"),
        (lambda a: a.update(q=torch.randint(0, 3, (1, 4, 10, 8))), "floating-point"),
        (lambda a: a.update(impl="nope"), "unknown impl"),
        (lambda a: a.update(impl="cpp:amx"), "unknown impl"),
        (lambda a: a.update(impl="split:vector"), "unknown impl"),
        (lambda a: a.update(key_padding_mask=torch.ones(1, 9, dtype=torch.bool)), "key_padding_mask must have shape"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, message):
    args = dict(
        q=torch.randn(1, 4, 10, 8), k=torch.randn(1, 2, 10, 8), v=torch.randn(1, 2, 10, 8),
        route=torch.ones(1, 4, 10, dtype=torch.bool), window=4, impl="auto", key_padding_mask=None, sink=0,
        scale=None,
    )
    change(args)
    with pytest.raises(AhaInputError, match=message):
        aha_attention(args["q"], args["k"], args["v"], args["route"], args["window"], impl=args["impl"],
                      key_padding_mask=args["key_padding_mask"], sink=args["sink"], scale=args["scale"])


@pytest.mark.skipif(not cpp_microkernels(), reason="C++ kernel unavailable")
def test_a_microkernel_that_cannot_run_here_says_so():
    q, k, v = make_qkv(1, 2, 2, 10, 10, 16)
    # oneDNN switched off: its micro-GEMMs are unavailable
    with torch.backends.mkldnn.flags(enabled=False), pytest.raises(AhaInputError, match="cannot run torch.float32 here"):
        aha_attention(q, k, v, torch.ones(1, 2, 10, dtype=torch.bool), 4, impl="cpp:onednn")


@pytest.mark.parametrize("impl", ["reference", "auto", "decode", *FAST_IMPLS])
@pytest.mark.parametrize("seq_kv", [0, 7])
def test_no_queries_give_the_empty_output(impl, seq_kv):
    q, k, v = make_qkv(1, 4, 2, 0, seq_kv, 16, requires_grad=True)
    out = aha_attention(q, k, v, torch.zeros(1, 4, 0, dtype=torch.bool), 3, impl=impl)
    assert out.shape == (1, 4, 0, 16)
    out.sum().backward()
    assert q.grad.shape == q.shape


@pytest.mark.parametrize("impl", ["reference", "auto", *FAST_IMPLS])
@pytest.mark.parametrize("seq_q", [1, 40])
def test_huge_windows_and_sinks_mean_every_key(impl, seq_q):
    """Values past the last key (say from a hand-edited config.json) neither crash nor overflow."""
    q, k, v = make_qkv(2, 4, 2, seq_q, 50, 16)
    route = torch.rand(2, 4, seq_q) < 0.5
    kpm = torch.ones(2, 50, dtype=torch.bool)
    kpm[1, :7] = False
    expected = aha_attention(q, k, v, route, 50, impl="reference", key_padding_mask=kpm, sink=50)
    for window, sink in [(2**31, 2**31), (2**32 + 3, 2**32), (2**62, 2**63 - 1)]:
        out = aha_attention(q, k, v, route, window, impl=impl, key_padding_mask=kpm, sink=sink)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_decode_rejects_multi_token_queries():
    q, k, v = make_qkv(1, 2, 2, 3, 10, 8)
    with pytest.raises(AhaInputError, match="seq_q == 1"):
        aha_attention(q, k, v, torch.ones(1, 2, 3, dtype=torch.bool), 4, impl="decode")
