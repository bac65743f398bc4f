"""What ``aha serve`` measures, in Prometheus form (``/metrics``) and in its log.

The model runs in a process of its own (transformers' serving engine). There, :class:`Telemetry`
counts every request's tokens and time and every routed attention call's routes, into
``prometheus_client`` metrics in multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``, which ``aha
serve`` sets before either process imports the client). The API process serves them with
:func:`metrics_registry`, which adds the running ratios and the requests in flight.

Metrics (counters grow over the server's life):

* ``aha_requests_total``, ``aha_prompt_tokens_total``, ``aha_generated_tokens_total``;
  ``aha_request_seconds`` (histogram, arrival to last token);
* ``aha_route_decisions_total{route="global"|"local"}``: (token, head) routing decisions of
  every layer, prompt and generated tokens alike;
* ``aha_attention_scores_total{attention="routed"|"full"}``: query-key scores the routed model
  computes, and those full attention would (the compute ratio is their quotient);
* ``aha_global_fraction``, ``aha_attention_compute_ratio``: those ratios, running;
* ``aha_requests_in_flight``: requests accepted and not yet answered (running or queued);
* ``aha_requests_aborted_total``: requests whose client left before the answer was complete
  (counted by the API process);
* ``aha_model_process_restarts_total``, ``aha_model_process_up``: restarts of the model's process
  after it died, and whether it runs now (1) or not (0: dead or restarting).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from torch import Tensor, nn

from aha.hf import AhaSettings, is_aha_model
from aha.hf.control import observe_routes

_log = logging.getLogger("aha.serve")

REQUESTS = Counter("aha_requests", "Requests answered")
PROMPT_TOKENS = Counter("aha_prompt_tokens", "Prompt tokens of the requests answered")
GENERATED_TOKENS = Counter("aha_generated_tokens", "Tokens generated")
REQUEST_SECONDS = Histogram(
    "aha_request_seconds", "Time from a request's arrival at the model to its last token",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250),
)  # fmt: skip
REQUESTS_ABORTED = Counter("aha_requests_aborted", "Requests whose client left before the answer was complete")
MODEL_RESTARTS = Counter("aha_model_process_restarts", "Restarts of the model's process after it died")
ROUTE_DECISIONS = Counter("aha_route_decisions", "(token, head) routing decisions of every layer", ["route"])
ATTENTION_SCORES = Counter(
    "aha_attention_scores", "Query-key scores computed (routed) and those full attention would compute (full)",
    ["attention"],
)  # fmt: skip

#: Seconds between two reports of the routes under continuous batching (requests share forward passes).
ROUTES_REPORT_INTERVAL = 5.0


class RouteTally:
    """Running counts of routed (token, head) pairs and attention scores, cheap enough for every decode step.

    The same definitions as :class:`aha.RoutingStats` (a query at position ``p`` scores ``p + 1``
    keys globally, ``min(p + 1, window + sink)`` locally), without its per-layer and per-position
    tables.
    """

    def __init__(self, window: int, sink: int):
        self.reach = window + sink
        self.global_pairs = self.pairs = self.computed_scores = self.full_scores = 0.0

    def add(self, route: Tensor, first_position: int, valid: Tensor | None) -> None:
        """Count a route ``[batch, heads, seq]`` (True = global) of queries from ``first_position`` on."""
        batch, heads, seq = route.shape
        if seq == 1 and valid is None:  # a decode step: closed forms, one reduction
            keys = first_position + 1
            local_keys = min(keys, self.reach)
            opened = float(route.sum())
            self.global_pairs += opened
            self.pairs += batch * heads
            self.full_scores += batch * heads * keys
            self.computed_scores += batch * heads * local_keys + opened * (keys - local_keys)
            return
        weight = torch.ones(batch, seq, dtype=torch.float64) if valid is None else valid.detach().cpu().double()
        opened = (route.detach().cpu().double() * weight[:, None, :]).sum(dim=(0, 1))  # [seq] global heads per position
        keys = torch.arange(first_position + 1, first_position + seq + 1, dtype=torch.float64)
        local_keys = keys.clamp(max=self.reach)
        queries = weight.sum(0) * heads  # [seq] (token, head) pairs per position
        self.global_pairs += float(opened.sum())
        self.pairs += float(queries.sum())
        self.full_scores += float((queries * keys).sum())
        self.computed_scores += float((queries * local_keys + opened * (keys - local_keys)).sum())

    @property
    def global_fraction(self) -> float:
        return self.global_pairs / self.pairs if self.pairs else float("nan")

    def describe(self) -> str:
        """``"global 12.3% of (token, head) pairs, attention compute 0.210x of full"``."""
        return (f"global {100 * self.global_fraction:.1f}% of (token, head) pairs, attention compute "
                f"{self.computed_scores / self.full_scores:.3f}x of full")  # fmt: skip

    def report(self) -> None:
        """Add these counts to the route counters of ``/metrics``."""
        ROUTE_DECISIONS.labels(route="global").inc(self.global_pairs)
        ROUTE_DECISIONS.labels(route="local").inc(self.pairs - self.global_pairs)
        ATTENTION_SCORES.labels(attention="routed").inc(self.computed_scores)
        ATTENTION_SCORES.labels(attention="full").inc(self.full_scores)


class Telemetry:
    """Counts what one served model does; installed on the model in its process.

    Each request's line in the log has its tokens, time, global fraction and attention compute
    ratio. Sequential serving (``model.generate`` per request) counts the routes of its calls;
    under continuous batching requests share forward passes, so each packed sequence's routes are
    credited to its request (the manager names the requests of every batch in packing order), and
    the running totals also go to the log every :data:`ROUTES_REPORT_INTERVAL` seconds.
    """

    #: Requests whose routes are kept under continuous batching before the oldest are dropped
    #: (a request cancelled before it finished never collects its own).
    MAX_BATCHED_REQUESTS = 4096

    def __init__(self, model: nn.Module):
        self.model = model
        self.routed = is_aha_model(model) and model.config._attn_implementation == "aha"
        settings = AhaSettings.of(model.config) if self.routed else None
        self._new_tally = (lambda: RouteTally(settings.window, settings.sink)) if settings is not None else None
        self._routes = self._new_tally() if settings is not None else None
        self._exit = contextlib.ExitStack()
        self._lock = threading.Lock()
        self._batch: list[str] | None = None  # request ids of the packed sequences of the running forward pass
        self._batch_calls: dict[int, int] = {}  # per converted layer: sequences of that pass it has routed
        self._request_routes: dict[str, RouteTally] = {}

    def install(self) -> None:
        """Start counting: observe the routers, wrap ``generate`` and ``init_continuous_batching``."""
        if self.routed:
            self._exit.enter_context(observe_routes(self.model, self._observe))
        self.model.generate = self._timed_generate(self.model.generate)
        self.model.init_continuous_batching = self._watched_batching(self.model.init_continuous_batching)

    def _observe(self, row: int, route: Tensor, first_position: int, valid: Tensor | None) -> None:
        with self._lock:
            self._routes.add(route, first_position, valid)
            if self._batch is not None:  # packed sequences reach each layer one by one, in packing order
                sequence = self._batch_calls.get(row, 0)
                self._batch_calls[row] = sequence + 1
                if sequence < len(self._batch):
                    request = self._batch[sequence]
                    if request not in self._request_routes:
                        self._request_routes[request] = self._new_tally()
                    self._request_routes[request].add(route, first_position, valid)

    def _batch_started(self, request_ids: list[str] | None) -> None:
        with self._lock:
            self._batch, self._batch_calls = request_ids, {}
            while len(self._request_routes) > self.MAX_BATCHED_REQUESTS:
                del self._request_routes[next(iter(self._request_routes))]

    def take_routes(self) -> RouteTally | None:
        """The routes seen since the last call, added to ``/metrics`` (None for a model served without routing)."""
        if not self.routed:
            return None
        with self._lock:
            taken, self._routes = self._routes, self._new_tally()
        taken.report()
        return taken

    def _timed_generate(self, generate: Callable[..., Any]) -> Callable[..., Any]:
        def timed_generate(*args: Any, **kwargs: Any) -> Any:
            self.take_routes()  # anything before this request (warm-up) is not its own
            start = time.perf_counter()
            sequences = generate(*args, **kwargs)
            prompt = kwargs["input_ids"].shape[-1] if "input_ids" in kwargs else args[0].shape[-1]
            self.finished(prompt, sequences.shape[-1] - prompt, time.perf_counter() - start, self.take_routes())
            return sequences

        return timed_generate

    def _watched_batching(self, init: Callable[..., Any]) -> Callable[..., Any]:
        def watched_init(*args: Any, **kwargs: Any) -> Any:
            manager = init(*args, **kwargs)
            listeners = getattr(manager, "finished_listeners", None)
            if listeners is not None:
                listeners.append(self._batched_request_finished)
            if self.routed and hasattr(manager, "batch_listeners"):
                manager.batch_listeners.append(self._batch_started)
            if self.routed:
                threading.Thread(target=self._report_routes_forever, name="aha-routes", daemon=True).start()
            return manager

        return watched_init

    def _batched_request_finished(self, output: Any) -> None:
        with self._lock:
            routes = self._request_routes.pop(output.request_id, None)
        self.finished(len(output.prompt_ids), len(output.generated_tokens),
                      time.perf_counter() - output.created_time, routes)  # fmt: skip

    def _report_routes_forever(self) -> None:
        while True:
            time.sleep(ROUTES_REPORT_INTERVAL)
            routes = self.take_routes()
            if routes is not None and routes.full_scores:
                _log.info("routes in the last %.0f s: %s", ROUTES_REPORT_INTERVAL, routes.describe())

    @staticmethod
    def finished(prompt_tokens: int, generated_tokens: int, seconds: float, routes: RouteTally | None) -> None:
        """Count one answered request and log its line."""
        REQUESTS.inc()
        PROMPT_TOKENS.inc(prompt_tokens)
        GENERATED_TOKENS.inc(generated_tokens)
        REQUEST_SECONDS.observe(seconds)
        line = (f"request: {prompt_tokens} prompt + {generated_tokens} generated tokens in {seconds:.2f} s "
                f"({generated_tokens / max(seconds, 1e-9):.1f} tokens/s)")  # fmt: skip
        if routes is not None and routes.full_scores:
            line += f"; {routes.describe()}"
        _log.info(line)


class _ServerCollector:
    """The API process's own gauges: requests in flight, whether the model's process runs, and the
    running ratios of the counters."""

    def __init__(self, counters: MultiProcessCollector, in_flight: Callable[[], int], model_up: Callable[[], bool]):
        self.counters = counters
        self.in_flight = in_flight
        self.model_up = model_up

    def collect(self) -> Iterable[Metric]:
        totals: dict[tuple[str, str], float] = {}
        for metric in self.counters.collect():
            for sample in metric.samples:
                if sample.name.endswith("_total"):
                    label = sample.labels.get("route") or sample.labels.get("attention") or ""
                    totals[sample.name, label] = totals.get((sample.name, label), 0.0) + sample.value
        yield GaugeMetricFamily("aha_requests_in_flight", "Requests accepted and not yet answered", value=self.in_flight())
        yield GaugeMetricFamily("aha_model_process_up", "Whether the model's process runs (1) or not (0)",
                                value=float(self.model_up()))  # fmt: skip
        routed_pairs = totals.get(("aha_route_decisions_total", "global"), 0.0)
        all_pairs = routed_pairs + totals.get(("aha_route_decisions_total", "local"), 0.0)
        full = totals.get(("aha_attention_scores_total", "full"), 0.0)
        if all_pairs:
            yield GaugeMetricFamily(
                "aha_global_fraction", "Share of (token, head) pairs routed global, running", value=routed_pairs / all_pairs
            )
        if full:
            computed = totals.get(("aha_attention_scores_total", "routed"), 0.0)
            yield GaugeMetricFamily(
                "aha_attention_compute_ratio", "Attention scores computed / full attention's, running", value=computed / full
            )


def metrics_registry(in_flight: Callable[[], int], model_up: Callable[[], bool]) -> CollectorRegistry:
    """The registry ``/metrics`` serves: every process's counters, plus :class:`_ServerCollector`."""
    registry = CollectorRegistry()
    counters = MultiProcessCollector(registry)
    registry.register(_ServerCollector(counters, in_flight, model_up))
    return registry
