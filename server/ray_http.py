"""The OpenAI-compatible HTTP API of loraplex on Ray Serve, behind Ray's HTTP proxy.

    client --HTTP--> Ray proxy --> Ingress --handle.http(multiplexed_model_id=model)--> Engine
                                   (ASGI)                                               Replica
                                                                                           |
                                                      the plain server's HTTP app, in-process

The ingress serves the plain server's route table (server/http_api's ROUTES, through its
`build_app`), so every call is admitted by the same rule (`authorize`: a valid key for the
client routes, an admin's for load/unload) before anything of it is forwarded, and errors
have the same shape; its endpoints only forward (but /metrics: each replica counts its own,
so none passes for the cluster's). A forwarded call crosses Ray as an `HttpCall` (the caller's
headers, with the ingress's request id, and its body, read once and bounded) to one replica,
whose own HTTP app (the plain server's Endpoints on the replica's runtime) serves it
in-process as uvicorn would, and the answer comes back in parts: its head (status and
headers), its body as the app sends it (a stream's events one by one), then its end.

Routing is the gRPC ingress's: a generation's `model`, when it is an adapter, is the request's
multiplexed model id (the base model's id names none); load/unload route by `lora_name`; what
names no adapter (a composition, the probes and the model list) is routed by Ray's
`serve_multiplexed_model_id` header when the caller gives one, else reaches the replica Ray
picks. Load and unload bump the store generation (server/ray_generation.py) before they are
answered when they may have changed the store: unless the replica refused them (4xx) with its
store unchanged. A client that goes away ends the replica's work: Ray's proxy cancels the
ingress's call, which cancels the replica's, whose app then hears the client leave (as from
uvicorn) and ends its requests at the next engine step.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple, cast

import ray
from prometheus_client import CollectorRegistry
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.applications import Starlette
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from loraplex.core.errors import NotReady
from loraplex.server.http_api.errors import HttpError, error_event
from loraplex.server.http_api.metrics import HttpMetrics
from loraplex.server.http_api.routes import Call, Endpoints, json_body, sse
from loraplex.server.http_api.server import REQUEST_ID_HEADER, build_app
from loraplex.server.ray_generation import Generations
from loraplex.server.runtime.auth import KeyRing
from loraplex.server.runtime.runtime import Runtime

log = logging.getLogger(__name__)

# Ray's header naming the multiplexed model (its proxy also takes it with hyphens).
MULTIPLEXED_HEADERS = ("serve_multiplexed_model_id", "serve-multiplexed-model-id")
STORE_CHANGES = frozenset({"load_lora_adapter", "unload_lora_adapter"})  # Endpoints' names
# Set again for the forwarded body (re-encoded) and request id (the ingress's).
_NOT_FORWARDED = {b"content-length", b"transfer-encoding", REQUEST_ID_HEADER.encode()}
GONE_GRACE_S = 1.0  # how long an app that heard its client leave may take to end by itself
DONE = "data: [DONE]\n\n"
RawHeaders = list[tuple[bytes, bytes]]


class HttpCall(NamedTuple):
    """An HTTP call as it crosses Ray to a replica."""

    endpoint: str  # the Endpoints method its route names (server/http_api/server.py's ROUTES)
    method: str
    path: str
    raw_path: bytes
    root_path: str
    query: bytes
    headers: RawHeaders
    body: bytes


class HttpHead(NamedTuple):
    """The first part of an answer."""

    status: int
    headers: RawHeaders


class HttpEnd(NamedTuple):
    """The last part of an answer."""

    # A store change: the replica's store holds another version (or none) of the adapter
    # since the call began, whatever the answer says (a load may fail after its commit).
    changed: bool = False


HttpPart = HttpHead | bytes | HttpEnd


class ReplicaLost(NotReady):
    """The engine replica serving a call died under it: retryable (Ray starts another)."""

    def __init__(self) -> None:
        super().__init__("engine replica lost; retry the request")


# -- the replica's side ---------------------------------------------------------------------


def replica_app(
    runtime: Callable[[], Runtime], keys: KeyRing | None, registry: CollectorRegistry, created: int
) -> ASGIApp:
    """The plain server's HTTP app on a replica's runtime (`runtime()`: the server's own
    getter, which refuses once the device failed), checking the caller again and applying
    tenancy as the plain server does."""
    return build_app(Endpoints(runtime, created), keys, HttpMetrics(registry))


async def serve_locally(app: ASGIApp, call: HttpCall) -> AsyncIterator[HttpHead | bytes]:
    """`call` served by `app` in this process as uvicorn serves an ASGI 2.4 app: the answer's
    head, then its body as the app sends it. Closing the iteration before the end is the
    client going away (Ray cancels the replica's call when the ingress's client went): the app
    is cancelled, which ends its requests at the next engine step."""
    sent: asyncio.Queue[Message | None] = asyncio.Queue()
    gone = asyncio.Event()
    request: list[Message] = [{"type": "http.request", "body": call.body, "more_body": False}]

    async def receive() -> Message:
        if request:
            return request.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        if gone.is_set():
            raise OSError("the client went away")  # what uvicorn raises then
        sent.put_nowait(message)

    async def run() -> None:
        try:
            await app(_scope(call), receive, send)
        finally:
            sent.put_nowait(None)

    task = asyncio.ensure_future(run())
    started = False
    try:
        while (message := await sent.get()) is not None:
            if message["type"] == "http.response.start":
                started = True
                yield HttpHead(message["status"], list(message.get("headers", ())))
            elif message["type"] == "http.response.body" and message.get("body"):
                yield bytes(message["body"])
        try:
            await task
        except Exception:
            if not started:
                raise  # answered by the ingress as an internal error
            # Starlette raises again what it answered 500 for, for the server to log.
            log.exception("HTTP %s %s failed on this replica", call.method, call.path)
    finally:
        if not task.done():
            # A stream is cancelled at once, where it waits for its next output: that closes
            # its generations. An answer not begun hears http.disconnect first, and sends fail
            # from then on: the endpoints end their requests on it (`until_gone`), and
            # cancelling them instead would leave their requests running.
            gone.set()
            if not started:
                await asyncio.wait({task}, timeout=GONE_GRACE_S)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def _scope(call: HttpCall) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": call.method,
        "scheme": "http",
        "path": call.path,
        "raw_path": call.raw_path,
        "root_path": call.root_path,
        "query_string": call.query,
        "headers": call.headers,
        "client": None,
        "server": None,
        "state": {},
    }


# -- the ingress's side ---------------------------------------------------------------------


class HttpIngress:
    """The ingress's endpoints, one per route of ROUTES: each forwards its call to a replica
    (the caller is admitted before, by `build_app`'s `_serve`)."""

    def __init__(
        self, replica: DeploymentHandle, generations: Generations, base_model_id: str
    ) -> None:
        self.replica = replica
        self.generations = generations
        self.base_model_id = base_model_id

    async def health(self, call: Call) -> Response:
        return await self._forward(call, "health")

    async def ready(self, call: Call) -> Response:
        return await self._forward(call, "ready")

    async def metrics(self, call: Call) -> Response:
        """Not forwarded: one replica's counts would pass for the cluster's."""
        raise HttpError(
            "NOT_FOUND",
            "no /metrics on Ray Serve: each engine replica counts its own (Ray's metrics are "
            "on Ray's metrics port)",
        )

    async def models(self, call: Call) -> Response:
        return await self._forward(call, "models")

    async def model(self, call: Call) -> Response:
        return await self._forward(call, "model")

    async def chat(self, call: Call) -> Response:
        return await self._generate(call, "chat")

    async def completions(self, call: Call) -> Response:
        return await self._generate(call, "completions")

    async def load_lora_adapter(self, call: Call) -> Response:
        body = await json_body(call.request)
        return await self._forward(call, "load_lora_adapter", body, _text(body, "lora_name"))

    async def unload_lora_adapter(self, call: Call) -> Response:
        body = await json_body(call.request)
        return await self._forward(call, "unload_lora_adapter", body, _text(body, "lora_name"))

    async def _generate(self, call: Call, endpoint: str) -> Response:
        body = await json_body(call.request)
        model = _text(body, "model")
        # The replica answers a body it does not take (no model, an adapter with `compose`).
        return await self._forward(
            call, endpoint, body, "" if model == self.base_model_id else model
        )

    async def _forward(
        self, call: Call, endpoint: str, body: dict[str, Any] | None = None, adapter_id: str = ""
    ) -> Response:
        """The replica's answer to the call, whole, or relayed as it comes for a stream."""
        forwarded = _http_call(call, endpoint, body)
        routed = adapter_id or _multiplexed_header(call)
        handle = self.replica.options(multiplexed_model_id=routed, stream=True)
        generation = await self.generations.current()
        parts = cast(DeploymentResponseGenerator, handle.http.remote(forwarded, generation))
        head: HttpHead | None = None
        end: HttpEnd | None = None  # None: the answer did not come whole
        relayed = False
        try:
            head = _head(await anext(parts))
            if _is_event_stream(head):
                relayed = True  # the relay owns `parts` from here
                return _answered(StreamingResponse(_relay(parts, call.request_id)), head)
            chunks = []
            async for part in parts:
                if isinstance(part, HttpEnd):
                    end = part
                    break
                chunks.append(cast(bytes, part))
            return _answered(Response(b"".join(chunks)), head)
        except ray.exceptions.RayActorError as exc:
            log.warning("engine replica lost with a request in flight: %s", exc)
            raise ReplicaLost() from exc
        finally:
            if end is None and not relayed:
                parts.cancel()  # the caller went, or the replica failed: its work ends too
            # A change may have reached the store even when its answer did not reach us; one
            # the replica refused with its store unchanged did not.
            if endpoint in STORE_CHANGES and (
                head is None or end is None or end.changed or not 400 <= head.status < 500
            ):
                await asyncio.shield(self.generations.bump())


def ingress_app(
    http: HttpIngress | None, keys: KeyRing | None, reload_keys: Callable[[], None]
) -> ASGIApp:
    """The ingress's ASGI app, to which Ray's HTTP proxy hands every HTTP call: the plain
    server's routes on `http`'s forwarding endpoints, under the ingress's keys (read again
    when due, before each call). With no `http` (--no-http) it has no route."""
    # Ray's proxy counts the ingress's HTTP calls (its own metrics); these are not exported.
    app = build_app(http, keys, HttpMetrics(CollectorRegistry())) if http else Starlette()

    async def serve(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            reload_keys()
            send = _one_request_id(scope, send)
        await app(scope, receive, send)

    return serve


def _one_request_id(scope: Scope, send: Send) -> Send:
    """Ray's proxy adds the call's x-request-id to every answer (one it made up if the client
    gave none): the app's own is dropped when it is the same, so it is not there twice."""
    given = Headers(scope=scope).get(REQUEST_ID_HEADER)

    async def sending(message: Message) -> None:
        if message["type"] == "http.response.start" and given is not None:
            headers = MutableHeaders(scope=message)
            if headers.get(REQUEST_ID_HEADER) == given:
                del headers[REQUEST_ID_HEADER]
        await send(message)

    return sending


def _http_call(call: Call, endpoint: str, body: dict[str, Any] | None) -> HttpCall:
    scope = call.request.scope
    payload = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
    headers = [(k, v) for k, v in call.request.headers.raw if k not in _NOT_FORWARDED]
    headers.append((REQUEST_ID_HEADER.encode(), call.request_id.encode()))  # one id for both
    if body is not None:
        headers.append((b"content-length", str(len(payload)).encode()))
    return HttpCall(
        endpoint=endpoint,
        method=scope["method"],
        path=scope["path"],
        raw_path=scope.get("raw_path") or scope["path"].encode(),
        root_path=scope.get("root_path", ""),
        query=scope.get("query_string", b""),
        headers=headers,
        body=payload,
    )


def _text(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    return value if isinstance(value, str) else ""


def _multiplexed_header(call: Call) -> str:
    headers = call.request.headers
    return next((headers[h] for h in MULTIPLEXED_HEADERS if h in headers), "")


def _head(part: object) -> HttpHead:
    if not isinstance(part, HttpHead):
        raise RuntimeError(f"a replica's answer began with {type(part).__name__}, not its head")
    return part


def _is_event_stream(head: HttpHead) -> bool:
    content_type = dict(head.headers).get(b"content-type", b"")
    return content_type.startswith(b"text/event-stream")


def _answered(response: Response, head: HttpHead) -> Response:
    """`response` with the replica's status and headers (its length, type, request id and
    retry advice: what the plain server would send)."""
    response.status_code = head.status
    response.raw_headers = list(head.headers)
    return response


async def _relay(parts: DeploymentResponseGenerator, request_id: str) -> AsyncIterator[bytes]:
    """A stream's events as the replica sends them. A stream that fails after it started ends
    with an error event and `data: [DONE]`, as the plain server's does."""
    ended = False
    try:
        async for part in parts:
            if isinstance(part, HttpEnd):
                ended = True
                break
            yield cast(bytes, part)
    except Exception as exc:
        ended = True
        error: Exception = exc
        if isinstance(exc, ray.exceptions.RayActorError):
            log.warning("engine replica lost with a stream in flight: %s", exc)
            error = ReplicaLost()
        yield sse(error_event(error, request_id)).encode()
        yield DONE.encode()
    finally:
        if not ended:
            parts.cancel()  # the client went: the replica's generation ends too
