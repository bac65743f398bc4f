"""Training data: documents from built-in offline corpora, files, folders or ``datasets``; a held-out
split by document; token caching; and packing into fixed-length sequences that never span documents.

Typical use::

    splits = build_datasets(["default"], tokenizer, seq_len=1024)
    splits.train[0]  # {"input_ids", "labels", "attention_mask"}, each int64 [1024]
"""

from aha.data.packing import IGNORE_INDEX, DataSplits, PackedDataset, build_datasets
from aha.data.sources import (
    BUILTIN_CORPORA,
    DEFAULT_CORPORA,
    DataSourceError,
    Document,
    Source,
    hf_dataset_source,
    is_heldout,
    resolve_source,
)
from aha.data.tokenized import TokenizedCorpus, tokenize_source, tokenizer_fingerprint

__all__ = [
    "BUILTIN_CORPORA",
    "DEFAULT_CORPORA",
    "IGNORE_INDEX",
    "DataSourceError",
    "DataSplits",
    "Document",
    "PackedDataset",
    "Source",
    "TokenizedCorpus",
    "build_datasets",
    "hf_dataset_source",
    "is_heldout",
    "resolve_source",
    "tokenize_source",
    "tokenizer_fingerprint",
]
