"""Prometheus metrics (one registry per app, so several apps can live in one process, e.g. in tests).

Exposed at ``GET /metrics``. Names:

* ``dpserve_requests_total{route, method, status}`` and ``dpserve_request_duration_seconds{route}``
  (histogram) -- every HTTP request, by route template (``unmatched`` for unknown paths);
* ``dpserve_batch_frames{model}``, ``dpserve_batch_atoms{model}`` (histograms) -- size of each model call,
  i.e. of each cross-request batch; ``dpserve_batch_requests{model}`` -- requests packed into it;
* ``dpserve_model_call_seconds{model}`` (histogram), ``dpserve_atoms_total{model}`` (rate() of it is atoms per
  second), ``dpserve_atoms_per_second{model}`` -- the last call's throughput;
* ``dpserve_queue_depth{model}`` -- requests waiting for a model call; ``dpserve_dropped_neighbours_total{model}``;
* ``dpserve_shed_total{model, reason}`` -- requests refused with 503 before any work (``queue_full``,
  ``shutting_down``; ``pending_requests``, ``pending_bytes`` with model ``none``: the server-wide pending
  bounds, checked before the body is read); ``dpserve_timeouts_total{model}`` -- requests answered 504;
* ``dpserve_models_loaded``, ``dpserve_models_refused``, ``dpserve_reloads_total{result}``.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics", "MetricsMiddleware"]

_LATENCY = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30, 60)
_FRAMES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096, 16384)
_ATOMS = (8, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("dpserve_requests", "HTTP requests by route, method and status code",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("dpserve_request_duration_seconds", "HTTP request latency, seconds", ["route"],
                                 buckets=_LATENCY, registry=r)
        self.batch_frames = Histogram("dpserve_batch_frames", "frames per model call (cross-request batch)",
                                      ["model"], buckets=_FRAMES, registry=r)
        self.batch_atoms = Histogram("dpserve_batch_atoms", "atoms per model call (cross-request batch)", ["model"],
                                     buckets=_ATOMS, registry=r)
        self.batch_requests = Histogram("dpserve_batch_requests", "requests packed into one model call", ["model"],
                                        buckets=_FRAMES, registry=r)
        self.model_seconds = Histogram("dpserve_model_call_seconds", "wall time of one model call, seconds",
                                       ["model"], buckets=_LATENCY, registry=r)
        self.model_calls = Counter("dpserve_model_calls", "model calls by where they ran: 'process' (the model's "
                                   "child process) or 'thread' (the server process's worker thread)",
                                   ["model", "where"], registry=r)
        self.atoms = Counter("dpserve_atoms", "atoms evaluated (rate() gives atoms per second)", ["model"], registry=r)
        self.atoms_per_second = Gauge("dpserve_atoms_per_second", "atoms per second of the last model call",
                                      ["model"], registry=r)
        self.queue_depth = Gauge("dpserve_queue_depth", "requests waiting for a model call", ["model"], registry=r)
        self.dropped = Counter("dpserve_dropped_neighbours", "neighbours beyond the model's sel, ignored",
                               ["model"], registry=r)
        self.models_loaded = Gauge("dpserve_models_loaded", "models loaded", registry=r)
        self.models_refused = Gauge("dpserve_models_refused", "model directories (and ensembles) refused by the "
                                    "last load", registry=r)
        self.shed = Counter("dpserve_shed", "requests shed with 503 before any work (queue full, shutting down, "
                            "pending bounds)", ["model", "reason"], registry=r)
        self.timeouts = Counter("dpserve_timeouts", "requests answered 504 (request_timeout_s exceeded)", ["model"],
                                registry=r)
        self.reloads = Counter("dpserve_reloads", "model store reloads (admin endpoint or SIGHUP)", ["result"],
                               registry=r)


class MetricsMiddleware:
    """Pure ASGI middleware (cheaper than BaseHTTPMiddleware): counts requests and times them."""

    def __init__(self, app, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics
        # the labelled children per (route, method, status): prometheus_client's .labels() costs a lock and a
        # tuple build per call (py-spy: 4% of the event loop under many small requests). The label values
        # are a bounded set (routes, "unmatched"), as they already are inside prometheus_client.
        self._children: dict[tuple[str, str, str], tuple] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", None)
            if route is None:  # plain Starlette routes (/docs, /openapi.json) set no "route"; 404s stay one label
                route = scope.get("path", "") if status != 404 else "unmatched"
            key = (route, scope.get("method", ""), str(status))
            children = self._children.get(key)
            if children is None:
                children = self._children[key] = (self.metrics.requests.labels(*key), self.metrics.latency.labels(route))
            children[0].inc()
            children[1].observe(time.perf_counter() - start)
