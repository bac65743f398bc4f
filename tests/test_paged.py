"""paged_decode_attention: one decode step of many sequences in a paged cache, against aha_attention per sequence."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aha import AhaInputError, aha_attention
from aha.kernels import cpp
from aha.kernels.paged import paged_decode_attention

needs_kernel = pytest.mark.skipif(not cpp.cpp_available(), reason="C++ kernel unavailable")


def paged_case(requests, q_heads, kv_heads, dim, block_size, blocks_total, seed, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    kv_cache = torch.randn(blocks_total, kv_heads, block_size, 2 * dim, generator=generator).to(dtype)
    q = torch.randn(requests, q_heads, dim, generator=generator).to(dtype)
    blocks = torch.randperm(blocks_total, generator=generator)[:requests]
    lengths = torch.randint(1, block_size + 1, (requests,), generator=generator)
    route = torch.rand(requests, q_heads, generator=generator) < 0.4
    return q, kv_cache, blocks, lengths, route


def one_by_one(q, kv_cache, blocks, lengths, route, window, sink):
    """The reference: aha.aha_attention over each sequence's own keys."""
    dim = q.shape[-1]
    rows = []
    for r in range(q.shape[0]):
        cached = kv_cache[blocks[r], :, : lengths[r]].unsqueeze(0)
        rows.append(
            aha_attention(
                q[r, :, None].unsqueeze(0), cached[..., :dim], cached[..., dim:], route[r, :, None].unsqueeze(0), window,
                sink=sink, impl="reference",
            )[0, :, 0]
        )  # fmt: skip
    return torch.stack(rows)


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(
    requests=st.integers(1, 6),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 3]),
    dim=st.sampled_from([16, 64]),
    block_size=st.integers(1, 1400),
    window=st.integers(1, 300),
    sink=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_cpp_equals_one_call_per_sequence(requests, kv_heads, group, dim, block_size, window, sink, seed):
    """Sequences of different lengths, blocks out of order, GQA, windows and sinks, chunks of 512 keys."""
    q, kv_cache, blocks, lengths, route = paged_case(requests, kv_heads * group, kv_heads, dim, block_size, requests + 2, seed)
    got = paged_decode_attention(q, kv_cache, blocks, lengths, route, window, sink=sink, impl="cpp")
    want = one_by_one(q, kv_cache, blocks, lengths, route, window, sink)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_half_precision(dtype, tol):
    q, kv_cache, blocks, lengths, route = paged_case(5, 9, 3, 64, 900, 7, 0, dtype)
    got = paged_decode_attention(q, kv_cache, blocks, lengths, route, 128, sink=1, impl="cpp")
    want = one_by_one(q.float(), kv_cache.float(), blocks, lengths, route, 128, 1)
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@needs_kernel
def test_a_strided_cache_is_read_in_place_and_out_of_window_nan_never_reaches_local_rows():
    q, kv_cache, blocks, lengths, route = paged_case(3, 4, 2, 32, 600, 5, 1)
    cache = kv_cache.transpose(1, 2).contiguous().transpose(1, 2)  # [blocks, kv_heads, block_size, 2D], other strides
    route[:] = False
    lengths[:] = 600
    cache[blocks[0], :, :500] = float("nan")  # before every local row's window (100 keys)
    got = paged_decode_attention(q, cache, blocks, lengths, route, 100, impl="cpp")
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, one_by_one(q, cache, blocks, lengths, route, 100, 0), atol=1e-5, rtol=1e-5)


def test_a_nan_a_global_row_reads_poisons_that_row_only():
    q, kv_cache, blocks, lengths, route = paged_case(2, 2, 1, 16, 50, 2, 2)
    lengths[:] = 50
    route[:] = torch.tensor([[True, False], [False, False]])
    kv_cache[blocks[0], 0, 3, 16] = float("nan")  # channel 0 of the value of key 3 of sequence 0
    got = paged_decode_attention(q, kv_cache, blocks, lengths, route, 8)
    assert torch.isnan(got[0, 0, 0]) and torch.isfinite(got[0, 0, 1:]).all()  # the global row's channel 0
    assert torch.isfinite(got[0, 1]).all() and torch.isfinite(got[1]).all()  # local rows never read key 3
    torch.testing.assert_close(got, one_by_one(q, kv_cache, blocks, lengths, route, 8, 0), equal_nan=True)


def test_loop_serves_what_cpp_cannot():
    q, kv_cache, blocks, lengths, route = paged_case(2, 2, 2, 8, 40, 3, 3)  # head_dim 8: not a multiple of 16
    with pytest.raises(AhaInputError, match="multiple of 16"):
        paged_decode_attention(q, kv_cache, blocks, lengths, route, 5, impl="cpp")
    got = paged_decode_attention(q, kv_cache, blocks, lengths, route, 5)
    torch.testing.assert_close(got, one_by_one(q, kv_cache, blocks, lengths, route, 5, 0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.update(q=a["q"][..., :4]), "2 \\* head_dim"),
        (lambda a: a.update(lengths=a["lengths"] * 0), "lengths must be in"),
        (lambda a: a.update(lengths=a["lengths"].int()), "lengths must be int64"),
        (lambda a: a.update(blocks=a["blocks"] + 10), "blocks must be in"),
        (lambda a: a.update(route=a["route"].float()), "route must be bool"),
        (lambda a: a.update(window=0), "window must be"),
        (lambda a: a.update(kv_cache=a["kv_cache"][:, :1].expand(-1, 3, -1, -1)), "multiple of kv_heads"),
    ],
)
def test_bad_inputs_name_the_fix(change, message):
    q, kv_cache, blocks, lengths, route = paged_case(2, 4, 2, 16, 30, 3, 4)
    args = {"q": q, "kv_cache": kv_cache, "blocks": blocks, "lengths": lengths, "route": route, "window": 4}
    change(args)
    with pytest.raises(AhaInputError, match=message):
        paged_decode_attention(**args)
