"""The dense baseline of a saved AHA model: the same weights as the plain family checkpoint.

:func:`write_plain_checkpoint` drops the routers (a ``"separate"`` model's ``q_proj.router.*``, the
router rows of a ``"fused"`` ``q_proj``) and the ``"aha"`` block, so that stock vLLM (or transformers)
serves the very weights an AHA model serves, with full attention everywhere: the baseline of
``benchmarks/vllm_serving.py``. Reads and writes safetensors and ``config.json`` only (no vLLM needed).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from aha.hf.settings import AhaSettings

_SEPARATE_ROUTER = re.compile(r"\.self_attn\.q_proj\.router\.")
_FUSED_QUERY = re.compile(r"^(?P<prefix>.*\.layers\.(?P<layer>\d+)\.self_attn\.q_proj)\.(?:weight|bias)$")


def write_plain_checkpoint(source: str | Path, target: str | Path) -> Path:
    """Write ``source`` (a saved ``Aha<Family>ForCausalLM`` folder) to ``target`` as a plain
    ``<Family>ForCausalLM`` (``model_type`` without ``aha_``), tokenizer files copied; returns ``target``.

    A fused ``q_proj`` bias added only for the router (query rows zero on a bias-free family) is dropped.

    Raises:
        ValueError: ``source`` is not an AHA checkpoint of this package.
    """
    source, target = Path(source), Path(target)
    config = json.loads((source / "config.json").read_text())
    if not str(config.get("model_type", "")).startswith("aha_") or "aha" not in config:
        raise ValueError(f"{source} is not a saved AHA model (config.json has no aha_* model_type and 'aha' block)")
    if (source / "model.safetensors.index.json").exists():
        raise ValueError(f"{source}: sharded checkpoints are not supported here; save the model unsharded")
    settings = AhaSettings.from_dict(config["aha"])
    family = config["model_type"].removeprefix("aha_")
    query_bias = family == "qwen2" or config.get("attention_bias", False)  # Qwen2's q_proj always has one
    heads = config["num_attention_heads"]
    converted = set(settings.layer_indices(config["num_hidden_layers"]))
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.glob("*.safetensors")):
        tensors = {}
        for name, tensor in load_file(path).items():
            if _SEPARATE_ROUTER.search(name):
                continue
            fused = _FUSED_QUERY.match(name) if settings.router_layout == "fused" else None
            if fused and int(fused["layer"]) in converted:
                tensor = tensor[:-heads]
                if name.endswith(".bias") and not query_bias and not torch.any(tensor != 0):
                    continue  # the router's bias on a bias-free q_proj
            tensors[name] = tensor.contiguous()
        save_file(tensors, target / path.name, metadata={"format": "pt"})
    config.pop("aha")
    config["model_type"] = family
    config["architectures"] = [name.removeprefix("Aha") for name in config.get("architectures", [])]
    (target / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for extra in source.iterdir():
        if extra.is_file() and extra.suffix != ".safetensors" and extra.name != "config.json":
            shutil.copy2(extra, target / extra.name)
    return target
