"""Saving and loading AHA models: our loader, AutoModelForCausalLM, and the released AHA-OLMO2 layout."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import aha
from aha.hf import FusedRouterQueryProjection, routers
from aha.hf.modeling import empty_model
from aha.hf.testing import TINY, tiny_model

WINDOW = 5


def tokens(batch: int = 2, seq: int = 24) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(("family", "layout"), [("llama", "separate"), ("qwen2", "fused"), ("olmo2", "fused"), ("qwen3", "separate")])
def test_save_then_load_reproduces_logits_exactly_with_both_loaders(tmp_path, family, layout):
    model = aha.convert(tiny_model(family), window=WINDOW, router_init="random", router_layout=layout, layers=[1])
    ids = tokens()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == f"aha_{family}"
    assert saved["aha"] == {
        "version": aha.AhaSettings.VERSION,
        "window": WINDOW,
        "sink": 0,
        "threshold": 0.5,
        "router_layout": layout,
        "router_init": "random",
        "router_bias": True,
        "layers": [1],
    }

    for loaded in (aha.from_pretrained(tmp_path), AutoModelForCausalLM.from_pretrained(tmp_path)):
        assert type(loaded) is type(model) and not loaded.training
        assert loaded.config._attn_implementation == "aha" and list(routers(loaded)) == [1]
        torch.testing.assert_close(logits(loaded, ids), expected, rtol=0, atol=0)


def test_an_explicit_attn_implementation_loads_the_unrouted_baseline(tmp_path):
    model = aha.convert(tiny_model("llama"), window=WINDOW, router_init="random")
    ids = tokens()
    model.save_pretrained(tmp_path)
    baseline = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    with aha.force_routing(model, "global"):
        torch.testing.assert_close(logits(baseline, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def test_a_fresh_aha_model_from_config_starts_with_open_routers():
    base = tiny_model("llama")
    settings = aha.AhaSettings(window=WINDOW)
    fields = {key: value for key, value in base.config.to_dict().items() if key != "model_type"}
    config = AutoConfig.for_model("aha_llama", **fields, aha=settings.to_dict())
    model = AutoModelForCausalLM.from_config(config).eval()
    with aha.track_routing(model) as stats:
        logits(model, tokens())
    assert stats.global_fraction == 1.0


def write_released_aha_olmo2(folder, base, router_rows: list[torch.Tensor]) -> None:
    """A folder in the released AHA-OLMO2 format: model_type "faolmo", q_proj = [queries; one router row per head]."""
    state = base.state_dict()
    for index, rows in enumerate(router_rows):
        key = f"model.layers.{index}.self_attn.q_proj.weight"
        state[key] = torch.cat([state[key], rows])
    save_file({name: tensor.contiguous() for name, tensor in state.items()}, folder / "model.safetensors")
    config = base.config.to_dict() | {
        "model_type": "faolmo",
        "architectures": ["FAOlmoForCausalLM"],
        "attention_implementation": "greedy",
        "local_window_size": WINDOW,
    }
    (folder / "config.json").write_text(json.dumps(config))


def test_the_released_aha_olmo2_layout_loads_and_routes(tmp_path):
    base = tiny_model("olmo2")
    heads, hidden = TINY["num_attention_heads"], TINY["hidden_size"]
    router_rows = [torch.randn(heads, hidden, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    write_released_aha_olmo2(tmp_path, base, router_rows)

    model, info = aha.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.config.aha["window"] == WINDOW and model.config.aha["router_layout"] == "fused"
    q_proj = routers(model)[0]
    assert isinstance(q_proj, FusedRouterQueryProjection) and q_proj.bias is None
    torch.testing.assert_close(q_proj.weight[-heads:], router_rows[0], rtol=0, atol=0)

    ids = tokens()
    with aha.track_routing(model) as stats:
        routed = logits(model, ids)
    # OLMo-2 attention reads the raw residual stream: for layer 0, the token embeddings
    embeddings = base.model.embed_tokens(ids)
    expected_logits = (embeddings @ router_rows[0].T).transpose(1, 2)
    torch.testing.assert_close(aha.router_logits(model)[0], expected_logits, rtol=1e-5, atol=1e-5)
    assert 0.2 < stats.global_fraction < 0.8
    with aha.force_routing(model, "global"):
        torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=1e-5, atol=1e-5)
    assert (routed - logits(base, ids)).abs().max() > 1e-4


@pytest.mark.parametrize("kind", ["plain", "tied", "aha-separate", "aha-fused", "released"])
def test_a_model_built_without_weights_is_the_loaded_one_with_parameters_on_meta(tmp_path, kind):
    """What FSDP processes other than the main one build (``aha.load_model(..., weights=False)``): same class,
    parameter names, shapes and dtypes, no parameter memory; non-persistent buffers (rotary ``inv_freq``) real."""
    if kind == "released":
        base = tiny_model("olmo2")
        write_released_aha_olmo2(tmp_path, base, [torch.randn(TINY["num_attention_heads"], TINY["hidden_size"])] * 2)
    else:
        model = tiny_model("olmo2" if kind == "aha-fused" else "llama", tie_word_embeddings=kind == "tied")
        if kind.startswith("aha"):
            aha.convert(model, window=WINDOW, router_init="random", router_layout=kind.removeprefix("aha-"))
        model.save_pretrained(tmp_path)
    loaded = aha.from_pretrained(tmp_path)
    empty = empty_model(tmp_path)
    assert type(empty) is type(loaded)
    assert {name: (p.shape, p.dtype) for name, p in empty.named_parameters()} == {
        name: (p.shape, p.dtype) for name, p in loaded.named_parameters()
    }
    assert all(p.is_meta for p in empty.parameters())
    buffers = dict(loaded.named_buffers())
    assert buffers and {name for name, _ in empty.named_buffers()} == set(buffers)
    for name, buffer in empty.named_buffers():
        torch.testing.assert_close(buffer, buffers[name], rtol=0, atol=0)


@pytest.mark.parametrize("layout", ["separate", "fused"])
def test_loading_plain_weights_into_an_aha_class_initialises_the_missing_routers(tmp_path, layout):
    base = tiny_model("llama")
    ids = tokens()
    base.save_pretrained(tmp_path)
    fields = {key: value for key, value in base.config.to_dict().items() if key != "model_type"}
    config = AutoConfig.for_model("aha_llama", **fields, aha=aha.AhaSettings(window=WINDOW, router_layout=layout).to_dict())
    if layout == "fused":  # the widened q_proj cannot take the plain checkpoint's q_proj
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            AutoModelForCausalLM.from_pretrained(tmp_path, config=config)
        return
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, config=config, output_loading_info=True)
    assert sorted(info["missing_keys"]) == [
        f"model.layers.{i}.self_attn.q_proj.router.proj.{name}" for i in range(2) for name in ("bias", "weight")
    ]
    torch.testing.assert_close(logits(model, ids), logits(base, ids), rtol=1e-5, atol=1e-5)  # open routers


def _edit_aha_block(folder, change):
    config = json.loads((folder / "config.json").read_text())
    change(config["aha"])
    (folder / "config.json").write_text(json.dumps(config))


def test_config_aha_blocks_are_validated_migrated_and_warned_about(tmp_path):
    model = aha.convert(tiny_model("llama"), window=WINDOW, router_init="random", sink=1)
    model.save_pretrained(tmp_path)
    ids = tokens()
    expected = logits(model, ids)

    _edit_aha_block(tmp_path, lambda block: block.update(future_setting=3))  # written by a newer aha
    with pytest.warns(UserWarning, match="ignoring unknown key.*future_setting"):
        reloaded = aha.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, ids), expected)

    _edit_aha_block(tmp_path, lambda block: block.update(version=aha.AhaSettings.VERSION + 1))
    with pytest.raises(ValueError, match="upgrade aha"):
        aha.from_pretrained(tmp_path)

    # version 1: no "version" key, written before sink existed: its default (0) and the default threshold
    _edit_aha_block(tmp_path, lambda block: [block.pop(key) for key in ("version", "future_setting", "sink", "threshold")])
    older = aha.from_pretrained(tmp_path)
    assert older.config.aha["sink"] == 0 and older.config.aha["threshold"] == 0.5
    assert older.config.aha["version"] == aha.AhaSettings.VERSION  # migrated: saved again, it is the current version
    logits(older, ids)  # the first forward reads every key: nothing is missing any more

    _edit_aha_block(tmp_path, lambda block: block.pop("window"))
    with pytest.raises(ValueError, match='no "window"'):
        aha.from_pretrained(tmp_path)
    _edit_aha_block(tmp_path, lambda block: block.update(window=-4))
    with pytest.raises(ValueError, match="window must be an int >= 1"):
        aha.from_pretrained(tmp_path)


def test_settings_are_parsed_once_per_block_and_checked_against_requests():
    model = aha.convert(tiny_model("llama"), window=WINDOW, sink=1)
    settings = aha.AhaSettings.of(model.config)
    assert settings == aha.AhaSettings(window=WINDOW, sink=1)
    assert aha.AhaSettings.of(model.config) is settings  # the hot path reads a cached object
    model.config.aha["window"] = WINDOW + 1  # a block edited in place is read again
    assert aha.AhaSettings.of(model.config).window == WINDOW + 1
    settings.check_matches("m", window=WINDOW, sink=None)  # None: not requested
    with pytest.raises(ValueError, match="m is already an AHA model with window=5, sink=1; omit --sink or pass 1"):
        settings.check_matches("m", window=WINDOW, sink=0)


def _edit_weights(folder, change):
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


ROUTER = "model.layers.{}.self_attn.q_proj.router.proj.{}"


def _nan(state, key):
    state[key] = torch.full_like(state[key], float("nan"))


@pytest.mark.parametrize(
    ("layout", "change", "message"),
    [
        ("separate", lambda s: s.pop(ROUTER.format(1, "bias")), r"missing from the checkpoint: model.layers.1.self_attn.q_proj.router.proj.bias\. Its routers"),
        (
            "separate",
            lambda s: [s.pop(ROUTER.format(i, name)) for i in range(2) for name in ("weight", "bias")],
            r"missing from the checkpoint: model.layers.0.self_attn.q_proj.router.proj.bias, .*layers.1.self_attn.q_proj.router.proj.weight\. Its routers",
        ),
        ("separate", lambda s: _nan(s, ROUTER.format(0, "weight")), r"NaN or infinite values: model.layers.0.self_attn.q_proj.router.proj.weight\. Its routers"),
        ("fused", lambda s: s["model.layers.1.self_attn.q_proj.weight"][-1, 3].fill_(float("inf")), r"NaN or infinite values: model.layers.1.self_attn.q_proj.weight\. Its routers"),
        ("separate", {"layers": [0]}, r"aha.layers \(\[0\]\) does not route: model.layers.1.self_attn.q_proj.router.proj.bias, .*proj.weight\. Its routers"),
    ],
    ids=["one-missing", "all-missing", "nan", "fused-inf", "stray"],
)
def test_a_checkpoint_with_missing_stray_or_non_finite_routers_is_refused_naming_them(tmp_path, layout, change, message):
    """transformers loads these with a logged report only (a missing router re-initialised, a stray one dropped, a NaN
    one routing every head local); both loaders refuse them and name the tensors."""
    aha.convert(tiny_model("llama"), window=WINDOW, router_init="random", router_layout=layout).save_pretrained(tmp_path)
    if isinstance(change, dict):
        _edit_aha_block(tmp_path, lambda block: block.update(change))
    else:
        _edit_weights(tmp_path, change)
    for loader in (aha.from_pretrained, AutoModelForCausalLM.from_pretrained):
        with pytest.raises(ValueError, match=f"is not a usable AHA checkpoint: router tensors .*{message}") as refused:
            loader(tmp_path)
        assert "save the model again" in str(refused.value)


def test_aha_blocks_with_a_layer_listed_twice_or_a_version_that_is_not_an_integer_are_refused(tmp_path):
    aha.convert(tiny_model("llama"), window=WINDOW, router_init="random", layers=[0]).save_pretrained(tmp_path)
    _edit_aha_block(tmp_path, lambda block: block.update(layers=[0, 0]))
    with pytest.raises(ValueError, match=r"layers lists \[0\] more than once"):
        aha.from_pretrained(tmp_path)
    _edit_aha_block(tmp_path, lambda block: block.update(layers=[0], version=str(aha.AhaSettings.VERSION)))
    with pytest.raises(ValueError, match="has version '2', but a version is an integer from 1") as refused:
        aha.from_pretrained(tmp_path)
    assert "upgrade" not in str(refused.value)
