"""Tiny models, a character tokenizer and a toy long-range task for the data and training tests."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from aha.data import DataSplits, PackedDataset, TokenizedCorpus, is_heldout

CHARS = string.printable  # digits, letters, punctuation, whitespace


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (ids 1..100), ``<pad>`` = 0."""
    vocab = {"<pad>": 0, **{c: i + 1 for i, c in enumerate(CHARS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<pad>")


def tiny_llama(vocab_size: int = len(CHARS) + 1, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A random 2-layer Llama: hidden 32, 4 query heads, 2 KV heads (GQA)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model(folder: Path) -> Path:
    """Save a tiny Llama with the character tokenizer, loadable with ``aha.load_model(folder)``."""
    tiny_llama().save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def copy_task(num_docs: int, block: int = 12, vocab: int = 16, seed: int = 0, heldout_fraction: float = 0.1) -> DataSplits:
    """Documents ``x_1..x_block SEP x_1..x_block`` of random tokens (ids 2..vocab+1, SEP = 1).

    The second half is predictable only by looking ``block + 1`` tokens back, beyond a small window:
    a task where some heads need global attention and the rest need not.
    """
    rng = np.random.default_rng(seed)
    ids, docs = [], []
    for i in range(num_docs):
        first = rng.integers(2, vocab + 2, size=block)
        ids.append(f"copy/{i}")
        docs.append(np.concatenate([first, [1], first]))
    corpus = TokenizedCorpus.from_token_lists("copy", ids, docs)
    seq_len = 2 * block + 1

    def heldout(doc_id: str) -> bool:
        return is_heldout(doc_id, heldout_fraction)

    return DataSplits(
        train=PackedDataset([corpus], seq_len, 0, lambda d: not heldout(d)),
        heldout=PackedDataset([corpus], seq_len, 0, heldout),
    )


def pretrain_on(data: DataSplits, vocab_size: int, steps: int = 500, seed: int = 0) -> dict[str, torch.Tensor]:
    """Train a plain tiny Llama (full attention) on ``data`` with a bare loop; returns its state dict.

    A stand-in for a pretrained model: routing fine-tuning starts from a model that already relies on
    attention far back, so the cross-entropy resists closing the heads it needs.
    """
    model = tiny_llama(vocab_size=vocab_size, seed=seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        picked = torch.randint(len(data.train), (8,), generator=generator)
        batch = torch.stack([data.train[int(i)]["input_ids"] for i in picked])
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def sentence_documents(tokenizer, num_docs: int = 60, sentences: int = 40) -> PackedDataset:
    """Documents of short capitalised sentences, tokenized per character, packed at 300 tokens."""
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    texts = [
        " ".join(" ".join(rng.choice(words, size=int(rng.integers(3, 8)))).capitalize() + "." for _ in range(sentences))
        for _ in range(num_docs)
    ]
    ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    corpus = TokenizedCorpus.from_token_lists("sentences", [f"doc{i}" for i in range(num_docs)], ids)
    return PackedDataset([corpus], 300, tokenizer.pad_token_id)
