"""Evaluation: perplexity by routing mode and position, passkey retrieval, routing capture, report, CLI."""

from __future__ import annotations

import json
import math
import random
import string

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from typer.testing import CliRunner

import aha
from aha.cli import app
from aha.data.passkey import PasskeyPromptBuilder, load_haystack
from aha.evaluation.passkey import (
    DEFAULT_DEPTHS,
    DEFAULT_OFFSETS,
    PasskeyResult,
    PasskeyTrial,
    evaluate_passkey,
    extract_passkey,
    greedy_answer,
)
from aha.evaluation.perplexity import (
    compare_routing_modes,
    evaluate_perplexity,
    full_length_subset,
    position_bucket_edges,
)
from aha.evaluation.routing import (
    capture_routes,
    check_modes,
    converted_layers,
    routing_mode,
)
from aha.evaluation.run import EvalSettings, run_evaluation
from aha.report.tables import passkey_table
from aha.stats import RoutingStats, paired_difference_interval, wilson_interval

WINDOW = 8
SPECIALS = ["<pad>", "<|end|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(chat: bool = True) -> PreTrainedTokenizerFast:
    """One token per printable character plus four special tokens; a minimal chat template."""
    vocab = {**{s: i for i, s in enumerate(SPECIALS)}, **{c: i + len(SPECIALS) for i, c in enumerate(string.printable)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<|end|>", additional_special_tokens=SPECIALS[2:]
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def routed_llama(vocab_size: int, *, seed: int = 0) -> LlamaForCausalLM:
    """A random 2-layer Llama (4 query heads, 2 KV heads), converted with random routers (about half global)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        pad_token_id=0, eos_token_id=1,
    )
    return aha.convert(LlamaForCausalLM(config), window=WINDOW, router_init="random").eval()


@pytest.fixture(scope="module")
def tokenizer():
    return char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return routed_llama(len(tokenizer))


@pytest.fixture(scope="module")
def haystack():
    return load_haystack()


def _sequences(n: int, seq_len: int, vocab: int, *, padded: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` random sequences; the last ``padded`` ones keep only their first half (right padding)."""
    torch.manual_seed(1)
    items = []
    for i in range(n):
        ids = torch.randint(len(SPECIALS), vocab, (seq_len,))
        mask = torch.ones(seq_len, dtype=torch.long)
        if i >= n - padded:
            mask[seq_len // 2 :] = 0
            ids[seq_len // 2 :] = 0
        items.append({"input_ids": ids, "labels": ids.masked_fill(mask == 0, -100), "attention_mask": mask})
    return items


# ---------------------------------------------------------------- perplexity


def test_position_bucket_edges():
    assert position_bucket_edges(64, 8) == [0, 8, 16, 32, 63]
    assert position_bucket_edges(64, 256) == [0, 63]


def test_local_equals_full_below_the_window_only(model, tokenizer):
    report = compare_routing_modes(model, _sequences(4, 48, len(tokenizer)), batch_size=2, progress=False)
    full, local, routed = (report.results[m] for m in ("full", "local", "aha"))
    # a local query at position p < window sees the same keys as a global one, in every layer
    assert full.buckets[0].end == WINDOW
    assert local.buckets[0].perplexity == pytest.approx(full.buckets[0].perplexity, rel=1e-5)
    assert all(abs(lo.perplexity / fu.perplexity - 1) > 1e-4 for lo, fu in zip(local.buckets[1:], full.buckets[1:]))
    assert full.routing.global_fraction == 1.0 and full.routing.compute_ratio == 1.0
    assert local.routing.global_fraction == 0.0 and local.routing.compute_ratio < 1.0
    assert 0.2 < routed.routing.global_fraction < 0.8
    assert [b.global_fraction for b in local.buckets] == [0.0] * len(local.buckets)
    summary = report.to_dict()
    assert set(summary["modes"]) == {"full", "local", "aha"}
    assert summary["perplexity_vs_full"]["local"] == pytest.approx(local.perplexity / full.perplexity - 1)
    json.dumps(summary, allow_nan=False)


def test_perplexity_matches_the_model_loss_and_skips_padding(model, tokenizer):
    items = _sequences(3, 40, len(tokenizer), padded=1)
    result = evaluate_perplexity(model, items, mode="full", progress=False)
    with routing_mode(model, "full"), torch.no_grad():
        losses = [model(input_ids=it["input_ids"][None], labels=it["labels"][None]).loss for it in items]
    targets = [int((it["labels"][1:] != -100).sum()) for it in items]
    expected = sum(loss.item() * n for loss, n in zip(losses, targets)) / sum(targets)
    assert result.tokens == sum(targets) == 39 + 39 + 19
    assert result.nll == pytest.approx(expected, rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-5)
    real_tokens = sum(int(it["attention_mask"].sum()) for it in items)
    assert result.routing.total_pairs.sum().item() == real_tokens * 2 * 4  # layers x heads, padding excluded


def test_perplexity_keeps_each_sequence_for_paired_intervals(model, tokenizer):
    items = _sequences(5, 40, len(tokenizer), padded=1)
    report = compare_routing_modes(model, items, modes=("full", "aha"), progress=False)
    routed, full = report.results["aha"], report.results["full"]
    assert sum(routed.sequence_tokens) == routed.tokens and routed.sequence_tokens[-1] == 19
    assert sum(routed.sequence_nll) / routed.tokens == pytest.approx(routed.nll, rel=1e-6)
    assert routed.sequence_ids == full.sequence_ids and len(set(routed.sequence_ids)) == 5
    change = routed.change_against(full)
    assert change["change"] == pytest.approx(report.relative_to_full("aha"))
    assert change["low"] <= change["change"] <= change["high"] and change["sequences"] == 5
    assert report.to_dict()["perplexity_vs_full_interval"]["aha"] == change
    assert full.change_against(full)["low"] == full.change_against(full)["high"] == 0.0
    other = evaluate_perplexity(model, items[:4], mode="full", progress=False)
    with pytest.raises(ValueError, match="different sequences"):
        routed.change_against(other)


def test_full_length_subset_skips_padded_sequences_and_spreads_the_pick():
    items = _sequences(10, 16, 50, padded=3)  # 7 full-length sequences, indices 0..6
    subset = full_length_subset(items, max_sequences=3)
    assert subset.indices == [0, 3, 6]
    with pytest.raises(ValueError, match="lower --seq-len"):
        full_length_subset(_sequences(2, 16, 50, padded=2), max_sequences=None)


def test_unknown_mode_is_rejected(model):
    with pytest.raises(ValueError, match="choose from"):
        check_modes(["full", "sliding"])
    with pytest.raises(ValueError, match="choose from"):
        compare_routing_modes(model, _sequences(1, 16, 50), modes=["global"], progress=False)


# ---------------------------------------------------------------- routing capture


def test_capture_routes_agrees_with_track_routing(model, tokenizer):
    ids = _sequences(1, 64, len(tokenizer))[0]["input_ids"]
    with aha.track_routing(model) as stats:
        routes = capture_routes(model, ids)
    assert routes.shape == (2, 4, 64) and routes.dtype == torch.bool
    assert routes.float().mean().item() == pytest.approx(stats.global_fraction)
    assert torch.allclose(routes.float().mean(-1).double(), stats.per_head())


def test_capture_routes_of_a_partly_converted_model_names_its_layers(tokenizer):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    model = aha.convert(LlamaForCausalLM(config), window=WINDOW, router_init="random", layers=[2, 0]).eval()
    assert converted_layers(model) == [0, 2]
    assert capture_routes(model, torch.arange(4, 40)).shape == (2, 4, 36)


def test_merge_routing_stats_equals_one_tracker_over_both_passes(model, tokenizer):
    a, b = (s["input_ids"][None] for s in _sequences(2, 30, len(tokenizer)))
    with torch.no_grad(), aha.track_routing(model) as both:
        with aha.track_routing(model) as first:
            model(input_ids=a)
        with aha.track_routing(model) as second:
            model(input_ids=b[:, :20])
    merged = aha.RoutingStats.merge([first, second])
    assert merged.to_dict() == both.to_dict()
    assert torch.equal(merged.position_total, both.position_total)
    with pytest.raises(ValueError, match="nothing"):
        aha.RoutingStats.merge([])


# ---------------------------------------------------------------- passkey


def test_extract_passkey():
    assert extract_passkey("The pass key is 48213.") == "48213"
    assert extract_passkey("12 then 48213") == "12"
    assert extract_passkey("no digits") is None


@pytest.mark.parametrize("chat", [True, False])
def test_passkey_prompts_hide_the_needle_at_the_requested_depth(tokenizer, haystack, chat):
    builder = PasskeyPromptBuilder(tokenizer, haystack=haystack, chat=chat)
    prompts = [builder.build(2000, depth, "48213", rng=random.Random(0)) for depth in (0.0, 0.5, 1.0)]
    for prompt in prompts:
        assert 1800 <= len(prompt.input_ids) <= 2000
        text = tokenizer.decode(prompt.input_ids)
        assert text.count("48213") == 2
        needle_text = tokenizer.decode(prompt.input_ids[prompt.needle_end - 30 : prompt.needle_end + 1])
        assert needle_text.endswith("48213 is the pass key.")
        assert text.endswith("<|assistant|>" if chat else "The pass key is")
    distances = [p.needle_distance for p in prompts]
    assert distances[0] > 1500 and distances[1] == pytest.approx(900, abs=200) and distances[2] < 120
    with pytest.raises(ValueError, match="use at least"):
        builder.build(100, 0.5, "48213", rng=random.Random(0))
    with pytest.raises(ValueError, match="depth"):
        builder.build(2000, 1.5, "48213", rng=random.Random(0))


def test_greedy_answer_matches_generate_and_tracks_answer_steps_apart(model, tokenizer):
    prompt = torch.randint(len(SPECIALS), len(tokenizer), (50,)).tolist()
    new_ids, prompt_stats, answer_stats = greedy_answer(model, prompt, max_new_tokens=6, eos_token_ids={-1})
    reference = model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert new_ids == reference[0, 50:].tolist()
    # prompt: 49 queries prefilled; answer steps: the last prompt token plus 5 generated tokens
    assert prompt_stats.position_total.numel() == 49
    assert answer_stats.total_pairs.sum().item() == 6 * 2 * 4
    assert answer_stats.position_total[:49].sum().item() == 0 and answer_stats.position_total[49:].sum().item() == 6 * 2 * 4


def test_evaluate_passkey_compares_modes_on_the_same_prompts(model, tokenizer, haystack):
    result = evaluate_passkey(
        model, tokenizer, context_lengths=(600,), depths=(0.1, 0.9), offsets=1, max_new_tokens=4, haystack=haystack, progress=False
    )
    assert result.window == WINDOW
    assert [t.mode for t in result.trials] == ["full", "local", "aha"] * 2
    assert [t.prompt for t in result.trials] == [0, 0, 0, 1, 1, 1]
    for mode in ("full", "local"):
        assert all(t.answer_global_fraction is None for t in result.trials if t.mode == mode)
    routed = [t for t in result.trials if t.mode == "aha"]
    assert all(0 < t.answer_global_fraction < 1 for t in routed)
    steps = sum(min(4, t.answer_tokens + 1) for t in routed)  # one query per answer step, EOS step included
    assert result.answer_stats.total_pairs.sum().item() == steps * 2 * 4
    assert {t.passkey for t in result.trials if t.depth == 0.1} != {t.passkey for t in result.trials if t.depth == 0.9}
    summary = result.to_dict()
    assert summary["aha_routing"]["answer_steps"]["global_fraction"] == result.answer_stats.global_fraction
    json.dumps(summary, allow_nan=False)


def test_the_default_passkey_grid_is_fixed_and_scores_100_prompts_per_length(tokenizer, haystack):
    assert len(DEFAULT_DEPTHS) * DEFAULT_OFFSETS >= 100
    settings = EvalSettings()
    assert len(settings.passkey_depths) * settings.passkey_offsets >= 100
    builder = PasskeyPromptBuilder(tokenizer, haystack=haystack)
    first, again, other = (builder.build(600, 0.5, "48213", offset=offset) for offset in (0.3, 0.3, 0.6))
    assert first == again and first.input_ids != other.input_ids  # the grid needs no random draw
    with pytest.raises(ValueError, match="exactly one of rng and an offset"):
        builder.build(600, 0.5, "48213")
    with pytest.raises(ValueError, match="exactly one of rng and an offset"):
        builder.build(600, 0.5, "48213", offset=1.0)


def test_passkey_intervals_and_the_paired_difference_from_full_attention():
    def trial(mode, prompt, correct, length=1024):
        return PasskeyTrial(mode, length, length, 0.5, 900, f"{prompt:05d}", "", 0, correct, prompt=prompt)

    full = [True] * 18 + [False] * 2  # 20 prompts: 18 right
    routed = [True] * 16 + [False, False, True, False]  # 17 right, 1 where full attention failed
    result = PasskeyResult(window=100, trials=[trial("full", i, c) for i, c in enumerate(full)] + [trial("aha", i, c) for i, c in enumerate(routed)])
    interval = result.accuracy_interval("aha", context_length=1024)
    assert (interval["correct"], interval["prompts"]) == (17, 20)
    assert (interval["low"], interval["high"]) == pytest.approx(wilson_interval(17, 20))
    difference = result.paired_difference("aha")
    assert (difference["only_mode"], difference["only_reference"], difference["prompts"]) == (1, 2, 20)
    assert (difference["difference"], difference["low"], difference["high"]) == pytest.approx(paired_difference_interval(routed, full))
    assert difference["low"] < -0.1  # 20 prompts cannot show "within 10 points"
    summary = result.to_dict()
    assert summary["vs_full"]["aha"]["by_context_length"]["1024"] == difference
    assert summary["intervals"]["full"]["all"]["accuracy"] == 0.9
    assert "[95% CI, Wilson]" in str(passkey_table(result).caption) and "aha - full" in str(passkey_table(result).caption)


def test_passkey_accuracy_splits_by_needle_distance_against_the_window():
    def trial(mode, distance, correct, length=1024):
        return PasskeyTrial(mode, length, length, 0.5, distance, "11111", "", 0, correct)

    result = PasskeyResult(
        window=100,
        trials=[trial("local", 50, True), trial("local", 100, False), trial("local", 900, False, 2048), trial("full", 900, True)],
    )
    assert result.accuracy("local") == pytest.approx(1 / 3)
    assert result.accuracy("local", beyond_window=False) == 1.0
    assert result.accuracy("local", beyond_window=True) == 0.0
    assert result.accuracy("local", context_length=2048) == 0.0
    assert result.accuracy("aha") is None
    assert result.to_dict()["accuracy"]["full"]["needle_beyond_window"] == 1.0


def test_opening_heads_rank_the_rise_in_global_routing_at_the_answer():
    prompt, answer = RoutingStats(window=4, num_layers=2, num_heads=2), RoutingStats(window=4, num_layers=2, num_heads=2)
    # prompt: every head global on 1 of 4 tokens; answer: layer 1 head 0 on 4 of 4, layer 0 head 1 on 2 of 4
    prompt_routes = torch.tensor([True, False, False, False]).expand(1, 2, 4)
    for layer in range(2):
        prompt.update(layer, prompt_routes)
    answer.update(0, torch.tensor([[[False] * 4, [True, True, False, False]]]))
    answer.update(1, torch.tensor([[[True] * 4, [False] * 4]]))
    result = PasskeyResult(window=4, trials=[], prompt_stats=prompt, answer_stats=answer)
    assert result.opening_heads() == [
        {"layer": 1, "head": 0, "answer": 1.0, "prompt": 0.25},
        {"layer": 0, "head": 1, "answer": 0.5, "prompt": 0.25},
    ]
    assert result.to_dict()["aha_routing"]["opening_heads"][0]["layer"] == 1
    assert "L1.H0 100% (prompt 25%)" in str(passkey_table(result).caption)
    assert PasskeyResult(window=4, trials=[]).opening_heads() == []


# ---------------------------------------------------------------- report and CLI


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, model, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-aha")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_folder(tmp_path_factory, haystack):
    folder = tmp_path_factory.mktemp("texts")
    for i in range(12):  # 12 documents of 3000 characters; the held-out split takes about 10% of them
        (folder / f"doc{i}.txt").write_text(haystack[i * 3000 : (i + 1) * 3000])
    return folder


def test_aha_eval_cli_writes_the_report(saved_model, text_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("AHA_CACHE_DIR", str(tmp_path / "cache"))
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app,
        [
            "eval", "--model", str(saved_model), "--out", str(out), "--data", str(text_folder),
            "--heldout-fraction", "0.3", "--seq-len", "64", "--max-sequences", "4",
            "--passkey-lengths", "400,600", "--passkey-depths", "0.2", "--passkey-offsets", "1", "--seed", "1",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "Held-out perplexity" in result.output and "Passkey retrieval" in result.output
    report = json.loads((out / "eval.json").read_text(), parse_constant=lambda name: pytest.fail(f"{name} in eval.json"))
    assert report["meta"]["seed"] == 1 and report["meta"]["command"]
    assert {"git_commit", "git_dirty", "cpu", "isa_flags", "torch", "transformers", "accelerate"} <= set(report["meta"])
    assert set(report["perplexity"]["modes"]) == {"full", "local", "aha"}
    interval = report["perplexity"]["perplexity_vs_full_interval"]["aha"]
    assert interval["low"] <= interval["change"] <= interval["high"] and interval["sequences"] == 4
    assert report["passkey"]["intervals"]["aha"]["by_context_length"]["400"]["prompts"] == 1
    assert set(report["passkey"]["vs_full"]) == {"local", "aha"}
    assert report["perplexity"]["sequences"] == 4 and report["perplexity"]["window"] == WINDOW
    assert len(report["passkey"]["trials"]) == 2 * 3
    assert report["passkey"]["aha_routing"]["answer_steps"]["per_head"]
    for name in ("routing_layer_head.png", "routing_position.png", "passkey_answer_layer_head.png", "token_view.html"):
        assert (out / name).stat().st_size > 1000, name
    assert "needle ends at token" in (out / "token_view.html").read_text()


def test_report_compare_pairs_two_models_on_the_same_sequences_and_prompts(tokenizer, text_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("AHA_CACHE_DIR", str(tmp_path / "cache"))
    settings = EvalSettings(modes=("full", "aha"), data=(str(text_folder),), heldout_fraction=0.3, seq_len=64, max_sequences=4,
                            passkey_lengths=(400,), passkey_depths=(0.2, 0.8), passkey_offsets=2)  # fmt: skip
    runs = {}
    for seed in (0, 1):
        runs[seed] = run_evaluation(routed_llama(len(tokenizer), seed=seed), tokenizer, tmp_path / f"m{seed}", settings, progress=False)
    out = tmp_path / "compare.json"
    result = CliRunner().invoke(app, ["report", "compare", str(tmp_path / "m1" / "eval.json"), str(tmp_path / "m0" / "eval.json"),
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    perplexity = report["perplexity"]
    expected = runs[1].perplexity.results["aha"].perplexity / runs[0].perplexity.results["full"].perplexity - 1
    assert perplexity["change"] == pytest.approx(expected) and perplexity["low"] <= perplexity["change"] <= perplexity["high"]
    assert report["passkey"]["by_context_length"]["400"]["prompts"] == 4
    assert report["sources"]["reference"]["mode"] == "full" and report["meta"]["git_commit"] == report["sources"]["report"]["meta"]["git_commit"]
    other = EvalSettings(**{**vars(settings), "max_sequences": 3, "tasks": ("perplexity",)})
    run_evaluation(routed_llama(len(tokenizer), seed=2), tokenizer, tmp_path / "m2", other, progress=False)
    result = CliRunner().invoke(app, ["report", "compare", str(tmp_path / "m2" / "eval.json"), str(tmp_path / "m0" / "eval.json"),
                                      "--out", str(out)])  # fmt: skip
    assert result.exit_code != 0 and "different held-out sequences" in result.output


def test_aha_eval_cli_without_held_out_text_says_what_to_do(saved_model, tmp_path, monkeypatch, haystack):
    monkeypatch.setenv("AHA_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "one.txt").write_text(haystack[:3000])  # one document, and it is not held out
    result = CliRunner().invoke(
        app,
        ["eval", "--model", str(saved_model), "--out", str(tmp_path / "report"), "--data", str(tmp_path / "texts"),
         "--heldout-fraction", "0.0", "--seq-len", "64", "--tasks", "perplexity"],
    )
    text = " ".join(result.output.replace("│", " ").split())  # the error box wraps lines
    assert result.exit_code != 0 and "no held-out sequence" in text and "raise --heldout-fraction" in text
    assert "Traceback" not in result.output


def test_aha_eval_cli_needs_a_window_for_a_plain_model(tmp_path, tokenizer):
    torch.manual_seed(0)
    plain = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    plain.save_pretrained(tmp_path / "plain")
    tokenizer.save_pretrained(tmp_path / "plain")
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "plain"), "--tasks", "passkey"])
    assert result.exit_code != 0 and "pass --window" in result.output
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "plain"), "--tasks", "ppl"])
    assert result.exit_code != 0 and "choose from" in result.output
    result = CliRunner().invoke(app, ["eval", "--model", str(tmp_path / "plain"), "--window", "4", "--sink", "-1"])
    assert result.exit_code != 0 and "sink must be an int >= 0" in result.output


def test_aha_eval_cli_keeps_the_sink_of_an_aha_model(saved_model):
    result = CliRunner().invoke(app, ["eval", "--model", str(saved_model), "--sink", "3"])
    assert result.exit_code != 0 and "omit --sink or pass 0" in result.output


# ---------------------------------------------------------------- real model


@pytest.mark.real_model
def test_smollm2_passkey_needs_global_attention_beyond_the_window():
    """Full attention finds a needle 400+ tokens back; pure sliding window (w=64) cannot."""
    model, tokenizer = aha.load_smollm2()
    model = aha.convert(model, window=64).eval()
    result = evaluate_passkey(
        model, tokenizer, context_lengths=(512,), depths=(0.1,), offsets=1, modes=("full", "local"), max_new_tokens=10,
        progress=False,
    )
    full, local = result.trials
    assert full.needle_distance > 64
    assert full.correct, full.answer
    assert not local.correct, local.answer
