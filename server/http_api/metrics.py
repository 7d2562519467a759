"""Per-request metrics of the HTTP server, the counterpart of gRPC's grpc_server_*: requests
started and handled (by status code) and their duration, labelled by method and route template
(a bounded set: a path that matches no route is counted as "other")."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from loraplex.server.metrics import E2E_BUCKETS

HTTP_LABELS = ("method", "route")
UNMATCHED_ROUTE = "other"
CLIENT_CLOSED = 499  # the client went away before its answer (nginx's code for it)


class HttpMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "http_server_started", "HTTP requests started.", HTTP_LABELS, registry=registry
        )
        self.handled = Counter(
            "http_server_handled",
            "HTTP requests completed, by status code.",
            (*HTTP_LABELS, "code"),
            registry=registry,
        )
        self.seconds = Histogram(
            "http_server_handling_seconds",
            "Time HTTP requests took, to their last byte.",
            HTTP_LABELS,
            buckets=E2E_BUCKETS,
            registry=registry,
        )

    def start(self, method: str, route: str) -> None:
        self.started.labels(method, route).inc()

    def done(self, method: str, route: str, code: int, seconds: float) -> None:
        self.handled.labels(method, route, str(code)).inc()
        self.seconds.labels(method, route).observe(seconds)
