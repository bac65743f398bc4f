"""aha.convert on tiny random models of every supported family: exactness, routing, overrides, errors."""

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaModel, MistralForCausalLM

import aha
from aha.hf import FusedRouterQueryProjection, SeparateRouterQueryProjection, routers
from aha.hf.testing import FAMILIES, TINY, tiny_model

WINDOW = 5
SEQ = 24  # several windows long, so local and global attention differ


def tokens(batch: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, **kwargs).logits


def band_mask(seq: int, window: int, sink: int = 0) -> torch.Tensor:
    """Additive [1, 1, seq, seq] mask: query p sees keys p - window + 1 .. p (its own included)
    and the first ``sink`` keys up to p."""
    offset = torch.arange(seq)[:, None] - torch.arange(seq)[None, :]
    allowed = (offset >= 0) & ((offset < window) | (torch.arange(seq)[None, :] < sink))
    return torch.zeros(seq, seq).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["separate", "fused"])
def test_open_conversion_reproduces_the_original_logits(family, layout):
    model = tiny_model(family)
    ids = tokens()
    expected = logits(model, ids)
    assert aha.convert(model, window=WINDOW, router_layout=layout) is model
    torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)  # float rounding of the kernel
    projection = FusedRouterQueryProjection if layout == "fused" else SeparateRouterQueryProjection
    assert all(isinstance(q_proj, projection) for q_proj in routers(model).values())
    assert type(model).__name__ == f"Aha{type(model).__mro__[2].__name__}"
    assert model.config.model_type == f"aha_{family}" and model.config._attn_implementation == "aha"


