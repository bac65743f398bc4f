"""Data: sources, the held-out split by document, token caching, packing that never crosses documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from train_support import char_tokenizer, sentence_documents

from aha.data import (
    IGNORE_INDEX,
    DataSourceError,
    PackedDataset,
    TokenizedCorpus,
    build_datasets,
    is_heldout,
    resolve_source,
    sources,
    tokenize_source,
    tokenized,
)
from aha.data.passkey import NEEDLE, QUESTION, PasskeyMixDataset


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("AHA_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    """A folder with 40 text documents of varied length and a JSONL file of 10 more."""
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(40):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "eps"], size=int(rng.integers(1, 120)))
        (root / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(f"<{i}> " + " ".join(words))
    rows = [{"id": f"row{i}", "text": f"json document {i} " * (i + 1)} for i in range(10)]
    (root / "more.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "ignored.bin").write_bytes(b"\x00\x01")
    return root


def _pieces(dataset: PackedDataset) -> list[tuple[int, np.ndarray]]:
    """(document index, real tokens) of every sequence."""
    result = []
    for i in range(len(dataset)):
        corpus_index, begin, length = dataset.chunks[i]
        corpus = dataset.corpora[corpus_index]
        doc = int(np.searchsorted(corpus.offsets, begin, side="right") - 1)
        item = dataset[i]
        assert int(item["attention_mask"].sum()) == length
        assert (item["labels"][length:] == IGNORE_INDEX).all() and (item["labels"][:length] == item["input_ids"][:length]).all()
        assert begin + length <= corpus.offsets[doc + 1], "a sequence runs past the end of its document"
        result.append((doc, item["input_ids"][:length].numpy()))
    return result


def test_heldout_split_is_by_document_and_deterministic():
    ids = [f"corpus/doc{i}" for i in range(4000)]
    first = [is_heldout(d, 0.1) for d in ids]
    assert first == [is_heldout(d, 0.1) for d in ids]  # no hidden state, no randomness
    assert 0.08 < np.mean(first) < 0.12
    wider = [is_heldout(d, 0.3) for d in ids]
    assert all(w for f, w in zip(first, wider) if f), "raising the fraction must only move documents to held-out"
    assert not any(is_heldout(d, 0.0) for d in ids)


def test_folder_source_reads_text_and_jsonl(corpus_dir):
    (source,) = resolve_source(corpus_dir)
    docs = list(source.read())
    ids = [d.doc_id for d in docs]
    assert len(docs) == 50 and len(set(ids)) == 50
    assert "notes/sub/doc01.txt" in ids and "notes/more.jsonl:row3" in ids
    assert not any("ignored" in i for i in ids)


def test_broken_files_are_refused_or_flagged_with_their_location(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"text": "fine"}\n{"text": "torn\n')
    with pytest.raises(DataSourceError, match=r"rows\.jsonl:2 is not valid JSON"):
        list(resolve_source(tmp_path / "rows.jsonl")[0].read())
    (tmp_path / "blob.txt").write_bytes(b"\x7fELF\x00\x01binary")
    with pytest.raises(DataSourceError, match="blob.txt looks binary"):
        list(resolve_source(tmp_path / "blob.txt")[0].read())
    (tmp_path / "latin1.txt").write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.warns(UserWarning, match="latin1.txt is not UTF-8"):
        (doc,) = resolve_source(tmp_path / "latin1.txt")[0].read()
    assert doc.text == "caf\ufffd au lait"
    with pytest.raises(DataSourceError, match="hf: needs a dataset"):
        resolve_source("hf:")


def test_jsonl_without_text_field_names_the_fix(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"body": "hello"}\n')
    (source,) = resolve_source(path)
    with pytest.raises(DataSourceError, match="text_field"):
        list(source.read())
    (source,) = resolve_source(path, text_field="body")
    assert [d.text for d in source.read()] == ["hello"]


def test_unknown_spec_lists_the_choices():
    with pytest.raises(DataSourceError, match="kjv"):
        resolve_source("no-such-corpus")


def test_missing_debian_corpus_names_make_install(monkeypatch):
    with pytest.raises(DataSourceError, match=r"make install.*setup-system\.sh"):
        sources._debian_docs("no-such-package-*", "python-docs")
    monkeypatch.setattr(sources.shutil, "which", lambda name: None)
    with pytest.raises(DataSourceError, match="bible-kjv.*make install"):
        sources.kjv()


def test_datasets_source(tmp_path):
    datasets = pytest.importorskip("datasets")
    table = datasets.Dataset.from_dict({"text": ["first doc", "second doc"], "id": ["a", "b"]})
    table.save_to_disk(str(tmp_path / "saved"))
    (source,) = resolve_source(f"hf:{tmp_path / 'saved'}")
    assert [(d.doc_id.rsplit(":", 1)[1], d.text) for d in source.read()] == [("a", "first doc"), ("b", "second doc")]


@pytest.mark.parametrize("name, documents", [("kjv", 66), ("shakespeare", 42)])
def test_builtin_corpora(name, documents):
    try:
        (source,) = resolve_source(name)
    except DataSourceError as missing:
        pytest.skip(str(missing))
    docs = list(source.read())
    assert len(docs) == documents and len({d.doc_id for d in docs}) == documents
    assert min(len(d.text) for d in docs) > 1000


def test_build_datasets_packs_within_documents_and_splits_by_document(corpus_dir, cache):
    tokenizer = char_tokenizer()
    splits = build_datasets([str(corpus_dir)], tokenizer, seq_len=48, heldout_fraction=0.25)
    (corpus,) = splits.train.corpora
    train_docs = {doc for doc, _ in _pieces(splits.train)}
    heldout_docs = {doc for doc, _ in _pieces(splits.heldout)}
    assert train_docs and heldout_docs and not train_docs & heldout_docs
    assert all(is_heldout(corpus.doc_ids[d], 0.25) for d in heldout_docs)
    assert train_docs | heldout_docs == set(range(len(corpus)))  # every document (>= 2 tokens) is used
    summary = splits.summary[0]
    assert summary["documents"] == 50 and summary["heldout_documents"] == len(heldout_docs)
    # the same call again comes from the cache and gives the same sequences
    again = build_datasets([str(corpus_dir)], tokenizer, seq_len=48, heldout_fraction=0.25)
    assert np.array_equal(again.train.chunks, splits.train.chunks)


def test_tokenized_cache_is_reused_and_invalidated(corpus_dir, cache, monkeypatch):
    tokenizer = char_tokenizer()
    (source,) = resolve_source(corpus_dir)
    first = tokenize_source(source, tokenizer)
    folders = list((cache / "tokenized").iterdir())
    assert len(folders) == 1 and not folders[0].name.startswith(".")

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("the cached corpus should have been reused")

    with monkeypatch.context() as patched:
        patched.setattr(tokenized, "_tokenize", no_tokenizing)
        cached = tokenize_source(resolve_source(corpus_dir)[0], tokenizer)
    assert np.array_equal(cached.tokens, first.tokens) and cached.doc_ids == first.doc_ids
    (corpus_dir / "doc00.txt").write_text("changed text")
    changed = tokenize_source(resolve_source(corpus_dir)[0], tokenizer)
    assert len(list((cache / "tokenized").iterdir())) == 2
    assert changed.doc_ids == first.doc_ids and changed.num_tokens != first.num_tokens


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 70), min_size=1, max_size=12),
    seq_len=st.integers(2, 20),
    min_doc_tokens=st.integers(0, 10),
)
def test_packing_never_crosses_documents_and_targets_each_token_once(lengths, seq_len, min_doc_tokens):
    # token value = 1000 * document + position, so every token says where it came from
    docs = [[1000 * d + p for p in range(n)] for d, n in enumerate(lengths)]
    corpus = TokenizedCorpus.from_token_lists("synthetic", [f"d{d}" for d in range(len(docs))], docs)
    dataset = PackedDataset([corpus], seq_len, pad_id=0, min_doc_tokens=min_doc_tokens)
    targets: dict[int, list[int]] = {}
    for doc, tokens in _pieces(dataset):
        assert len(tokens) >= 2 and (tokens // 1000 == doc).all(), "a sequence mixes documents"
        assert (np.diff(tokens % 1000) == 1).all(), "a sequence is not a contiguous slice of its document"
        targets.setdefault(doc, []).extend((tokens[1:] % 1000).tolist())
    for doc, n in enumerate(lengths):
        expected = list(range(1, n)) if n >= max(2, min_doc_tokens) else []
        assert sorted(targets.get(doc, [])) == expected, "every token but the first is a target exactly once"
    assert dataset.num_targets() == sum(len(t) for t in targets.values())


# ---------------------------------------------------------------- passkey training mix


def test_passkey_mix_replaces_a_share_of_sequences_with_answered_prompts():
    tokenizer = char_tokenizer()
    base = sentence_documents(tokenizer)
    mix = PasskeyMixDataset(base, tokenizer, 0.3, seed=1)
    assert len(mix) == len(base) and 0.15 < mix.is_passkey.mean() < 0.45
    for index in range(len(mix)):
        item = mix[index]
        real = int(item["attention_mask"].sum())
        assert mix.num_targets([index]) == real - 1 and mix.num_tokens([index]) == real
        assert torch.equal(item["labels"][:real], item["input_ids"][:real]) and (item["labels"][real:] == IGNORE_INDEX).all()
        if not mix.is_passkey[index]:
            assert all(torch.equal(item[key], base[index][key]) for key in item)
            continue
        text = tokenizer.decode(item["input_ids"][: real - 1])  # the last real token is EOS
        key = text[-5:]
        assert text.endswith(f"{QUESTION} The pass key is {key}") and NEEDLE.format(passkey=key) in text
        assert int(item["input_ids"][real - 1]) == tokenizer.eos_token_id
    assert mix.num_targets(range(len(mix))) == sum(int(mix[i]["attention_mask"].sum()) - 1 for i in range(len(mix)))
    again, other = PasskeyMixDataset(base, tokenizer, 0.3, seed=1), PasskeyMixDataset(base, tokenizer, 0.3, seed=2)
    assert (again.is_passkey == mix.is_passkey).all() and (other.is_passkey != mix.is_passkey).any()
    first = int(np.flatnonzero(mix.is_passkey)[0])
    assert torch.equal(again[first]["input_ids"], mix[first]["input_ids"])


def test_passkey_mix_rejects_bad_settings():
    tokenizer = char_tokenizer()
    base = sentence_documents(tokenizer, num_docs=4)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        PasskeyMixDataset(base, tokenizer, 0.0)
    short = PackedDataset(base.corpora, 60, tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="longer --seq-len"):
        PasskeyMixDataset(short, tokenizer, 0.5)
