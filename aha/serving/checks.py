"""Checks of generation requests that transformers' handlers leave to the model (``aha serve``).

A request whose body is not a JSON object, or whose ``max_tokens`` / ``max_completion_tokens``
is not a whole number between 1 and the model's context, gets a 400 with an OpenAI-style error
before it reaches the model's process; one naming another model, a 404. Everything else goes on
unchanged.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Paths of the requests that generate, and the fields that bound how many tokens they generate.
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens", "max_output_tokens")


def request_problem(body: bytes, served_model: str, context_length: int | None) -> tuple[int, str] | None:
    """``(HTTP status, message)`` for what is wrong with a generation request's ``body`` (JSON bytes), or None."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return 400, f"the request body is not valid JSON: {error}"
    if not isinstance(request, dict):
        return 400, f"the request body must be a JSON object, got {type(request).__name__}"
    model = request.get("model")
    if model is not None and model != served_model:
        return 404, f"this server serves the model {served_model!r}, not {model!r} (GET /v1/models lists it)"
    for field in TOKEN_LIMIT_FIELDS:
        value = request.get(field)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return 400, f"{field} must be a whole number >= 1, got {value!r}"
        if context_length is not None and value >= context_length:
            return 400, (f"{field}={value} does not fit the model's context of {context_length} tokens (prompt and answer; "
                    "--max-model-len); ask for fewer tokens")  # fmt: skip
    return None


class RequestChecks:
    """ASGI middleware answering the generation requests :func:`request_problem` refuses.

    Args:
        app: the server's ASGI app.
        served_model: the model's name, as the server was started with it.
        engine: the served model's ``EngineClient`` (its ``model_config`` gives the context).
        generation_state: the server's ``GenerationState`` (``--max-model-len``).
    """

    def __init__(self, app: ASGIApp, served_model: str, engine: Any, generation_state: Any):
        self.app = app
        self.served_model = served_model
        self.context_length = generation_state.context_length(engine.model_config)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        body = b""
        while True:
            message = await receive()
            received.append(message)
            if message["type"] != "http.request":  # the client went away
                break
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        complete = received[-1]["type"] == "http.request"
        problem = request_problem(body, self.served_model, self.context_length) if complete else None
        if problem is not None:
            status, message = problem
            error = {"error": {"message": message, "type": "invalid_request_error", "code": status}}
            await JSONResponse(error, status_code=status)(scope, receive, send)
            return

        async def replay() -> Message:
            return received.pop(0) if received else await receive()

        await self.app(scope, replay, send)
