"""The vLLM plugin: ``vllm serve MODEL_DIR`` and ``vllm.LLM(MODEL_DIR)`` serve saved AHA models.

Installed as the ``vllm.general_plugins`` entry point ``aha`` (``pyproject.toml``), so vLLM calls
:func:`register` in every process it starts (its workers are spawned: registering from user code
would not reach them). Nothing in vLLM is patched. See docs/serving.md for what is supported.
"""

from __future__ import annotations

ARCHITECTURES = ("AhaLlamaForCausalLM", "AhaMistralForCausalLM", "AhaQwen2ForCausalLM", "AhaQwen3ForCausalLM")


class _OneBlockPerRequest:
    """vLLM's per-architecture config hook (``MODELS_CONFIG_MAP``) for AHA architectures."""

    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        from aha.integrations.vllm.attention import one_block_per_request

        one_block_per_request(vllm_config)

    @staticmethod
    def verify_and_update_model_config(model_config) -> None:
        return None


def register() -> None:
    """Make vLLM serve AHA checkpoints: transformers' ``AutoConfig`` learns the ``aha_*`` model
    types (``import aha``), vLLM's registries learn the model classes (by path: imported only in
    the processes that build a model), the ``AHA`` attention backend and the block-size hook."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import register_backend

    import aha  # noqa: F401  (registers the aha_* configs with AutoConfig)

    for architecture in ARCHITECTURES:
        ModelRegistry.register_model(architecture, f"aha.integrations.vllm.models:{architecture}")
        MODELS_CONFIG_MAP[architecture] = _OneBlockPerRequest
    register_backend("AHA", "aha.integrations.vllm.attention.AhaAttentionBackend")
