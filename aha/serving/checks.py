"""Checks of generation requests that transformers' handlers leave to the model (``aha serve``).

:func:`request_problem` refuses, before the request reaches the model's process, a body that
transformers would pass on to fail there (a 500, or a dead batching worker) or to run past the
server's limits: not a JSON object; another model's name (404); a ``max_tokens`` /
``max_completion_tokens`` that is not a whole number from 1 to below the context; an empty prompt
or malformed ``messages``; a ``temperature`` or ``top_p`` that is not a finite number in range;
``n`` other than 1; more than :data:`MAX_STOP_STRINGS` ``stop`` strings or longer ones than
:data:`MAX_STOP_CHARACTERS`; a ``generation_config`` that is not a JSON object, or whose lengths
and sampling values fail the same checks; ``chat_template_kwargs`` that are not template
variables, or that replace the server's chat template without ``--allow-request-chat-template``.

:class:`RequestChecks` reads the body once, linearly, up to a size limit (413 past it).
Prompt + answer against the limit is checked once the prompt is tokenized
(:mod:`aha.serving.engine`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Paths of the requests that generate (the only POST endpoints ``aha serve`` has).
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
#: Request fields that bound how many tokens a request generates.
TOKEN_LIMIT_FIELDS = ("max_tokens", "max_completion_tokens")
#: ``stop`` strings a request may give (OpenAI's own limit), and their longest length in characters:
#: every stop string costs a pass over the whole vocabulary before generation starts.
MAX_STOP_STRINGS = 4
MAX_STOP_CHARACTERS = 64
#: OpenAI's ranges of the sampling settings.
TEMPERATURE_RANGE = (0.0, 2.0)
TOP_P_RANGE = (0.0, 1.0)


@dataclass(frozen=True)
class TokenLimit:
    """The most tokens one request may hold, prompt and answer, and the setting that makes it so."""

    tokens: int
    source: str


@dataclass(frozen=True)
class RequestRules:
    """What :func:`request_problem` holds requests to.

    Attributes:
        served_model: the model's name, as the server was started with it.
        token_limit: the most tokens a request may hold, prompt and answer (None: unknown).
        template_parameters: the parameters of the processor's ``apply_chat_template``: a request's
            ``chat_template_kwargs`` may not set them (they are not template variables).
        allow_chat_template: whether a request may replace the chat template (``chat_template``).
    """

    served_model: str
    token_limit: TokenLimit | None
    template_parameters: frozenset[str] = frozenset()
    allow_chat_template: bool = False


def _whole_number_problem(name: str, value: Any, smallest: int) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
        return f"{name} must be a whole number >= {smallest}, got {value!r}"
    return None


def _number_problem(name: str, value: Any, bounds: tuple[float, float]) -> str | None:
    low, high = bounds
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        return f"{name} must be a number from {low:g} to {high:g}, got {value!r}"
    return None


def _stop_problem(name: str, value: Any) -> str | None:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) and stop for stop in stops):
        return f"{name} must be a non-empty string or a list of them, got {value!r}"[:300]
    if len(stops) > MAX_STOP_STRINGS:
        return f"{name} has {len(stops)} strings; at most {MAX_STOP_STRINGS} are taken"
    if any(len(stop) > MAX_STOP_CHARACTERS for stop in stops):
        return f"{name} strings may have at most {MAX_STOP_CHARACTERS} characters"
    return None


def _length_problem(name: str, value: Any, limit: TokenLimit | None, *, includes_prompt: bool) -> str | None:
    problem = _whole_number_problem(name, value, 2 if includes_prompt else 1)
    if problem is None and limit is not None and (value > limit.tokens if includes_prompt else value >= limit.tokens):
        return (f"{name}={value} does not fit the limit of {limit.tokens} tokens per request, prompt and answer "
                f"({limit.source}); ask for fewer tokens")  # fmt: skip
    return problem


def _generation_config_problem(text: Any, limit: TokenLimit | None) -> str | None:
    if not isinstance(text, str):
        return f"generation_config must be a string holding a JSON object, got {type(text).__name__}"
    try:
        config = json.loads(text)
    except json.JSONDecodeError as error:
        return f"generation_config is not valid JSON: {error}"
    if not isinstance(config, dict):
        return f"generation_config must hold a JSON object, got {type(config).__name__}"
    checks = {
        "max_new_tokens": lambda value: _length_problem("generation_config max_new_tokens", value, limit, includes_prompt=False),
        "max_length": lambda value: _length_problem("generation_config max_length", value, limit, includes_prompt=True),
        "temperature": lambda value: _number_problem("generation_config temperature", value, TEMPERATURE_RANGE),
        "top_p": lambda value: _number_problem("generation_config top_p", value, TOP_P_RANGE),
        "top_k": lambda value: _whole_number_problem("generation_config top_k", value, 0),
        "stop_strings": lambda value: _stop_problem("generation_config stop_strings", value),
    }
    for key, check in checks.items():
        if config.get(key) is not None and (problem := check(config[key])) is not None:
            return problem
    return None


def _messages_problem(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "messages must be a non-empty list of {\"role\": ..., \"content\": ...} objects"
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            return f"{where} must be an object with a string role"
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            return f"{where}.content must be a string or a list of content parts, got {type(content).__name__}"
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                return f"{where}.content parts must be objects with a string type"
            if part["type"] in ("text", "input_text", "output_text") and not isinstance(part.get("text"), str):
                return f"{where}.content text parts need a string text"
    return None


def _template_problem(kwargs: Any, rules: RequestRules) -> str | None:
    if not isinstance(kwargs, dict):
        return f"chat_template_kwargs must be an object of template variables, got {type(kwargs).__name__}"
    if "chat_template" in kwargs and not rules.allow_chat_template:
        return "a request may not replace the server's chat template (start aha serve with --allow-request-chat-template)"
    reserved = sorted((set(kwargs) & rules.template_parameters) - {"chat_template"})
    if reserved:
        return f"chat_template_kwargs holds template variables only, not {', '.join(reserved)}"
    return None


def request_problem(path: str, body: bytes, rules: RequestRules) -> tuple[int, str] | None:
    """``(HTTP status, message)`` for what is wrong with a generation request to ``path`` (its JSON ``body``), or None."""
    try:
        request = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return 400, f"the request body is not valid JSON: {error}"
    if not isinstance(request, dict):
        return 400, f"the request body must be a JSON object, got {type(request).__name__}"
    model = request.get("model")
    if model is not None and model != rules.served_model:
        return 404, f"this server serves the model {rules.served_model!r}, not {model!r} (GET /v1/models lists it)"
    for field in TOKEN_LIMIT_FIELDS:
        if request.get(field) is not None and (problem := _length_problem(field, request[field], rules.token_limit, includes_prompt=False)):
            return 400, problem
    if path == "/v1/completions":
        prompt = request.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return 400, f"prompt must be a non-empty string, got {prompt!r}"[:300]
    else:
        if (problem := _messages_problem(request.get("messages"))) is not None:
            return 400, problem
    checks = {
        "temperature": lambda value: _number_problem("temperature", value, TEMPERATURE_RANGE),
        "top_p": lambda value: _number_problem("top_p", value, TOP_P_RANGE),
        "n": lambda value: None if value == 1 and not isinstance(value, bool) else f"n must be 1 (one answer per request), got {value!r}",
        "stop": lambda value: _stop_problem("stop", value),
        "generation_config": lambda value: _generation_config_problem(value, rules.token_limit),
        "chat_template_kwargs": lambda value: _template_problem(value, rules),
    }
    for field, check in checks.items():
        if request.get(field) is not None and (problem := check(request[field])) is not None:
            return 400, problem
    return None


def error_response(
    status: int, message: str, kind: str = "invalid_request_error", headers: dict[str, str] | None = None
) -> JSONResponse:
    """An OpenAI-style error answer."""
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status, headers=headers)


class RequestChecks:
    """ASGI middleware answering the generation requests :func:`request_problem` refuses, and those
    whose body is larger than ``max_body_bytes`` (413, before reading past the limit).

    Args:
        app: the server's ASGI app.
        rules: what requests are held to.
        max_body_bytes: the largest body taken (``--max-request-mb``).
    """

    def __init__(self, app: ASGIApp, rules: RequestRules, max_body_bytes: int):
        self.app, self.rules, self.max_body_bytes = app, rules, max_body_bytes

    def _too_large(self) -> JSONResponse:
        megabytes = self.max_body_bytes / 2**20
        return error_response(413, f"the request body is larger than {self.max_body_bytes} bytes ({megabytes:g} MiB, "
                           "--max-request-mb): send a smaller request", "request_too_large")  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._too_large()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away: nobody to answer
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await self._too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        problem = request_problem(scope["path"], body, self.rules)
        if problem is not None:
            await error_response(*problem)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
