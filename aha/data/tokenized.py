"""Tokenize a :class:`~aha.data.sources.Source` once and cache the token ids on disk.

The cache lives under ``$AHA_CACHE_DIR/tokenized`` (default ``~/.cache/aha/tokenized``), one folder
per (source fingerprint, tokenizer fingerprint). A folder is written under a temporary name and
renamed into place, so a reader never sees a half-written cache and concurrent writers (several
``accelerate`` processes) cannot corrupt it.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from aha._cache import build_cached
from aha._cache import cache_dir as aha_cache_dir
from aha.data.sources import Document, Source

#: Bump when the on-disk layout or the tokenization rule changes, to invalidate old caches.
CACHE_FORMAT = 1
TOKENIZE_BATCH_DOCS = 32


@dataclass(frozen=True)
class TokenizedCorpus:
    """The token ids of a source's documents, concatenated.

    Document ``i`` (id ``doc_ids[i]``) is ``tokens[offsets[i]:offsets[i + 1]]``; ``tokens`` is int32
    ``[total_tokens]`` (memory-mapped when loaded from the cache), ``offsets`` int64 ``[n_docs + 1]``.
    Documents are tokenized without special tokens (no BOS/EOS is added).
    """

    name: str
    doc_ids: list[str]
    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.doc_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def doc_lengths(self) -> np.ndarray:
        """Tokens per document, int64 ``[n_docs]``."""
        return np.diff(self.offsets)

    @classmethod
    def from_token_lists(cls, name: str, doc_ids: Sequence[str], token_lists: Sequence[Sequence[int]]) -> TokenizedCorpus:
        """A corpus from already-tokenized documents (``token_lists[i]`` is document ``doc_ids[i]``)."""
        if len(doc_ids) != len(token_lists):
            raise ValueError(f"{len(doc_ids)} document ids for {len(token_lists)} token lists")
        pieces = [np.asarray(ids, dtype=np.int32) for ids in token_lists]
        offsets = np.zeros(len(pieces) + 1, dtype=np.int64)
        np.cumsum([len(p) for p in pieces], out=offsets[1:])
        tokens = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int32)
        return cls(name=name, doc_ids=list(doc_ids), tokens=tokens, offsets=offsets)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash that changes whenever the tokenizer would map text to different ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    payload = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(f"{type(tokenizer).__name__}\0{payload}".encode()).hexdigest()[:16]


def _tokenize(documents: Iterable[Document], tokenizer: Any, name: str) -> TokenizedCorpus:
    doc_ids: list[str] = []
    pieces: list[np.ndarray] = []

    def batches() -> Iterator[list[Document]]:
        batch: list[Document] = []
        for doc in documents:
            batch.append(doc)
            if len(batch) == TOKENIZE_BATCH_DOCS:
                yield batch
                batch = []
        if batch:
            yield batch

    with tqdm(desc=f"tokenizing {name}", unit=" docs", leave=False) as bar:
        for batch in batches():
            encoded = tokenizer([d.text for d in batch], add_special_tokens=False, verbose=False)["input_ids"]
            doc_ids.extend(d.doc_id for d in batch)
            pieces.extend(np.asarray(ids, dtype=np.int32) for ids in encoded)
            bar.update(len(batch))
    return TokenizedCorpus.from_token_lists(name, doc_ids, pieces)


def _write(corpus: TokenizedCorpus, folder: Path) -> None:
    np.save(folder / "tokens.npy", corpus.tokens)
    np.save(folder / "offsets.npy", corpus.offsets)
    (folder / "doc_ids.json").write_text(json.dumps(corpus.doc_ids))


def tokenize_source(source: Source, tokenizer: Any, cache_dir: Path | None = None) -> TokenizedCorpus:
    """Token ids of every document of ``source``, from the cache when it is there (else tokenized and cached).

    Args:
        source: a resolved data spec (see :func:`aha.data.resolve_source`).
        tokenizer: a Hugging Face tokenizer (fast tokenizers are much quicker).
        cache_dir: root of the cache; default :func:`aha._cache.cache_dir` (``$AHA_CACHE_DIR`` or ``~/.cache/aha``).
    """
    key = hashlib.sha256(f"{CACHE_FORMAT}\0{source.fingerprint}\0{tokenizer_fingerprint(tokenizer)}".encode())
    safe_name = re.sub(r"[^A-Za-z0-9._-]+", "_", source.name)[:64]
    folder = (cache_dir or aha_cache_dir()) / "tokenized" / f"{safe_name}-{key.hexdigest()[:16]}"
    build_cached(folder, lambda staging: _write(_tokenize(source.read(), tokenizer, source.name), staging), "tokenized corpus")
    return TokenizedCorpus(
        name=source.name,
        doc_ids=json.loads((folder / "doc_ids.json").read_text()),
        tokens=np.load(folder / "tokens.npy", mmap_mode="r"),
        offsets=np.load(folder / "offsets.npy"),
    )
