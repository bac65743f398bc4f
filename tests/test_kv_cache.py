"""GrowingCache: appends in place, reads like transformers' DynamicCache, and is what generate uses."""

import pytest
import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import aha
from aha import GrowingCache
from aha.hf.kv_cache import GrowingLayer
from aha.hf.testing import TINY, tiny_model


def chunks(lengths, seed=0, batch=2, heads=3, dim=8):
    """Random (keys, values) ``[batch, heads, n, dim]`` for each ``n`` of ``lengths``."""
    generator = torch.Generator().manual_seed(seed)

    def random(n):
        return torch.randn(batch, heads, n, dim, generator=generator)

    return [(random(n), random(n)) for n in lengths]


def fill(layer, parts):
    for keys, values in parts:
        out_keys, out_values = layer.update(keys, values)
    return out_keys, out_values


@pytest.mark.parametrize("hint", [None, 4, 9, 100])
def test_growing_layer_holds_what_a_dynamic_layer_holds(hint):
    parts = chunks([5, 1, 1, 3, 1, 1])
    growing, dynamic = GrowingLayer(hint), DynamicLayer()
    for keys, values in parts:
        got, expected = growing.update(keys, values), dynamic.update(keys, values)
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert growing.get_seq_length() == dynamic.get_seq_length()


def test_growing_layer_writes_in_place_within_its_capacity():
    layer = GrowingLayer(capacity_hint=8)
    first = layer.update(*chunks([5])[0])[0]
    second = layer.update(*chunks([1], seed=1)[0])[0]
    assert second.data_ptr() == first.data_ptr()  # no copy of the first five positions
    assert layer._key_buffer.shape[2] == 8
    layer.update(*chunks([4], seed=2)[0])  # 10 > 8: reallocated, contents kept
    assert layer.get_seq_length() == 10 and layer._key_buffer.shape[2] >= 10


def test_unknown_length_grows_by_doubling():
    layer = GrowingLayer()
    allocations = set()
    for keys, values in chunks([1] * 64):
        layer.update(keys, values)
        allocations.add(layer._key_buffer.data_ptr())
    assert len(allocations) <= 7  # 2, 4, ..., 64 positions rather than one copy per token


@pytest.mark.parametrize("edit", ["crop", "reorder", "select", "reset"])
def test_growing_layer_after_cache_edits(edit):
    parts = chunks([6, 1, 1, 2])
    growing, dynamic = GrowingLayer(20), DynamicLayer()
    fill(growing, parts[:2]), fill(dynamic, parts[:2])
    for layer in (growing, dynamic):
        if edit == "crop":
            layer.crop(-3)
        elif edit == "reorder":
            layer.reorder_cache(torch.tensor([1, 0]))
        elif edit == "select":
            layer.batch_select_indices(torch.tensor([1, 0]))
        else:
            layer.reset()
    got, expected = fill(growing, parts[2:]), fill(dynamic, parts[2:])
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


def routed_model():
    return aha.convert(tiny_model("llama"), window=4, sink=1, router_init="random").eval()


def test_generate_builds_a_growing_cache_sized_for_the_call():
    model = routed_model()
    ids = torch.randint(3, TINY["vocab_size"], (1, 10), generator=torch.Generator().manual_seed(0))
    out = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, GrowingCache)
    assert {layer._key_buffer.shape[2] for layer in out.cache.layers} == {15}  # prompt + new - 1 written keys


@pytest.mark.parametrize("attention", ["aha", "sdpa"])
@pytest.mark.parametrize("num_beams", [1, 3])
def test_generation_with_the_growing_cache_equals_transformers_dynamic_cache(attention, num_beams):
    model = routed_model()
    model.set_attn_implementation(attention)
    ids = torch.randint(3, TINY["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(1))
    settings = {"max_new_tokens": 12, "min_new_tokens": 12, "do_sample": False, "num_beams": num_beams}
    growing = model.generate(ids, **settings)
    dynamic = model.generate(ids, cache=DynamicCache(config=model.config), **settings)
    assert growing.tolist() == dynamic.tolist()


def test_a_cache_the_caller_passes_is_kept():
    model = routed_model()
    ids = torch.randint(3, TINY["vocab_size"], (1, 8), generator=torch.Generator().manual_seed(2))
    mine = DynamicCache(config=model.config)
    out = model.generate(ids, max_new_tokens=3, do_sample=False, cache=mine, return_dict_in_generate=True)
    assert out.cache is mine
