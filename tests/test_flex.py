"""impl='flex': sorted-route masks and BlockMask against the AHA mask, CPU forward (CUDA: test_gpu.py)."""

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aha import AhaInputError, aha_attention
from aha.kernels import flex

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # eager FlexAttention warns it is unfused


def aha_mask(route, seq_kv, window, key_padding_mask, sink):
    """Dense ``[B, H, Sq, Skv]`` mask of the AHA definition (padded queries keep their own key)."""
    seq_q = route.shape[-1]
    qpos = torch.arange(seq_kv - seq_q, seq_kv)[:, None]
    kpos = torch.arange(seq_kv)[None, :]
    causal = kpos <= qpos
    first_real = 0 if key_padding_mask is None else key_padding_mask.int().argmax(-1)[:, None, None, None]
    is_sink = (kpos >= first_real) & (kpos < first_real + sink)
    allowed = causal & (route[..., None] | (kpos > qpos - window) | is_sink)
    if key_padding_mask is not None:
        allowed = (allowed & key_padding_mask[:, None, None, :]) | (kpos == qpos)
    return allowed


def random_case(seed, batch, heads, seq_q, prefix, window, rho, padded):
    gen = torch.Generator().manual_seed(seed)
    seq_kv = seq_q + prefix
    route = torch.rand(batch, heads, seq_q, generator=gen) < rho
    kpm = None
    if padded:  # left padding plus a random hole: the general case
        kpm = torch.rand(batch, seq_kv, generator=gen) > 0.2
        kpm[:, : seq_kv // 5] = False
    return route, seq_kv, kpm


CASES = dict(
    seed=st.integers(0, 2**16),
    batch=st.integers(1, 2),
    heads=st.integers(1, 3),
    seq_q=st.integers(1, 300),
    prefix=st.integers(0, 140),
    window=st.integers(1, 200),
    rho=st.sampled_from([0.0, 0.1, 0.5, 1.0]),
    padded=st.booleans(),
    sink=st.sampled_from([0, 0, 3, 150]),
)


@settings(max_examples=40, deadline=None)
@given(**CASES)
def test_sorted_mask_mod_is_the_aha_mask(seed, batch, heads, seq_q, prefix, window, rho, padded, sink):
    route, seq_kv, kpm = random_case(seed, batch, heads, seq_q, prefix, window, rho, padded)
    sr = flex.SortedRoute(route, seq_kv, window, kpm, sink)
    mask_mod = flex.route_mask_mod(sr, window, kpm)
    b, h, qi, kv = torch.meshgrid(
        torch.arange(batch), torch.arange(heads), torch.arange(seq_q), torch.arange(seq_kv), indexing="ij"
    )
    sorted_mask = mask_mod(b, h, qi, kv)
    unsorted = torch.empty_like(sorted_mask).scatter(2, sr.order[..., None].expand_as(sorted_mask), sorted_mask)
    assert torch.equal(unsorted, aha_mask(route, seq_kv, window, kpm, sink))
    # globals first (latest position first), then locals in position order
    is_global = sr.is_global[..., :seq_q]
    assert torch.equal(is_global, torch.sort(route.to(torch.uint8), dim=-1, descending=True).values.bool())
    position = sr.position[..., :seq_q]
    steps = position[..., 1:] - position[..., :-1]
    assert torch.all(torch.where(is_global[..., 1:], steps < 0, steps > 0) | (is_global[..., :-1] & ~is_global[..., 1:]))


@settings(max_examples=40, deadline=None)
@given(**CASES)
def test_block_mask_covers_every_allowed_pair_and_full_blocks_need_no_mask(
    seed, batch, heads, seq_q, prefix, window, rho, padded, sink
):
    route, seq_kv, kpm = random_case(seed, batch, heads, seq_q, prefix, window, rho, padded)
    sr = flex.SortedRoute(route, seq_kv, window, kpm, sink)
    mask_mod = flex.route_mask_mod(sr, window, kpm)
    bm = flex.route_block_mask(sr, seq_q, seq_kv, mask_mod, kpm)
    q_blocks, kv_blocks = -(-seq_q // flex.BLOCK), -(-seq_kv // flex.BLOCK)

    def dense(num, indices):
        slots = torch.arange(kv_blocks) < num[..., None].long()  # the first num entries are the blocks
        out = torch.zeros(batch, heads, q_blocks, kv_blocks + 1, dtype=torch.bool)
        out.scatter_(-1, torch.where(slots, indices.long(), kv_blocks), True)
        return out[..., :kv_blocks]

    partial = dense(bm.kv_num_blocks, bm.kv_indices)
    full = dense(bm.full_kv_num_blocks, bm.full_kv_indices)
    assert not (partial & full).any()
    b, h, qi, kv = torch.meshgrid(
        torch.arange(batch), torch.arange(heads), torch.arange(seq_q), torch.arange(seq_kv), indexing="ij"
    )
    allowed = mask_mod(b, h, qi, kv)
    pad_q, pad_kv = q_blocks * flex.BLOCK - seq_q, kv_blocks * flex.BLOCK - seq_kv
    allowed_blocks = torch.nn.functional.pad(allowed, (0, pad_kv, 0, pad_q)).unflatten(2, (q_blocks, -1)).unflatten(
        -1, (kv_blocks, -1)
    )  # [B, H, qb, BLOCK, kb, BLOCK]
    any_allowed = allowed_blocks.any(-1).any(-2)
    assert not (any_allowed & ~(partial | full)).any(), "a needed KV block is missing"
    real = torch.nn.functional.pad(torch.ones(seq_q, seq_kv, dtype=torch.bool), (0, pad_kv, 0, pad_q))
    real = real.unflatten(0, (q_blocks, -1)).unflatten(-1, (kv_blocks, -1))  # [qb, BLOCK, kb, BLOCK]
    all_allowed = (allowed_blocks | ~real).all(-1).all(-2)
    assert not (full & ~all_allowed).any(), "a full block contains a masked pair"


@pytest.mark.parametrize(
    "batch, q_heads, kv_heads, seq_q, seq_kv, window, rho, padded, sink",
    [
        (1, 2, 2, 150, 150, 17, 0.2, False, 0),
        (2, 4, 2, 70, 200, 40, 0.5, True, 0),
        (1, 2, 1, 130, 130, 300, 0.1, False, 0),
        (1, 2, 2, 300, 300, 17, 0.2, False, 140),
        (2, 4, 2, 70, 200, 40, 0.5, True, 2),
    ],
)
def test_flex_eager_forward_matches_reference(
    monkeypatch, batch, q_heads, kv_heads, seq_q, seq_kv, window, rho, padded, sink
):
    monkeypatch.setattr(flex, "USE_COMPILE", False)
    q = torch.randn(batch, q_heads, seq_q, 16)
    k, v = torch.randn(2, batch, kv_heads, seq_kv, 16)
    route = torch.rand(batch, q_heads, seq_q) < rho
    kpm = None
    if padded:
        kpm = torch.ones(batch, seq_kv, dtype=torch.bool)
        kpm[0, :30] = False
        kpm[-1, 90:99] = False
    expected = aha_attention(q, k, v, route, window, impl="reference", key_padding_mask=kpm, sink=sink)
    with torch.no_grad():
        out = aha_attention(q, k, v, route, window, impl="flex", key_padding_mask=kpm, sink=sink)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_flex_refuses_gradients_on_cpu():
    q, k, v = torch.randn(3, 1, 2, 20, 16, requires_grad=True)
    with pytest.raises(AhaInputError, match="(?i)no backward on cpu"):
        aha_attention(q, k, v, torch.rand(1, 2, 20) < 0.5, 4, impl="flex")


@pytest.mark.slow
def test_flex_compiled_cpu_forward_matches_reference(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    q, k, v = torch.randn(3, 1, 2, 300, 32)
    route = torch.rand(1, 2, 300) < 0.1
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = aha_attention(q, k, v, route, 64, impl="flex")
    torch.testing.assert_close(out, aha_attention(q, k, v, route, 64, impl="reference"), atol=1e-5, rtol=1e-5)

