"""The served model as the API process sees it: the request limits that need the tokenized prompt,
requests whose clients left, and restarts of the model's process.

transformers' handlers tokenize a request, build its generation settings and hand both to the
model's ``EngineClient``; :class:`AhaEngineClient` checks them there, for every endpoint alike:

* **Length.** Prompt + answer must fit the request limit (:class:`TokenLimit`: ``--max-model-len``,
  else the model's context, and under continuous batching a smaller ``--kv-cache-tokens``), whatever
  field asked for the answer's length (``max_tokens``, ``max_completion_tokens``, ``generation_config``'s
  ``max_new_tokens`` / ``max_length``): a request that asks for more gets a 400; one that asks for
  nothing gets the room left (:func:`bound_answer`). An empty prompt gets a 400.
* **Continuous batching** applies per request only the answer's length, the end tokens and the
  sampling settings the model's generation config has processors for; a request asking for
  anything else gets a 400 instead of being answered as if it had not (:func:`batching_problem`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from transformers.cli.serving.chat_completion import ChatCompletionHandler
from transformers.cli.serving.completion import CompletionHandler
from transformers.cli.serving.model_manager import EngineClient, ModelManager
from transformers.cli.serving.utils import GenerationState, canonical_model_id, prompt_length

from aha.serving.checks import TOKEN_LIMIT_FIELDS, TokenLimit
from aha.serving.telemetry import MODEL_RESTARTS, REQUESTS_ABORTED

if TYPE_CHECKING:
    from transformers import GenerationConfig, PretrainedConfig

_log = logging.getLogger("aha.serve")

#: Answer length of a request that sets none, for a model whose config gives no context length.
DEFAULT_ANSWER_TOKENS = 1024


def token_limit(state: GenerationState, model_config: PretrainedConfig, batching: bool) -> TokenLimit | None:
    """The request limit of a model served with ``state`` (None: its config gives no context length).

    Under continuous batching a paged cache sized by ``--kv-cache-tokens`` smaller than the context
    sets it: a request the cache cannot hold would stop the batching worker. That is warned about.
    """
    context = state.context_length(model_config)
    limit = None if context is None else TokenLimit(context, "--max-model-len" if state.max_model_len else "the model's context")
    cache = state.cb_config
    if batching and cache is not None and cache.num_blocks is not None:
        cache_tokens = cache.num_blocks * cache.page_size
        if limit is None or cache_tokens < limit.tokens:
            _log.warning("--kv-cache-tokens: the paged cache holds %d tokens, fewer than one full-length request "
                         "(%s): requests are limited to %d tokens, prompt and answer", cache_tokens,
                         "no context length known" if limit is None else f"{limit.tokens}, {limit.source}",
                         cache_tokens)  # fmt: skip
            limit = TokenLimit(cache_tokens, "--kv-cache-tokens")
    return limit


def asks_new_tokens(body: dict[str, Any]) -> bool:
    """Whether a request (validated by :func:`aha.serving.checks.request_problem`) sets how many tokens to generate
    (``generation_config``'s ``max_length``, prompt included, is left to :func:`bound_answer`)."""
    if any(body.get(field) is not None for field in TOKEN_LIMIT_FIELDS):
        return True
    config = json.loads(body["generation_config"]) if body.get("generation_config") is not None else {}
    return config.get("max_new_tokens") is not None


def bound_answer(prompt_tokens: int, generation_kwargs: dict[str, Any], limit: TokenLimit | None) -> None:
    """Set ``generation_kwargs["max_new_tokens"]`` so that prompt + answer fit ``limit``, in place.

    ``max_new_tokens`` None means the request set no length: it gets the room left. A
    ``max_length`` (prompt included) becomes the ``max_new_tokens`` it implies.

    Raises:
        ValueError: the prompt is empty, leaves no room, or the request asked for more than the room.
    """
    if prompt_tokens == 0:
        raise ValueError("the prompt is empty: send at least one token of prompt")
    asked = generation_kwargs.get("max_new_tokens")
    max_length = generation_kwargs.pop("max_length", None)
    if max_length is not None:
        if max_length <= prompt_tokens:
            raise ValueError(f"generation_config max_length={max_length} leaves no room for an answer after the "
                             f"prompt's {prompt_tokens} tokens")  # fmt: skip
        asked = max_length - prompt_tokens if asked is None else min(asked, max_length - prompt_tokens)
    if limit is None:
        generation_kwargs["max_new_tokens"] = DEFAULT_ANSWER_TOKENS if asked is None else asked
        return
    room = limit.tokens - prompt_tokens
    if room < 1:
        raise ValueError(f"The prompt has {prompt_tokens} tokens, but requests hold at most {limit.tokens}, prompt "
                         f"and answer ({limit.source}): send a shorter prompt")  # fmt: skip
    if asked is not None and asked > room:
        raise ValueError(f"The prompt has {prompt_tokens} tokens and the request asks for up to {asked} more, but "
                         f"requests hold at most {limit.tokens} tokens, prompt and answer ({limit.source}): ask for "
                         f"at most {room}")  # fmt: skip
    generation_kwargs["max_new_tokens"] = room if asked is None else asked


#: What continuous batching takes from a request's generation settings (transformers' ``CBGenerateRunner``).
BATCHED_SETTINGS = ("max_new_tokens", "eos_token_id", "do_sample", "temperature", "top_k", "top_p", "seed")
#: The request fields that generation settings come from, where not from ``generation_config``.
REQUEST_FIELDS = {"stop_strings": "stop", "repetition_penalty": "frequency_penalty", "sequence_bias": "logit_bias"}
#: Values of generation settings that change nothing (``frequency_penalty`` 0, which clients often send).
_NEUTRAL = {"repetition_penalty": 1.0}
#: Sampling settings and the values for which transformers builds no logits processor for them.
_UNSET_SAMPLING = {"temperature": (None, 1.0), "top_k": (None, 0), "top_p": (None, 1.0)}


def per_request_sampling(model_config: GenerationConfig) -> set[str]:
    """The sampling settings continuous batching sets per request for a model of generation config ``model_config``:
    those it builds logits processors for (none when it decodes greedily, nor for a temperature of 1, a top-k of 0,
    a top-p of 1)."""
    if not model_config.do_sample:
        return set()
    return {name for name, unset in _UNSET_SAMPLING.items() if getattr(model_config, name) not in unset}


def batching_problem(generation_kwargs: dict[str, Any], model_config: GenerationConfig) -> str | None:
    """What continuous batching would not apply of a request's ``generation_kwargs``, or None.

    Its manager decodes as the model's generation config says (``model_config``: greedy, or
    sampling), and sets per request only the :func:`per_request_sampling` settings; everything
    else but the answer's length and end tokens is dropped.
    """
    dropped = [
        REQUEST_FIELDS.get(name, f"generation_config {name}")
        for name, value in generation_kwargs.items()
        if name not in BATCHED_SETTINGS and value not in (None, [], {}, _NEUTRAL.get(name), getattr(model_config, name, None))
    ]
    if dropped:
        return (f"continuous batching does not apply {', '.join(dropped)}: drop {'it' if len(dropped) == 1 else 'them'}, "
                "or serve without --continuous-batching")  # fmt: skip
    model_samples = bool(model_config.do_sample)
    request_samples = bool(generation_kwargs["do_sample"]) and generation_kwargs["temperature"] != 0
    if request_samples and not model_samples:
        return ("continuous batching decodes as the model's generation config says, greedily for this model: a "
                "request cannot turn sampling on (do_sample); serve without --continuous-batching to sample")  # fmt: skip
    if not model_samples:
        return None
    wanted = {name: generation_kwargs[name] for name in _UNSET_SAMPLING} if request_samples else {"top_k": 1}
    per_request = per_request_sampling(model_config)
    ignored = [name for name, value in wanted.items()
               if value is not None and value != getattr(model_config, name) and name not in per_request]  # fmt: skip
    if ignored:
        return (f"continuous batching sets {', '.join(ignored)} per request only where the model's generation config "
                f"sets {'it' if len(ignored) == 1 else 'them'}: drop {'it' if len(ignored) == 1 else 'them'}, or serve "
                "without --continuous-batching")  # fmt: skip
    return None


class AhaEngineClient(EngineClient):
    """transformers' ``EngineClient`` that bounds every request (:func:`bound_answer`,
    :func:`batching_problem`), counts the requests whose client left (``aha_requests_aborted_total``)
    and can restart its model's process (:meth:`restart`).

    Attributes:
        token_limit: the request limit (:func:`token_limit`).
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.token_limit = token_limit(self.generation_state, self.model_config, self.use_cb)

    def _bound(self, inputs: dict, generation_kwargs: dict) -> None:
        bound_answer(prompt_length(inputs), generation_kwargs, self.token_limit)
        if self.use_cb and (problem := batching_problem(generation_kwargs, self.generation_config)) is not None:
            raise ValueError(problem)

    async def generate_non_streaming(self, inputs: dict, generation_kwargs: dict) -> tuple[str, int, list[int]]:
        self._bound(inputs, generation_kwargs)
        return await super().generate_non_streaming(inputs, generation_kwargs)

    def generate_streaming(self, inputs: dict, generation_kwargs: dict, response_parser: Any = None) -> Any:
        self._bound(inputs, generation_kwargs)
        return super().generate_streaming(inputs, generation_kwargs, response_parser)

    async def _send_request(self, method: str, args: tuple, streamer: Any = None) -> Any:
        try:
            return await super()._send_request(method, args, streamer)
        except asyncio.CancelledError:  # the client left (or the server stopped) before the answer was complete
            REQUESTS_ABORTED.inc()
            raise

    @property
    def running(self) -> bool:
        """Whether the model's process runs and can answer."""
        return self.process_running and not self.is_dead

    def restart(self) -> None:
        """Stop the model's process (a dead batching worker leaves it running), then start a new one and wait for its
        model to load. Requests arriving meanwhile wait for it; those in flight failed with the death. A start that
        fails marks the engine dead again."""
        self.shutdown(self.fatal_error or "The model's process is restarting.")
        self.is_dead, self.fatal_error = False, None
        try:
            self.start()
        except Exception as error:  # noqa: BLE001 - any failure to start is reported the same way
            self._mark_dead(f"restarting the model's process failed: {type(error).__name__}: {error}")


class AhaModelManager(ModelManager):
    """transformers' ``ModelManager`` whose pinned model (``force_model``) is served by an :class:`AhaEngineClient`."""

    def preload_engine(self, force_model: str, engine_connection: tuple | None) -> None:
        if engine_connection is not None:
            raise ValueError("aha serve runs one API server")
        engine = AhaEngineClient(canonical_model_id(force_model), self.loader, self.generation_state)
        self.engines[engine.model_id] = engine
        engine.start()


class _AnswerLengthOfTheRequest:
    """Handler mixin: a request that sets no number of new tokens gets ``max_new_tokens`` None (not transformers'
    1024), which :class:`AhaEngineClient` turns into the room its prompt (or its ``max_length``) leaves."""

    def _build_generation_kwargs(self, body: dict, model_generation_config: GenerationConfig) -> dict:
        generation_kwargs = super()._build_generation_kwargs(body, model_generation_config)  # type: ignore[misc]
        if not asks_new_tokens(body):
            generation_kwargs["max_new_tokens"] = None
        return generation_kwargs


class AhaChatCompletionHandler(_AnswerLengthOfTheRequest, ChatCompletionHandler):
    """``/v1/chat/completions`` (transformers' handler; see :class:`_AnswerLengthOfTheRequest`)."""


class AhaCompletionHandler(_AnswerLengthOfTheRequest, CompletionHandler):
    """``/v1/completions`` (transformers' handler; see :class:`_AnswerLengthOfTheRequest`)."""


class ModelProcessSupervisor:
    """Restarts the model's process when it dies (crash, ``kill -9``, a dead batching worker), at most
    ``max_restarts`` times over the server's life; after that, stops the server (:attr:`gave_up`) so
    that whatever runs it can restart it. :meth:`check` is uvicorn's ``callback_notify``.
    """

    def __init__(self, engine: AhaEngineClient, max_restarts: int, on_give_up: Callable[[], None]):
        self.engine, self.max_restarts, self.on_give_up = engine, max_restarts, on_give_up
        self.restarts = 0
        self.gave_up = False
        self._restarting: asyncio.Future | None = None

    async def check(self) -> None:
        """Restart a dead model's process, or give up (see the class)."""
        if not self.engine.is_dead or self.gave_up or (self._restarting is not None and not self._restarting.done()):
            return
        _log.error("the model's process died: %s", self.engine.fatal_error)
        if self.restarts >= self.max_restarts:
            _log.error("the model's process was restarted %d times already (--max-restarts %d): stopping the server",
                       self.restarts, self.max_restarts)  # fmt: skip
            self.gave_up = True
            self.on_give_up()
            return
        self.restarts += 1
        MODEL_RESTARTS.inc()
        _log.warning("restarting the model's process (restart %d of at most %d)", self.restarts, self.max_restarts)
        self._restarting = asyncio.ensure_future(asyncio.to_thread(self._restart))

    def _restart(self) -> None:
        self.engine.restart()
        if self.engine.running:
            _log.warning("the model's process is back (restart %d)", self.restarts)
