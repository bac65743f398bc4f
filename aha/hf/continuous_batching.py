"""Continuous batching (transformers' paged-attention generation) for AHA models.

transformers' ``ContinuousBatchingManager`` runs only ``"sdpa"``, ``"paged|eager"`` and flash
attention. An AHA model keeps ``"aha"``: the paged KV cache gathers each request's keys (its
cached prefix, then its new tokens) into one packed row, and the ``"aha"`` attention function
runs every request's own causal + window + sink attention over them, split by ``cu_seq_lens_q``
and ``cu_seq_lens_k`` (see :func:`aha.hf.attention.aha_attention_forward`). No 4D mask is built.

What this does not do: the paged cache still gathers a request's whole prefix for every layer
(as it does for SDPA), so local heads skip the attention compute beyond their window but not
the KV copy; pages are not read per head.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transformers import ContinuousBatchingConfig, GenerationConfig, PreTrainedModel
from transformers.generation.continuous_batching import ContinuousBatchingManager
from transformers.generation.continuous_batching.requests import GenerationOutput

from aha.hf.attention import ATTN_IMPLEMENTATION

FinishedListener = Callable[[GenerationOutput], None]


class AhaContinuousBatchingManager(ContinuousBatchingManager):
    """transformers' continuous batching manager, keeping the ``"aha"`` attention implementation.

    Attributes:
        finished_listeners: called with the output of every request that finished (or failed) as
            :meth:`get_result` hands it out, e.g. for serving telemetry.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        self.finished_listeners: list[FinishedListener] = []
        super().__init__(*args, **kwargs)

    def switch_to_cb_friendly_attn(self, model: Any, auto_switch_to_flash: bool = True) -> None:
        """Keep ``"aha"`` (it reads the packed sequences itself); other implementations as transformers does."""
        if model.config._attn_implementation == ATTN_IMPLEMENTATION:
            return
        super().switch_to_cb_friendly_attn(model, auto_switch_to_flash)

    def get_result(self, request_id: str | None = None, timeout: float | None = None) -> GenerationOutput | None:
        """transformers' ``get_result``; a finished request's output also goes to :attr:`finished_listeners`."""
        output = super().get_result(request_id=request_id, timeout=timeout)
        if output is not None and output.is_finished():
            for listener in self.finished_listeners:
                listener(output)
        return output


def init_continuous_batching(
    model: PreTrainedModel,
    generation_config: GenerationConfig | None = None,
    continuous_batching_config: ContinuousBatchingConfig | None = None,
    workload_hints: Any = None,
) -> AhaContinuousBatchingManager:
    """An :class:`AhaContinuousBatchingManager` for ``model`` (``init_continuous_batching`` of AHA models)."""
    generation_config = generation_config if generation_config is not None else model.generation_config
    if generation_config.eos_token_id is None:
        generation_config.eos_token_id = -1  # as transformers does: no end-of-sequence token
    return AhaContinuousBatchingManager(
        model=model,
        generation_config=generation_config,
        continuous_batching_config=continuous_batching_config or ContinuousBatchingConfig(),
        workload_hints=workload_hints,
    )
