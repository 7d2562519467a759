"""Per-RPC metrics in go-grpc-prometheus's names: grpc_server_started_total,
grpc_server_handled_total{grpc_code} and grpc_server_handling_seconds, for every RPC (refused
ones included: this interceptor runs first)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram

from loraplex.server.grpc_api.interceptor import behaviour, responses_of, same_kind
from loraplex.server.metrics import E2E_BUCKETS

GRPC_LABELS = ("grpc_type", "grpc_service", "grpc_method")


class GrpcMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", GRPC_LABELS, registry=registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*GRPC_LABELS, "grpc_code"),
            registry=registry,
        )
        self.seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time RPCs took on the server, to their completion.",
            GRPC_LABELS,
            buckets=E2E_BUCKETS,
            registry=registry,
        )


class GrpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, registry: CollectorRegistry) -> None:
        self.metrics = GrpcMetrics(registry)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method: str = details.method  # type: ignore[attr-defined]
        service, _, name = method.lstrip("/").rpartition("/")
        return timed(handler, self.metrics, service, name)


def timed(
    handler: grpc.RpcMethodHandler, metrics: GrpcMetrics, service: str, name: str
) -> grpc.RpcMethodHandler:
    kind = (
        "bidi_stream"
        if handler.request_streaming and handler.response_streaming
        else "client_stream"
        if handler.request_streaming
        else "server_stream"
        if handler.response_streaming
        else "unary"
    )
    labels = (kind, service, name)

    def done(context: grpc.aio.ServicerContext, start: float, failed: BaseException | None) -> None:
        code = context.code()
        if code is None:  # not set by an abort: OK, or how the call failed
            code = grpc.StatusCode.OK if failed is None else _failure_code(failed)
        if isinstance(code, int):  # grpc.aio may hand back the raw integer
            code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
        metrics.handled.labels(*labels, code.name).inc()
        metrics.seconds.labels(*labels).observe(time.perf_counter() - start)

    inner = behaviour(handler)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        metrics.started.labels(*labels).inc()
        start, failed = time.perf_counter(), None
        try:
            return await inner(request, context)
        except BaseException as exc:
            failed = exc
            raise
        finally:
            done(context, start, failed)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        metrics.started.labels(*labels).inc()
        start, failed = time.perf_counter(), None
        try:
            async for response in responses_of(inner, request, context):
                yield response
        except BaseException as exc:
            failed = exc
            raise
        finally:
            done(context, start, failed)

    return same_kind(handler, unary, streaming, handler.request_deserializer)


def _failure_code(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
