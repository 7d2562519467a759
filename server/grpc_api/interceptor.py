"""What every RPC goes through before its servicer runs: authentication and decoding.

With an API key file, every method needs a valid key except health (Check, List, Watch) and
server reflection, listed one by one in EXEMPT_METHODS. What a client key may call is an
explicit list, CLIENT_METHODS; every other method, a new RPC included, needs an admin key
until it is listed there: never exempt, never open to clients, by omission. The caller's
principal reaches the servicer in the PRINCIPAL context variable.

The methods that need no key are open to anyone who reaches the port, so their streams (health
Watch, reflection) are capped: beyond `max_keyless_streams` open at once a new one is
RESOURCE_EXHAUSTED.

Requests are decoded here rather than by gRPC, so that a message that does not parse (e.g. a
string field holding invalid UTF-8) is INVALID_ARGUMENT instead of an internal error.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError

from loraplex.core.errors import InvalidRequest, PermissionDenied
from loraplex.server.runtime.auth import KeyRing, Principal, Unauthenticated
from loraplex.server.runtime.telemetry import request_id
from loraplex.v1 import adapters_pb2, inference_pb2

# Need no key: orchestrators probe health without one, and reflection describes the API. Full
# method paths, not prefixes: a method added to these services later needs a key like any
# other (an admin key, until it is listed here or in CLIENT_METHODS).
EXEMPT_METHODS = frozenset(
    {
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/List",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    }
)
EXEMPT_PREFIXES = tuple(sorted(EXEMPT_METHODS))  # for str.startswith; EXEMPT_METHODS decides
# What a client key may call: generate, describe the model, see the adapters it may use.
CLIENT_METHODS = frozenset(
    {
        "/loraplex.v1.Inference/Generate",
        "/loraplex.v1.Inference/GenerateStream",
        "/loraplex.v1.Inference/ModelInfo",
        "/loraplex.v1.Adapters/GetAdapter",
        "/loraplex.v1.Adapters/ListAdapters",
    }
)
# The loraplex methods only an admin key may call: all the others (for tests and docs; the
# rule is "not in CLIENT_METHODS", which also covers methods of no loraplex service).
ADMIN_METHODS = (
    frozenset(
        f"/{service.full_name}/{method.name}"
        for module in (inference_pb2, adapters_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    )
    - CLIENT_METHODS
)
DEFAULT_MAX_KEYLESS_STREAMS = 64


REQUEST_ID_KEY = "x-request-id"
# Who is calling; None when authentication is off.
PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "principal", default=None
)
Decode = Callable[[bytes], Any]


class CallInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, keys: KeyRing | None, max_keyless_streams: int = DEFAULT_MAX_KEYLESS_STREAMS
    ) -> None:
        self.keys = keys  # None: no authentication
        self.keyless_streams = StreamGate(max_keyless_streams)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None:
            return handler
        if method in EXEMPT_METHODS:
            return gated(handler, self.keyless_streams) if handler.response_streaming else handler
        metadata = details.invocation_metadata  # type: ignore[attr-defined]
        outcome = admit(self.keys, method, metadata)
        if isinstance(outcome, Refusal):
            return refusing(handler, outcome.code, outcome.message, request_id_of(metadata))
        return bound(handler, outcome)


class Refusal(NamedTuple):
    code: grpc.StatusCode
    message: str


def admit(
    keys: KeyRing | None, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
) -> Principal | Refusal | None:
    """The rule every front end applies to a call of `method` (a full path) before anything
    else sees it: this interceptor, and the Ray Serve ingress (server/ray_serve.py). None when
    the call needs no key (no key file, or a health check or reflection); else the caller, or
    why it may not call."""
    if keys is None or method in EXEMPT_METHODS:
        return None
    return authorize(keys, method, metadata)


def authorize(
    keys: KeyRing, method: str, metadata: Sequence[tuple[str, str | bytes]] | None
) -> Principal | Refusal:
    """The caller of `method` (a full path), or why it may not call it: a client key may call
    CLIENT_METHODS, an admin key any method."""
    authorization = dict(metadata or ()).get("authorization")
    try:
        return keys.caller(authorization, method not in CLIENT_METHODS, method)  # type: ignore[arg-type]
    except Unauthenticated as exc:
        return Refusal(grpc.StatusCode.UNAUTHENTICATED, str(exc))
    except PermissionDenied as exc:
        return Refusal(grpc.StatusCode.PERMISSION_DENIED, str(exc))


class StreamGate:
    """At most `limit` streams open at once (on one event loop: no lock)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open = 0

    def enter(self) -> bool:
        if self.open >= self.limit:
            return False
        self.open += 1
        return True

    def leave(self) -> None:
        self.open -= 1


