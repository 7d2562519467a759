"""The HTTP front end's server: Starlette on uvicorn, on the event loop gRPC serves from (one
process, one engine), on the same host, key file and TLS as gRPC.

Every call goes through `_serve` first: its request id (the client's x-request-id when sensible,
sent back on every response), its key, checked against the route table's access before
anything else reads the request, and its metrics. What a client key may call is listed route
by route (CLIENT); a route added without an access level needs an admin key.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import math
import ssl
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from loraplex.server.config import ServerConfig
from loraplex.server.http_api.errors import ErrorAnswer, HttpError, error_response, response_for
from loraplex.server.http_api.metrics import CLIENT_CLOSED, UNMATCHED_ROUTE, HttpMetrics
from loraplex.server.http_api.routes import Call, ClientGone, Endpoints, RuntimeGetter
from loraplex.server.logs import REQUEST_ID
from loraplex.server.runtime.auth import KeyRing, Principal, Unauthenticated
from loraplex.server.runtime.telemetry import request_id as new_request_id

REQUEST_ID_HEADER = "x-request-id"


class Access(enum.Enum):
    OPEN = "open"  # no key: probes
    CLIENT = "client"  # any valid key
    ADMIN = "admin"  # an admin key


@dataclass(frozen=True)
class HttpRoute:
    path: str
    method: str
    endpoint: str  # the Endpoints method that serves it
    access: Access = Access.ADMIN


ROUTES = (
    HttpRoute("/health", "GET", "health", Access.OPEN),
    HttpRoute("/ready", "GET", "ready", Access.OPEN),
    HttpRoute("/metrics", "GET", "metrics", Access.OPEN),  # as open as --metrics-port
    HttpRoute("/v1/models", "GET", "models", Access.CLIENT),
    HttpRoute("/v1/models/{model_id:path}", "GET", "model", Access.CLIENT),
    HttpRoute("/v1/chat/completions", "POST", "chat", Access.CLIENT),
    HttpRoute("/v1/completions", "POST", "completions", Access.CLIENT),
    HttpRoute("/v1/load_lora_adapter", "POST", "load_lora_adapter"),
    HttpRoute("/v1/unload_lora_adapter", "POST", "unload_lora_adapter"),
)


def authorize(
    keys: KeyRing | None, route: HttpRoute, authorization: str | None
) -> Principal | None:
    """The caller, by the rule gRPC's interceptor applies: no key needed without a key file or
    on an open route; a client key for CLIENT routes; an admin key for the rest."""
    if keys is None or route.access is Access.OPEN:
        return None
    admin_only = route.access is Access.ADMIN
    try:  # a client key on an admin route: PermissionDenied, a 403
        return keys.caller(authorization, admin_only, f"{route.method} {route.path}")
    except Unauthenticated as exc:
        raise HttpError("UNAUTHENTICATED", str(exc)) from None


def build_app(endpoints: object, keys: KeyRing | None, metrics: HttpMetrics) -> Starlette:
    """The routes of ROUTES, each served by the `endpoints` method it names (an Endpoints on a
    runtime, or the Ray ingress's, which forward: server/ray_http.py) once `_serve` admitted
    the caller."""

    def serving(route: HttpRoute) -> Callable[[Request], Awaitable[Response]]:
        serve = getattr(endpoints, route.endpoint)

        async def endpoint(request: Request) -> Response:
            return await _serve(request, route, serve, keys, metrics)

        return endpoint

    async def unrouted(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        request_id = new_request_id(request.headers.get(REQUEST_ID_HEADER))
        metrics.start(request.method, UNMATCHED_ROUTE)
        metrics.done(request.method, UNMATCHED_ROUTE, exc.status_code, 0.0)
        code = "NOT_FOUND" if exc.status_code == 404 else "INVALID_ARGUMENT"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        response = error_response(ErrorAnswer(code, message), request_id)
        response.status_code = exc.status_code
        return response

    routes = [Route(r.path, serving(r), methods=[r.method]) for r in ROUTES]
    return Starlette(routes=routes, exception_handlers={404: unrouted, 405: unrouted})


async def _serve(
    request: Request,
    route: HttpRoute,
    serve: Callable[[Call], Awaitable[Response]],
    keys: KeyRing | None,
    metrics: HttpMetrics,
) -> Response:
    request_id = new_request_id(request.headers.get(REQUEST_ID_HEADER))
    REQUEST_ID.set(request_id)
    metrics.start(route.method, route.path)
    start = time.perf_counter()
    try:
        principal = authorize(keys, route, request.headers.get("authorization"))
        response = await serve(Call(request, request_id, principal))
    except (ClientGone, ClientDisconnect):  # gone before its answer: nobody to send it to
        metrics.done(route.method, route.path, CLIENT_CLOSED, time.perf_counter() - start)
        return Response(status_code=CLIENT_CLOSED)
    except Exception as exc:
        response = response_for(exc, request_id)
        if isinstance(exc, HttpError) and exc.code == "UNAUTHENTICATED":
            response.headers["www-authenticate"] = "Bearer"
    response.headers[REQUEST_ID_HEADER] = request_id
    if isinstance(response, StreamingResponse):  # counted when its last event is sent
        response.body_iterator = _counted(
            response.body_iterator,
            lambda: metrics.done(
                route.method, route.path, response.status_code, time.perf_counter() - start
            ),
        )
    else:
        metrics.done(route.method, route.path, response.status_code, time.perf_counter() - start)
    return response


async def _counted(body: AsyncIterable[Any], done: Callable[[], None]) -> AsyncIterator[Any]:
    try:
        async for chunk in body:
            yield chunk
    finally:
        done()


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the process's own handle SIGTERM (a drain shared
    with gRPC) and SIGHUP."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class HttpServer:
    def __init__(
        self,
        config: ServerConfig,
        runtime: RuntimeGetter,
        keys: KeyRing | None,
        registry: CollectorRegistry,
    ) -> None:
        assert config.http_port is not None
        self.config = config
        self.port: int | None = None
        # /metrics here too, as vLLM serves it, when there are no API keys: with tenants it
        # stays on --metrics-port alone, bound where only operators reach it.
        exposition = None
        if config.metrics_port is not None and keys is None:
            exposition = functools.partial(generate_latest, registry)
        endpoints = Endpoints(runtime, int(time.time()), exposition)
        app = build_app(endpoints, keys, HttpMetrics(registry))
        ca = config.tls_client_ca
        self._uvicorn = _Uvicorn(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.http_port,
                loop="none",  # the running loop, shared with gRPC
                http="httptools",
                lifespan="off",
                log_config=None,
                access_log=False,
                server_header=False,
                ssl_certfile=config.tls_cert,
                ssl_keyfile=config.tls_key,
                ssl_ca_certs=ca,
                ssl_cert_reqs=ssl.CERT_REQUIRED if ca is not None else ssl.CERT_NONE,
            )
        )
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Bind and serve; returns the port."""
        config = self._uvicorn.config
        config.load()  # TLS context, the app's wrappers
        sock = config.bind_socket()
        self.port = sock.getsockname()[1]
        self._task = asyncio.create_task(self._uvicorn.serve(sockets=[sock]))
        while not self._uvicorn.started:
            if self._task.done():
                self._task.result()  # raises why it did not start
                raise OSError(f"the HTTP server on port {self.port} did not start")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self, grace: float) -> None:
        """Refuse new connections; requests in flight get `grace` seconds to finish."""
        if self._task is None:
            return
        self._uvicorn.config.timeout_graceful_shutdown = max(1, math.ceil(grace))
        self._uvicorn.should_exit = True
        await self._task
