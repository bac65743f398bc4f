"""``aha serve``: an OpenAI-compatible server for AHA models, on transformers' serving stack.

transformers' pieces do the serving (FastAPI app, OpenAI request handling, streaming, the model's
own process, continuous batching); aha adds the model loading (:class:`AhaModelLoader`), AHA
attention under continuous batching (:mod:`aha.hf.continuous_batching`), request checks and
``/metrics`` (:mod:`aha.serving.telemetry`).
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aha._fields import option

if TYPE_CHECKING:
    from transformers import ContinuousBatchingConfig

_log = logging.getLogger("aha.serve")

#: Endpoints of the server (all of transformers' serve, plus ``/metrics``).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


@dataclass(frozen=True)
class ServeSettings:
    """How ``aha serve`` serves a model (each field is an ``aha serve`` flag)."""

    window: int | None = option("Convert a plain model with open routers at this window (an AHA model keeps its own).", default=None)
    sink: int | None = option("With --window: local heads also see the first N keys.", default=None)
    dense: bool = option("Serve the same weights with PyTorch SDPA (full attention, no routing): the baseline.", default=False)
    host: str = option("Address to listen on (127.0.0.1: this machine only).", default="127.0.0.1")
    port: int = option("Port to listen on.", default=8000)
    continuous_batching: bool = option("Batch concurrent requests together (paged KV cache, AHA attention per request).", default=False)
    max_model_len: int | None = option("Longest request, prompt and answer, in tokens (default: the model's context).", default=None)
    kv_cache_tokens: int | None = option(
        "With --continuous-batching: tokens the paged KV cache holds, all requests together (default: sized from "
        "memory; for a routed model on CPU at most half the memory available at start).",
        default=None,
    )
    dtype: str = option("Weight dtype: float32, bfloat16 or auto (the checkpoint's).", default="float32")
    device: str = option("Device: auto (CUDA if available, else CPU), cpu, cuda, cuda:1, ...", default="auto")
    log_level: str = option("Log level: debug, info, warning, error.", default="info")
    graceful_shutdown_seconds: float = option("On SIGTERM, wait this long for requests in flight.", default=60.0)

    def __post_init__(self) -> None:
        problems = []
        if self.window is not None and self.window < 1:
            problems.append(f"--window must be >= 1, got {self.window}")
        if self.sink is not None and self.sink < 0:
            problems.append(f"--sink must be >= 0, got {self.sink}")
        if self.dense and (self.window is not None or self.sink is not None):
            problems.append("--dense serves full attention: drop --window/--sink")
        if not 0 < self.port < 65536:
            problems.append(f"--port must be in 1..65535, got {self.port}")
        if self.max_model_len is not None and self.max_model_len < 2:
            problems.append(f"--max-model-len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_tokens is not None and (self.kv_cache_tokens < 1 or not self.continuous_batching):
            problems.append(f"--kv-cache-tokens sizes the cache of --continuous-batching: pass both, with a count >= 1 (got {self.kv_cache_tokens})")
        if problems:
            raise ValueError("; ".join(problems))


def configure_logging(level: str | int) -> None:
    """Send ``aha.serve``'s lines (requests, routes) to stderr at ``level``, once per process."""
    logger = logging.getLogger("aha.serve")
    logger.setLevel(level.upper() if isinstance(level, str) else level)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s aha.serve %(levelname)s %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def _cache_config(settings: ServeSettings) -> ContinuousBatchingConfig | None:
    """The paged cache of ``--kv-cache-tokens`` (None: transformers', or for AHA models on CPU our, default sizing)."""
    from transformers import ContinuousBatchingConfig

    if settings.kv_cache_tokens is None:
        return None
    pages = -(-settings.kv_cache_tokens // ContinuousBatchingConfig().page_size)
    return ContinuousBatchingConfig(num_blocks=pages)


def serve(model: str, settings: ServeSettings) -> None:
    """Serve ``model`` (an AHA model folder, a plain one with ``window``, or ``"smollm2-135m"``) until SIGTERM/Ctrl+C.

    On SIGTERM the server stops taking connections, finishes the requests in flight (up to
    ``graceful_shutdown_seconds``), then stops the model's process.
    """
    metrics_dir = None
    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:  # before any process imports prometheus_client
        metrics_dir = tempfile.mkdtemp(prefix="aha-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        _run(model, settings)
    finally:
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]


def _run(model: str, settings: ServeSettings) -> None:
    import uvicorn
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.responses import Response
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.systemone import SystemOneHandler
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState, set_serve_log_level

    from aha.serving.checks import RequestChecks
    from aha.serving.loader import AhaModelLoader
    from aha.serving.telemetry import metrics_registry

    configure_logging(settings.log_level)
    set_serve_log_level(logging.getLevelName(settings.log_level.upper()))
    loader = AhaModelLoader(
        window=settings.window, sink=settings.sink, dense=settings.dense, dtype=settings.dtype, device=settings.device,
        log_level=settings.log_level,
    )
    state = GenerationState(
        continuous_batching=settings.continuous_batching, max_model_len=settings.max_model_len, cb_config=_cache_config(settings)
    )
    manager = ModelManager(loader, state, model_timeout=-1, force_model=model)
    app = build_server(
        manager,
        ChatCompletionHandler(model_manager=manager, generation_state=state),
        completion_handler=CompletionHandler(model_manager=manager, generation_state=state),
        response_handler=ResponseHandler(model_manager=manager, generation_state=state),
        transcription_handler=TranscriptionHandler(manager),
        systemone_handler=SystemOneHandler(model_manager=manager, generation_state=state),
    )
    engine = manager.get_engine(model)
    app.add_middleware(RequestChecks, served_model=model, engine=engine, generation_state=state)
    registry = metrics_registry(lambda: len(engine.pending_requests))
    app.add_route("/metrics", lambda _request: Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST))
    attention = "sdpa (dense baseline)" if settings.dense else "aha"
    _log.info("serving %s with %s attention on http://%s:%d%s", model, attention, settings.host, settings.port,
              " with continuous batching" if settings.continuous_batching else "")  # fmt: skip
    # uvicorn drains on SIGTERM, then re-raises it to the handler it found: exit 0, cleaning up on the way
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
    )  # fmt: skip
    uvicorn.Server(config).run()
