"""``GET /metrics``: Prometheus text (``prometheus_client``, one registry per app).

What is counted: requests by route and status, their latency, time to first token for streams,
the queue depth and running rows of each model, the sizes and compute times of the batches it ran,
and the tokens it read and wrote. Routes are labelled by their template (never by the raw path, so a scan of
random URLs cannot grow the label set).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.responses import Response
from starlette.routing import Match

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("qkv_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("qkv_request_seconds", "Time from request to the end of the response",
                                 ["route"], buckets=_LATENCY, registry=r)
        self.first_token = Histogram("qkv_time_to_first_token_seconds", "Generation: submission to first token",
                                     ["model"], buckets=_LATENCY, registry=r)
        self.queue = Gauge("qkv_queue_depth", "Requests (generation) or inputs (encoders) waiting", ["model"],
                           registry=r)
        self.running = Gauge("qkv_running", "Rows decoding in the running batch", ["model"], registry=r)
        self.batch = Histogram("qkv_batch_size", "Inputs per encoder call, rows per decoding step", ["model"],
                               buckets=_SIZES, registry=r)
        self.batch_time = Histogram("qkv_batch_seconds", "Compute time of each encoder / classifier call",
                                    ["model"], buckets=_LATENCY, registry=r)
        self.answered_total = 0  # requests answered, read by the memory trimmer
        self.tokens = Counter("qkv_tokens", "Tokens read (input) and generated (output)", ["model", "kind"],
                              registry=r)

    def answered(self) -> int:
        return self.answered_total

    def watch(self, name: str, pending, running=None) -> None:
        """Report a model's queue depth (and running rows) from callables read at every scrape."""
        self.queue.labels(name).set_function(pending)
        if running is not None:
            self.running.labels(name).set_function(running)

    def batch_observer(self, name: str):
        """A `Batcher` ``on_batch`` callback recording a model's batch sizes and compute times."""
        size, busy = self.batch.labels(name), self.batch_time.labels(name)

        def observe(items: int, tokens: int, seconds: float) -> None:
            size.observe(items)
            busy.observe(seconds)
        return observe

    def render(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


class Middleware:
    """Pure ASGI: counts each HTTP request by route template and status, and times it to the last byte."""

    def __init__(self, app, metrics: Metrics, routes):
        self.app, self.metrics, self.routes = app, metrics, routes

    def _route(self, scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return route.path
        return "other"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route, start, status = self._route(scope), time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.answered_total += 1
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)
