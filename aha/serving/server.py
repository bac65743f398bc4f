"""``aha serve``: an OpenAI-compatible server for AHA models, on transformers' serving stack.

transformers' pieces do the serving (FastAPI app, OpenAI request handling, streaming, the model's
own process, continuous batching); aha adds the model loading (:class:`AhaModelLoader`), AHA
attention under continuous batching (:mod:`aha.hf.continuous_batching`), access and request
checks (:mod:`aha.serving.access`, :mod:`aha.serving.checks`), the request limits and restarts of
the model's process (:mod:`aha.serving.engine`) and ``/metrics`` (:mod:`aha.serving.telemetry`).
Only the endpoints of :data:`ENDPOINTS` are served (transformers' ``/reset``, ``/load_model``,
``/v1/responses``, ... are not).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aha._fields import option

if TYPE_CHECKING:
    from transformers import ContinuousBatchingConfig

_log = logging.getLogger("aha.serve")

#: Endpoints of the server that transformers' handlers answer.
TRANSFORMERS_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/models")
#: Every endpoint of the server (aha answers ``/health`` and ``/metrics``).
ENDPOINTS = (*TRANSFORMERS_ENDPOINTS, "/health", "/metrics")


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
    api_key: str | None = dataclasses.field(default=None, repr=False, metadata={"help": (
        "Require `Authorization: Bearer KEY` (an OpenAI client's api_key) on every endpoint but /health (default: the "
        "AHA_API_KEY environment variable, which keeps the key out of the process list; unset: no key).")})  # fmt: skip
    max_restarts: int = option("Restart the model's process this many times when it dies, then stop the server (exit 1).", default=3)
    max_request_mb: float = option("Largest request body taken, in MiB (413 past it).", default=16.0)
    allow_request_chat_template: bool = option(
        "Let a request replace the chat template (chat_template_kwargs.chat_template).", default=False
    )

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
        if self.max_restarts < 0:
            problems.append(f"--max-restarts must be >= 0, got {self.max_restarts}")
        if not self.max_request_mb > 0:
            problems.append(f"--max-request-mb must be > 0, got {self.max_request_mb}")
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


class ModelProcessDied(RuntimeError):
    """The model's process died more often than ``--max-restarts`` allows: the server stopped."""


def _template_parameters(processor: Any) -> frozenset[str]:
    """The parameters of ``processor.apply_chat_template`` (and those transformers' handlers pass it): not template
    variables, so not for a request's ``chat_template_kwargs``."""
    parameters = inspect.signature(processor.apply_chat_template).parameters.values()
    named = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return frozenset(named | {"load_audio_from_video", "num_frames"})


def _run(model: str, settings: ServeSettings) -> None:
    import uvicorn
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
    from starlette.responses import JSONResponse, Response
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.utils import GenerationState, set_serve_log_level

    from aha.serving.access import API_KEY_VARIABLE, AccessChecks, exposure_warning
    from aha.serving.checks import RequestChecks, RequestRules
    from aha.serving.engine import AhaChatCompletionHandler, AhaCompletionHandler, AhaModelManager, ModelProcessSupervisor
    from aha.serving.loader import AhaModelLoader
    from aha.serving.telemetry import metrics_registry

    configure_logging(settings.log_level)
    set_serve_log_level(logging.getLevelName(settings.log_level.upper()))
    api_key = settings.api_key or os.environ.get(API_KEY_VARIABLE) or None
    warning = exposure_warning(settings.host, api_key)
    if warning is not None:
        _log.warning(warning)
    loader = AhaModelLoader(
        window=settings.window, sink=settings.sink, dense=settings.dense, dtype=settings.dtype, device=settings.device,
        log_level=settings.log_level,
    )
    state = GenerationState(
        continuous_batching=settings.continuous_batching, max_model_len=settings.max_model_len, cb_config=_cache_config(settings)
    )
    manager = AhaModelManager(loader, state, model_timeout=-1, force_model=model)  # loads the model
    engine = manager.get_engine(model)
    handlers = {"model_manager": manager, "generation_state": state}
    app = build_server(
        manager, AhaChatCompletionHandler(**handlers), completion_handler=AhaCompletionHandler(**handlers),
        response_handler=None, transcription_handler=None, systemone_handler=None,  # their endpoints are removed below
    )  # fmt: skip
    app.router.routes[:] = [route for route in app.router.routes if getattr(route, "path", None) in TRANSFORMERS_ENDPOINTS]

    def health(_request: Any) -> JSONResponse:
        if engine.running:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unhealthy", "reason": "engine_dead" if engine.is_dead else "restarting"}, status_code=503)

    registry = metrics_registry(lambda: len(engine.pending_requests), lambda: engine.running)
    app.add_route("/health", health)
    app.add_route("/metrics", lambda _request: Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST))
    rules = RequestRules(
        served_model=model, token_limit=engine.token_limit,
        template_parameters=_template_parameters(engine.processor), allow_chat_template=settings.allow_request_chat_template,
    )  # fmt: skip
    app.add_middleware(RequestChecks, rules=rules, max_body_bytes=int(settings.max_request_mb * 2**20))
    app.add_middleware(AccessChecks, api_key=api_key)  # the outermost: refused requests are not read
    attention = "sdpa (dense baseline)" if settings.dense else "aha"
    _log.info("serving %s with %s attention on http://%s:%d%s%s", model, attention, settings.host, settings.port,
              " with continuous batching" if settings.continuous_batching else "",
              ", API key required" if api_key else "")  # fmt: skip
    # uvicorn drains on SIGTERM, then re-raises it to the handler it found: exit 0, cleaning up on the way
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    supervisor = ModelProcessSupervisor(engine, settings.max_restarts, on_give_up=lambda: setattr(server, "should_exit", True))
    config = uvicorn.Config(
        app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=settings.graceful_shutdown_seconds,
        callback_notify=supervisor.check, timeout_notify=1,  # uvicorn calls it about once a second
    )  # fmt: skip
    server = uvicorn.Server(config)
    server.run()
    if supervisor.gave_up:
        raise ModelProcessDied(f"the model's process died after {supervisor.restarts} restarts (--max-restarts): "
                               f"{engine.fatal_error}")  # fmt: skip