@pytest.mark.parametrize("family", FAMILIES)
def test_open_conversion_with_left_padding_matches_the_original_on_real_tokens(family):
    model = tiny_model(family)
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[0, :7] = 0
    expected = logits(model, ids, attention_mask=mask)
    aha.convert(model, window=WINDOW)
    got = logits(model, ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_forced_global_equals_the_original_and_forced_local_equals_a_band_mask(family):
    original = tiny_model(family)
    ids = tokens()
    expected_global = logits(original, ids)
    reference = copy.deepcopy(original)
    reference.set_attn_implementation("eager")
    expected_local = logits(reference, ids, attention_mask=band_mask(SEQ, WINDOW))

    model = aha.convert(original, window=WINDOW, router_init="random")
    learned = logits(model, ids)
    with aha.force_routing(model, "global"):
        torch.testing.assert_close(logits(model, ids), expected_global, rtol=1e-5, atol=1e-5)
    with aha.force_routing(model, "local"):
        torch.testing.assert_close(logits(model, ids), expected_local, rtol=1e-5, atol=1e-5)
    # the learned (random, mixed) routes are really used: they match neither extreme
    assert (learned - expected_global).abs().max() > 1e-4
    assert (learned - expected_local).abs().max() > 1e-4


@pytest.mark.parametrize("family", ["llama", "olmo2"])
def test_a_sink_lets_local_heads_see_the_first_keys_and_survives_save_and_load(family, tmp_path):
    original = tiny_model(family)
    ids = tokens()
    reference = copy.deepcopy(original)
    reference.set_attn_implementation("eager")
    expected_local = logits(reference, ids, attention_mask=band_mask(SEQ, WINDOW, sink=2))
    model = aha.convert(original, window=WINDOW, sink=2, router_init="random")
    with aha.force_routing(model, "local"):
        torch.testing.assert_close(logits(model, ids), expected_local, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    loaded = aha.from_pretrained(tmp_path)
    assert aha.AhaSettings.from_config(loaded.config).sink == 2
    with aha.force_routing(loaded, "local"):
        torch.testing.assert_close(logits(loaded, ids), expected_local, rtol=1e-5, atol=1e-5)


def test_forced_local_equals_mistral_sliding_window_attention():
    """An independent reference for the window's off-by-one: Mistral's own sliding window (w keys, own included)."""
    model = tiny_model("mistral")
    windowed = MistralForCausalLM(copy.deepcopy(model.config)).eval()
    windowed.config.sliding_window = WINDOW
    windowed.load_state_dict(model.state_dict())
    ids = tokens()
    aha.convert(model, window=WINDOW)
    with aha.force_routing(model, "local"):
        torch.testing.assert_close(logits(model, ids), logits(windowed, ids), rtol=1e-5, atol=1e-5)
    with aha.force_routing(model, "local"):
        shifted = aha.hf.AhaSettings(window=WINDOW + 1)  # one key more is measurably different
        model.config.aha = shifted.to_dict()
        assert (logits(model, ids) - logits(windowed, ids)).abs().max() > 1e-4


def test_only_the_chosen_layers_are_routed():
    model = tiny_model("llama", num_hidden_layers=3)
    ids = tokens()
    expected = logits(model, ids)
    aha.convert(model, window=WINDOW, layers=[1], router_init="random")
    assert list(routers(model)) == [1]
    assert model.config.aha["layers"] == [1]
    with pytest.raises(RuntimeError, match="run a forward pass"):
        aha.router_logits(model)
    with aha.force_routing(model, "global"):
        torch.testing.assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)
    assert [item.shape for item in aha.router_logits(model)] == [(2, 4, SEQ)]
    with pytest.raises(ValueError, match="not converted"), aha.force_routing(model, "local", layers=[0]):
        pass


def test_router_logits_follow_every_forward_and_keep_the_graph_in_training():
    model = aha.convert(tiny_model("qwen2"), window=WINDOW)
    logits(model, tokens(seq=10))
    first = aha.router_logits(model)
    assert len(first) == 2 and all(item.shape == (2, 4, 10) and not item.requires_grad for item in first)
    model.train()
    out = model(tokens(batch=1, seq=SEQ), labels=tokens(batch=1, seq=SEQ))
    current = aha.router_logits(model)
    assert all(item.shape == (1, 4, SEQ) and item.requires_grad for item in current)
    # straight-through gate: the LM loss alone reaches the router weights (the gate is exactly 1 forward)
    out.loss.backward()
    router_grads = [q_proj.router.proj.weight.grad for q_proj in routers(model).values()]
    assert all(grad is not None and grad.abs().sum() > 0 for grad in router_grads)
    sparsity = torch.stack([torch.sigmoid(item).mean() for item in current]).mean().detach()
    assert 0.9 < sparsity.item() < 1.0  # open routers: sigmoid(OPEN_BIAS) = 0.982


def test_training_mode_routes_with_the_float_gate_and_eval_mode_with_bool():
    model = aha.convert(tiny_model("llama"), window=WINDOW, router_init="random")
    q_proj = routers(model)[0]
    seen = []
    q_proj.route_observers.append(lambda route, first, valid: seen.append(route.dtype))
    logits(model, tokens())
    model.train()
    model(tokens())
    assert seen == [torch.bool, torch.float32]


def test_track_routing_counts_real_tokens_and_forced_routes():
    model = aha.convert(tiny_model("olmo2"), window=WINDOW, router_init="random")
    ids = tokens()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    with aha.track_routing(model) as stats:
        logits(model, ids, attention_mask=mask)
    real_tokens = int(mask.sum())
    assert stats.total_pairs.tolist() == [[real_tokens] * 4] * 2
    assert 0.0 < stats.global_fraction < 1.0
    with aha.track_routing(model) as stats, aha.force_routing(model, "local", layers=[1], heads=[0, 2]):
        logits(model, ids)
    per_head = stats.per_head()
    assert per_head[1, 0] == 0 and per_head[1, 2] == 0
    assert per_head[0].tolist() != [0.0] * 4
    assert not routers(model)[0].route_observers  # observers removed on exit
    logits(model, ids)
    assert stats.total_pairs.sum() == 2 * 4 * ids.numel()  # nothing counted after the block


def test_force_routing_restores_and_nests():
    model = aha.convert(tiny_model("llama"), window=WINDOW, router_init="random")
    ids = tokens()
    learned = logits(model, ids)
    with aha.force_routing(model, "local"):
        local = logits(model, ids)
        with aha.force_routing(model, None, heads=[1]):
            partly = logits(model, ids)
        torch.testing.assert_close(logits(model, ids), local, rtol=0, atol=0)
    torch.testing.assert_close(logits(model, ids), learned, rtol=0, atol=0)
    assert (partly - local).abs().max() > 0
    assert all(q_proj.forced_route is None for q_proj in routers(model).values())
    with pytest.raises(ValueError, match="'global', 'local' or None"), aha.force_routing(model, "all"):
        pass
    with pytest.raises(ValueError, match="heads must be in 0..3"), aha.force_routing(model, "local", heads=[4]):
        pass


def test_fused_layout_widens_q_proj_by_one_row_per_head():
    model = tiny_model("olmo2")
    aha.convert(model, router_layout="fused")
    q_proj = routers(model)[0]
    heads, head_dim = TINY["num_attention_heads"], TINY["hidden_size"] // TINY["num_attention_heads"]
    assert q_proj.weight.shape == (heads * head_dim + heads, TINY["hidden_size"])
    assert "model.layers.0.self_attn.q_proj.weight" in model.state_dict()
    with pytest.raises(ValueError, match="router_bias=True"):
        aha.convert(tiny_model("olmo2"), router_layout="fused", router_bias=False)


def test_unsupported_models_fail_with_the_supported_list():
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(aha.UnsupportedModelError, match="LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"):
        aha.convert(gpt2)
    with pytest.raises(aha.UnsupportedModelError, match="language-model head"):
        aha.convert(LlamaModel(tiny_model("llama").config))
    with pytest.raises(aha.UnsupportedModelError, match="sliding_window=16"):
        aha.convert(tiny_model("mistral", sliding_window=16))
    model = aha.convert(tiny_model("llama"))
    with pytest.raises(aha.UnsupportedModelError, match="already an AHA model"):
        aha.convert(model)
    with pytest.raises(ValueError, match="layers \\[7\\] do not exist"):
        aha.convert(tiny_model("llama"), layers=[7])
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        aha.convert(tiny_model("llama"), window=0)
    with pytest.raises(ValueError, match="sink must be an int >= 0"):
        aha.convert(tiny_model("llama"), sink=-1)


def test_packed_sequences_are_rejected_with_a_clear_error():
    model = aha.convert(tiny_model("llama"), window=WINDOW)
    position_ids = torch.cat([torch.arange(12), torch.arange(12)])[None]
    with pytest.raises(aha.AhaInputError, match="packed sequences"):
        logits(model, tokens(batch=1), position_ids=position_ids, use_cache=False)


def test_lora_wrapped_models_keep_routing():
    peft = pytest.importorskip("peft")
    model = aha.convert(tiny_model("llama"), window=WINDOW, router_init="random")
    ids = tokens()
    expected = logits(model, ids)
    wrapped = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert list(routers(wrapped)) == [0, 1]
    torch.testing.assert_close(logits(wrapped, ids), expected, rtol=1e-5, atol=1e-5)  # LoRA B starts at zero
    with aha.track_routing(wrapped) as stats, aha.force_routing(wrapped, "local", layers=[0]):
        logits(wrapped, ids)
    assert stats.per_layer()[0] == 0 and 0 < stats.per_layer()[1] < 1
    assert [item.shape for item in aha.router_logits(wrapped)] == [(2, 4, SEQ)] * 2


def test_caches_and_models_aha_attention_cannot_serve_fail_clearly():
    model = aha.convert(tiny_model("llama"), window=WINDOW)
    with pytest.raises(aha.AhaInputError, match="use the default DynamicCache"):
        model.generate(tokens(batch=1, seq=8), max_new_tokens=2, cache_implementation="static")
    plain = tiny_model("llama")
    plain.set_attn_implementation("aha")
    with pytest.raises(aha.AhaInputError, match="aha.convert"):
        logits(plain, tokens())
