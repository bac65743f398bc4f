"""Tiny AHA checkpoints and references for the vLLM plugin tests (built offline, in seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

import aha
from aha.hf import routers
from aha.hf.testing import tiny_model

VOCAB = 128
#: 4 heads of 32 (vLLM's CPU attention needs head_dim >= 32) over 2 KV heads; 4 layers
TINY_VLLM = {"vocab_size": VOCAB, "hidden_size": 128, "num_hidden_layers": 4, "max_position_embeddings": 256}
#: what each converted layer's router does in :func:`mixed_routes_model`
LAYER_ROUTES = ("global", "local", "random")


#: the tokenizer's words: token i is ``WORDS[i]`` (letters only: a loaded tokenizer may split digits)
WORDS = [f"w{chr(97 + i // 26)}{chr(97 + i % 26)}" for i in range(VOCAB)]


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer over :data:`WORDS` (token 1 = BOS, 2 = EOS), for ``vllm serve``."""
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(WORDS)}, unk_token=WORDS[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    special = {"bos_token": WORDS[1], "eos_token": WORDS[2], "unk_token": WORDS[0], "pad_token": WORDS[0]}
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special).save_pretrained(folder)


def mixed_routes_model(*, sink: int, layout: str, window: int = 8, family: str = "llama"):
    """A tiny AHA model whose converted layers 0, 1, 2 route all-global, all-local and at random
    (about half the pairs global); layer 3 stays unconverted (full attention)."""
    model = aha.convert(
        tiny_model(family, **TINY_VLLM), window=window, sink=sink, router_init="random", router_layout=layout, layers=[0, 1, 2]
    )
    for index, router in routers(model).items():
        route = LAYER_ROUTES[index]
        proj_weight, proj_bias = _router_parameters(router)
        with torch.no_grad():
            if route != "random":
                proj_weight.zero_()
                proj_bias.fill_(30.0 if route == "global" else -30.0)
    return model.eval()


def _router_parameters(router) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) views of a layer's router rows, for either layout."""
    if hasattr(router, "router"):
        return router.router.proj.weight, router.router.proj.bias
    rows = router.query_features
    return router.weight[rows:], router.bias[rows:]


def released_aha_olmo2(folder: Path, *, window: int = 8):
    """A tiny OLMo2 saved in the released AHA-OLMO2 layout (``model_type: "faolmo"``, fused
    bias-free routers in every layer, ``local_window_size``, no ``"aha"`` block) with a tokenizer;
    returns the aha model it holds (random routers: about half the pairs global)."""
    model = aha.convert(
        tiny_model("olmo2", **TINY_VLLM), window=window, router_init="random", router_layout="fused", router_bias=False
    ).eval()
    save(model, folder)
    config = json.loads((folder / "config.json").read_text())
    del config["aha"]
    config |= {"model_type": "faolmo", "architectures": ["FAOlmoForCausalLM"], "local_window_size": window}
    (folder / "config.json").write_text(json.dumps(config))
    return model


def save(model, folder: Path) -> Path:
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def prompts(count: int, lengths: tuple[int, ...], seed: int = 0) -> list[list[int]]:
    """``count`` random prompts (token ids 3..127), lengths cycling through ``lengths``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (lengths[i % len(lengths)],), generator=generator).tolist() for i in range(count)]


@torch.no_grad()
def greedy_reference(model, prompt: list[int], new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """aha's own greedy ``generate`` (routed attention, its KV cache): the new tokens and the
    log-probabilities ``[vocab]`` of each step."""
    out = model.generate(
        torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, output_scores=True,
        return_dict_in_generate=True, pad_token_id=0, eos_token_id=None,
    )  # fmt: skip
    tokens = out.sequences[0, len(prompt) :].tolist()
    return tokens, [torch.log_softmax(score[0].float(), -1) for score in out.scores]
