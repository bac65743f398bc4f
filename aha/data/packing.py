"""Cut tokenized documents into fixed-length training sequences, one document per sequence.

A document of ``n`` tokens becomes sequences starting at ``0, L-1, 2(L-1), ...`` (``L`` = ``seq_len``);
consecutive sequences share one token, so every token except the document's first is a prediction
target exactly once. The last sequence of a document is right-padded: padded positions get label
``-100`` and ``attention_mask`` 0. Under causal attention real tokens never see the padding that
follows them, so no attention mask needs to reach the model and no token ever attends across
documents.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from aha.data.sources import is_heldout, resolve_source
from aha.data.tokenized import TokenizedCorpus, tokenize_source

IGNORE_INDEX = -100


class PackedDataset(Dataset):
    """Fixed-length sequences from the documents of one or more tokenized corpora.

    Args:
        corpora: tokenized corpora.
        seq_len: tokens per sequence (``>= 2``).
        pad_id: token id written into padded positions (never a target, never attended by a real token).
        keep_document: which documents to use, given their id (e.g. the train or held-out side of the split).
        min_doc_tokens: skip documents shorter than this (at least 2: a sequence needs one target).

    Items are dicts of ``input_ids`` and ``labels`` (int64 ``[seq_len]``, labels ``-100`` at padding;
    labels equal ``input_ids`` otherwise, shifted inside the loss as in Hugging Face) and
    ``attention_mask`` (int64 ``[seq_len]``, 1 = real token).
    """

    def __init__(
        self,
        corpora: Sequence[TokenizedCorpus],
        seq_len: int,
        pad_id: int,
        keep_document: Callable[[str], bool] = lambda doc_id: True,
        min_doc_tokens: int = 2,
    ):
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        self.corpora = list(corpora)
        self.seq_len = seq_len
        self.pad_id = pad_id
        stride = seq_len - 1
        rows = []  # (corpus index, first token offset into corpus.tokens, length)
        for corpus_index, corpus in enumerate(self.corpora):
            for doc, (begin, end) in enumerate(zip(corpus.offsets[:-1], corpus.offsets[1:])):
                n = int(end - begin)
                if n < max(2, min_doc_tokens) or not keep_document(corpus.doc_ids[doc]):
                    continue
                starts = np.arange(0, n - 1, stride)
                lengths = np.minimum(seq_len, n - starts)
                rows.append(np.stack([np.full_like(starts, corpus_index), begin + starts, lengths], axis=1))
        self.chunks = np.concatenate(rows) if rows else np.zeros((0, 3), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def lengths(self) -> np.ndarray:
        """Real tokens per sequence, int64 ``[len(self)]``."""
        return self.chunks[:, 2]

    def num_tokens(self, indices: Sequence[int] | np.ndarray) -> int:
        """Real tokens in the sequences ``indices``."""
        return int(self.lengths[np.asarray(indices, dtype=np.int64)].sum())

    def num_targets(self, indices: Sequence[int] | np.ndarray | None = None) -> int:
        """Prediction targets (real tokens minus one per sequence) in ``indices`` (default: all)."""
        lengths = self.lengths if indices is None else self.lengths[np.asarray(indices, dtype=np.int64)]
        return int((lengths - 1).sum())

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        corpus_index, begin, length = (int(x) for x in self.chunks[index])
        ids = torch.full((self.seq_len,), self.pad_id, dtype=torch.long)
        ids[:length] = torch.from_numpy(np.asarray(self.corpora[corpus_index].tokens[begin : begin + length], dtype=np.int64))
        mask = torch.zeros(self.seq_len, dtype=torch.long)
        mask[:length] = 1
        labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


@dataclass
class DataSplits:
    """Train and held-out sequences, split by document; ``summary`` has per-corpus counts (JSON-ready)."""

    train: PackedDataset
    heldout: PackedDataset
    summary: list[dict[str, Any]] = field(default_factory=list)


def build_datasets(
    specs: Sequence[str],
    tokenizer: Any,
    *,
    seq_len: int,
    heldout_fraction: float = 0.1,
    text_field: str = "text",
    min_doc_tokens: int = 2,
    cache_dir: Any = None,
) -> DataSplits:
    """Resolve data specs, tokenize (cached) and pack them into train and held-out sequences.

    Args:
        specs: data specs (see :mod:`aha.data.sources`), e.g. ``["default"]`` or ``["notes/", "hf:imdb:train"]``.
        tokenizer: the model's tokenizer.
        seq_len: tokens per training sequence.
        heldout_fraction: share of *documents* held out (deterministic by document id, :func:`is_heldout`).
        text_field: the text column / JSON key for JSONL and ``datasets`` sources.
        min_doc_tokens: skip documents shorter than this.
        cache_dir: tokenized-corpus cache root (default ``$AHA_CACHE_DIR`` or ``~/.cache/aha``).
    """
    if not specs:
        raise ValueError("no data given; pass at least one data spec (e.g. 'default')")
    corpora = [
        tokenize_source(source, tokenizer, cache_dir) for spec in specs for source in resolve_source(spec, text_field)
    ]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    def heldout(doc_id: str) -> bool:
        return is_heldout(doc_id, heldout_fraction)

    splits = DataSplits(
        train=PackedDataset(corpora, seq_len, pad_id, lambda d: not heldout(d), min_doc_tokens),
        heldout=PackedDataset(corpora, seq_len, pad_id, heldout, min_doc_tokens),
    )
    for corpus in corpora:
        held = np.array([heldout(d) for d in corpus.doc_ids], dtype=bool)
        lengths = corpus.doc_lengths()
        splits.summary.append(
            {
                "corpus": corpus.name,
                "documents": len(corpus),
                "tokens": corpus.num_tokens,
                "heldout_documents": int(held.sum()),
                "heldout_tokens": int(lengths[held].sum()),
            }
        )
    if len(splits.train) == 0:
        raise ValueError(
            f"no training sequences from {list(specs)}: every document is held out (--heldout-fraction "
            f"{heldout_fraction}) or shorter than {min_doc_tokens} tokens (--min-doc-tokens); lower those or add documents"
        )
    return splits