def gated(handler: grpc.RpcMethodHandler, gate: StreamGate) -> grpc.RpcMethodHandler:
    """`handler` (one that answers a stream), refusing a call with RESOURCE_EXHAUSTED while
    `gate` has as many streams open as it allows."""
    inner = behaviour(handler)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if not gate.enter():
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{gate.limit} streams that need no API key are open (health Watch, "
                "reflection): retry later",
            )
        try:
            async for response in responses_of(inner, request, context):
                yield response
        finally:
            gate.leave()

    return same_kind(handler, streaming, streaming, handler.request_deserializer)


def request_id_of(metadata: Sequence[tuple[str, str | bytes]] | None) -> str:
    """The client's x-request-id when it is a sensible one, else a new id."""
    return request_id(dict(metadata or ()).get(REQUEST_ID_KEY))


def bound(handler: grpc.RpcMethodHandler, principal: Principal | None) -> grpc.RpcMethodHandler:
    """`handler`, receiving raw bytes that it decodes itself, with PRINCIPAL set."""
    decode: Decode = handler.request_deserializer or (lambda raw: raw)
    inner = behaviour(handler)

    async def read(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if handler.request_streaming:
            return _decoded(decode, request)
        return await _decode_or_abort(decode, request, context)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        PRINCIPAL.set(principal)
        return await inner(await read(request, context), context)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        PRINCIPAL.set(principal)
        async for response in inner(await read(request, context), context):
            yield response

    return same_kind(handler, unary, streaming, request_deserializer=None)


def behaviour(handler: grpc.RpcMethodHandler) -> Callable[..., Any]:
    """The function that serves a handler's calls, whatever its kind."""
    return (
        handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    )


async def responses_of(
    inner: Callable[..., Any], request: Any, context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    """The responses of a streaming handler's call, whether it yields them or writes them
    with context.write (then there are none to relay)."""
    responses = inner(request, context)
    if inspect.isawaitable(responses):
        await responses
        return
    async for response in responses:
        yield response


def same_kind(
    handler: grpc.RpcMethodHandler,
    unary: Callable[..., Any],
    streaming: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None,
) -> grpc.RpcMethodHandler:
    """A handler of `handler`'s kind (request and response streaming alike) served by `unary`
    when it answers one message, by `streaming` when it answers a stream."""
    serializers = {
        "request_deserializer": request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **serializers)
    return grpc.stream_stream_rpc_method_handler(streaming, **serializers)


def _decode(decode: Decode, raw: bytes) -> Any:
    try:
        return decode(raw)
    except DecodeError:
        raise InvalidRequest(
            "request", "the message does not parse (string fields must be valid UTF-8)"
        ) from None


async def _decode_or_abort(decode: Decode, raw: bytes, context: grpc.aio.ServicerContext) -> Any:
    try:
        return _decode(decode, raw)
    except InvalidRequest as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


async def _decoded(decode: Decode, raws: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    """The messages of a client stream; one that does not parse raises InvalidRequest where
    the servicer reads it (and its error mapping makes it INVALID_ARGUMENT)."""
    async for raw in raws:
        yield _decode(decode, raw)


def refusing(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str, request_id: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `code`."""
    trailing = ((REQUEST_ID_KEY, request_id),)

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message, trailing_metadata=trailing)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message, trailing_metadata=trailing)
        yield  # makes this an async generator, as a streaming handler must be

    # The request is never read: not decoding it spares an error about it.
    return same_kind(handler, unary, streaming, request_deserializer=None)
