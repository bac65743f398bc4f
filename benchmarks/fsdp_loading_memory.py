"""Host memory of loading a model for sharded training, as ``aha train`` loads it: peak RSS of each
process once the model is loaded and once accelerate has sharded it (FSDP2), with or without
``--fsdp_cpu_ram_efficient_loading``.

Run it under ``accelerate launch`` (on CPU with ``ACCELERATE_USE_CPU=1``), once per setting::

    ACCELERATE_USE_CPU=1 accelerate launch --use_fsdp --fsdp_version 2 \\
        --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP --fsdp_cpu_ram_efficient_loading true \\
        --num_processes 2 benchmarks/fsdp_loading_memory.py MODEL [REPORT.json]

``MODEL`` as measured for RESULTS.md: a Llama of about 472M parameters with random weights and the
offline SmolLM2 tokenizer, written once by ``python benchmarks/fsdp_loading_memory.py --make-model DIR``.

Every process prints one JSON line: its rank, whether it built the model empty, its peak RSS and
its peak private memory (USS, sampled) in MiB after loading and after sharding, the parameters it holds after sharding and the memory of the
storages behind them (more than 4 B per parameter held when a shard is a view of a whole tensor).
With ``REPORT.json`` the main process also writes every process's row into one report (``meta``:
commit, command, machine, versions; see :mod:`aha.report.provenance`), e.g.
``benchmarks/results/fsdp-loading-memory-true.json``.
"""

import json
import resource
import sys
import threading
import time

import psutil
import torch
from accelerate.utils import gather_object

import aha
from aha.models import smollm2_path
from aha.report.provenance import run_meta, write_json_report
from aha.train import TrainConfig
from aha.train.model_setup import prepare_model
from aha.train.sharding import make_accelerator, only_main_process_reads_weights

#: The random Llama of ``--make-model`` (472M parameters; 1.8 GB of fp32 safetensors).
MODEL_SHAPE = {"hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 16, "num_attention_heads": 24,
               "num_key_value_heads": 6, "vocab_size": 49152, "tie_word_embeddings": True}  # fmt: skip


def make_model(folder: str) -> None:
    """Write the random Llama of :data:`MODEL_SHAPE` (seed 0, fp32) with the offline SmolLM2 tokenizer to ``folder``."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL_SHAPE))
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters -> {folder}")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(folder)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class PeakPrivateMemory:
    """Samples this process's private memory (USS: what no other process shares, e.g. not the page
    cache of a memory-mapped checkpoint) every 20 ms in a thread; ``peak_mib`` is the largest seen."""

    def __init__(self) -> None:
        self.peak_mib = 0.0
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        process = psutil.Process()
        while True:
            self.peak_mib = max(self.peak_mib, process.memory_full_info().uss / 2**20)
            time.sleep(0.02)


def main(model_name: str, report: str | None = None) -> None:
    private = PeakPrivateMemory()
    config = TrainConfig(model=model_name, window=256, sink=1, precision="fp32")
    accelerator = make_accelerator(config)
    empty = only_main_process_reads_weights(accelerator) and not accelerator.is_main_process
    model, _ = aha.load_model(model_name, weights=not empty)
    shape = {key: getattr(model.config, key, None) for key in MODEL_SHAPE}
    model = prepare_model(config, model)
    after_load, private_after_load = peak_rss_mib(), private.peak_mib
    model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    shards = [p.to_local() for p in model.parameters()]
    storages = {shard.untyped_storage().data_ptr(): shard.untyped_storage().nbytes() for shard in shards}
    row = {"rank": accelerator.process_index, "built_empty": empty, "peak_rss_mib_loaded": round(after_load),
           "peak_rss_mib_sharded": round(peak_rss_mib()), "peak_private_mib_loaded": round(private_after_load),
           "peak_private_mib_sharded": round(private.peak_mib), "parameters_held": sum(shard.numel() for shard in shards),
           "mib_behind_the_shards": round(sum(storages.values()) / 2**20)}  # fmt: skip
    print(json.dumps(row), flush=True)
    rows = gather_object([row])
    if report is not None and accelerator.is_main_process:
        plugin = accelerator.state.fsdp_plugin
        write_json_report(report, {
            "schema": "aha-fsdp-loading-memory/1", "meta": run_meta(), "model": model_name,
            "processes": accelerator.num_processes,
            "cpu_ram_efficient_loading": bool(plugin and plugin.cpu_ram_efficient_loading),
            "parameters": sum(p.numel() for p in model.parameters()),
            "model_config": shape,
            "rows": sorted(rows, key=lambda r: r["rank"]),
        })  # fmt: skip


if __name__ == "__main__":
    if sys.argv[1:2] == ["--make-model"]:
        make_model(sys.argv[2])
        sys.exit()
    main(
        sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m",
        sys.argv[2] if len(sys.argv) > 2 else None,
    )
