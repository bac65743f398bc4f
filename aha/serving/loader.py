"""How ``aha serve`` loads its model, as a ``ModelLoader`` of transformers' serving stack.

The server pickles the loader into the model's process (spawned), which unpickling this module
imports: that registers the AHA classes and the ``"aha"`` attention there too.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from transformers.cli.serving.model_manager import ModelLoader
from transformers.cli.serving.utils import parse_model_id

import aha
from aha.hf.attention import ATTN_IMPLEMENTATION
from aha.models import model_path
from aha.serving.server import configure_logging
from aha.serving.telemetry import Telemetry

_log = logging.getLogger("aha.serve")

if TYPE_CHECKING:
    from transformers import (
        GenerationConfig,
        PretrainedConfig,
        PreTrainedModel,
        PreTrainedTokenizerBase,
    )


def model_folder(model_id: str) -> Path:
    """The folder of a served model (``smollm2-135m`` or a saved model folder; see :func:`aha.models.model_path`).

    ``model_id`` is the serving stack's id: a path as it is, any other name with ``@revision``.
    """
    repo, _, _ = parse_model_id(model_id)
    return Path(model_path(repo))


class AhaModelLoader(ModelLoader):
    """Loads an AHA checkpoint routed, or a plain model converted at ``window``/``sink``.

    Args:
        window, sink: convert a plain model with these (required for a plain model unless
            ``dense``); an AHA checkpoint keeps its own, and these must be None or equal.
        dense: serve the same weights with PyTorch SDPA (no routing): the baseline.
        dtype: weight dtype (``"float32"``, ``"bfloat16"``, ...).
        device: ``"auto"`` (CUDA if available, else CPU), or a torch device.
        log_level: of the model's process's ``aha.serve`` lines.

    Never runs code from the checkpoint (``trust_remote_code`` stays False).
    """

    def __init__(
        self, *, window: int | None, sink: int | None, dense: bool, dtype: str, device: str = "auto",
        log_level: str = "info",
    ):  # fmt: skip
        super().__init__(device=device, dtype=dtype, trust_remote_code=False)
        self.window, self.sink, self.dense, self.log_level = window, sink, dense, log_level

    def load_config(self, model_id: str) -> tuple[PretrainedConfig, GenerationConfig]:
        return super().load_config(str(model_folder(model_id)))

    def load_processor(self, model_id: str) -> PreTrainedTokenizerBase:
        return super().load_processor(str(model_folder(model_id)))

    def _load_model(self, model_id: str, tqdm_class: type | None = None, progress_callback: Any = None) -> PreTrainedModel:
        """Load, route (or not) and instrument the model; runs in the model's process."""
        configure_logging(self.log_level)
        folder = model_folder(model_id)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        model = aha.from_pretrained(folder, dtype=self.dtype, tqdm_class=tqdm_class).to(device).eval()
        routed_checkpoint = aha.is_aha_model(model)
        if routed_checkpoint:
            aha.AhaSettings.of(model.config).check_matches(str(folder), window=self.window, sink=self.sink)
        if self.dense:
            model.set_attn_implementation("sdpa")
        elif not routed_checkpoint:
            if self.window is None:
                raise ValueError(
                    f"{folder} is not an AHA model: pass --window (and --sink) to convert it, or --dense to serve "
                    "it with full attention"
                )
            model = aha.convert(model, window=self.window, sink=self.sink or 0).eval()
            _log.warning("%s is converted with open routers: every head attends globally until the routers "
                         "are trained (aha train); serve the trained model folder to skip work", folder)
        if model.device.type == "cpu" and model.config._attn_implementation == ATTN_IMPLEMENTATION:
            prepare_cpu_kernel(model.dtype)
        Telemetry(model).install()
        return model


def prepare_cpu_kernel(dtype: torch.dtype) -> None:
    """Measure (or read the cached measurement of) the C++ CPU kernel's settings for ``dtype`` now,
    while the model loads, so that no request waits for it, and log how long it took."""
    from aha.kernels.cpu_tuning import kernel_choice

    _log.info("preparing the CPU attention kernel for %s (measured once per machine, then cached)", dtype)
    start = time.perf_counter()
    kernel_choice(dtype)
    _log.info("CPU attention kernel for %s ready in %.1f s", dtype, time.perf_counter() - start)

