"""The vLLM plugin: ``vllm serve MODEL_DIR`` and ``vllm.LLM(MODEL_DIR)`` serve saved AHA models.

Installed as the ``vllm.general_plugins`` entry point ``aha`` (``pyproject.toml``), so vLLM calls
:func:`register` in every process it starts (its workers are spawned: registering from user code
would not reach them). Nothing in vLLM is patched. See docs/serving.md for what is supported.
"""

from __future__ import annotations

#: Architecture name in an AHA ``config.json`` -> the module of its vLLM class (same name), or ``module:Class``.
ARCHITECTURES = {
    "AhaLlamaForCausalLM": "aha.integrations.vllm.models",
    "AhaMistralForCausalLM": "aha.integrations.vllm.models",
    "AhaQwen2ForCausalLM": "aha.integrations.vllm.models",
    "AhaQwen3ForCausalLM": "aha.integrations.vllm.models",
    "AhaOlmo2ForCausalLM": "aha.integrations.vllm.olmo2",
    "FAOlmoForCausalLM": "aha.integrations.vllm.olmo2:AhaOlmo2ForCausalLM",  # the released AHA-OLMO2
}


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
    types (``import aha``) and the released AHA-OLMO2's ``faolmo``, vLLM's registries learn the model
    classes (by path: imported only in the processes that build a model), the ``AHA`` attention
    backend and the block-size hook."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP
    from vllm.v1.attention.backends.registry import register_backend

    import aha  # noqa: F401  (registers the aha_* configs with AutoConfig)
    from aha.integrations.vllm.configs import ReleasedAhaOlmo2Config

    AutoConfig.register(ReleasedAhaOlmo2Config.model_type, ReleasedAhaOlmo2Config, exist_ok=True)
    for architecture, path in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, path if ":" in path else f"{path}:{architecture}")
        MODELS_CONFIG_MAP[architecture] = _OneBlockPerRequest
    register_backend("AHA", "aha.integrations.vllm.attention.AhaAttentionBackend")
