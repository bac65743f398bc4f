"""The released AHA-OLMO2 checkpoint's ``config.json`` (``model_type: "faolmo"``) for vLLM.

vLLM reads a model's config through transformers' ``AutoConfig``, which does not know ``faolmo``
(the release ships remote code for it, which this package never runs). :func:`aha.from_pretrained`
translates that config on load; :class:`ReleasedAhaOlmo2Config` is the same translation as a config
class, registered for ``faolmo`` by the plugin, so vLLM serves the folder as it is.
"""

from __future__ import annotations

from typing import Any

from aha.hf.modeling import AhaOlmo2Config, released_aha_olmo2_config


class ReleasedAhaOlmo2Config(AhaOlmo2Config):
    """``faolmo``: an :class:`~aha.hf.modeling.AhaOlmo2Config` whose ``"aha"`` block comes from the
    release's ``local_window_size`` (fused routers without bias, threshold 0.5, no sink)."""

    model_type = "faolmo"

    def __init__(self, local_window_size: int = 128, aha: dict[str, Any] | None = None, **kwargs: Any):
        for released_only in ("auto_map", "attention_implementation"):  # remote code this package never runs
            kwargs.pop(released_only, None)
        if aha is None:
            aha = released_aha_olmo2_config({"local_window_size": local_window_size}).aha
        super().__init__(aha=aha, **kwargs)
