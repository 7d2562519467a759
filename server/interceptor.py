"""Authentication of every RPC, before any servicer runs.

Every method needs a valid API key except health checks and server reflection; the methods
that manage adapters or read the server's cache need an admin key. A method not listed here
is a client method: a new RPC is authenticated by default, never exempt by omission.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from loraplex.server.auth import KeyRing, Unauthenticated

EXEMPT_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
ADMIN_METHODS = frozenset(
    f"/loraplex.v1.Adapters/{name}"
    for name in (
        "RegisterAdapter",
        "PushAdapter",
        "DeleteAdapter",
        "PinAdapter",
        "UnpinAdapter",
        "GetCacheStats",
    )
)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: KeyRing) -> None:
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method  # type: ignore[attr-defined]
        if handler is None or method.startswith(EXEMPT_PREFIXES):
            return handler
        metadata = dict(details.invocation_metadata or ())  # type: ignore[attr-defined]
        try:
            principal = self.keys.authenticate(metadata.get("authorization"))
        except Unauthenticated as exc:
            return refusing(handler, grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if method in ADMIN_METHODS and not principal.is_admin:
            return refusing(
                handler, grpc.StatusCode.PERMISSION_DENIED, f"{method} needs an admin key"
            )
        return handler


def refusing(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that ends the call with `code`."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        await context.abort(code, message)
        yield  # makes this an async generator, as a streaming handler must be

    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **serializers)
    return grpc.stream_stream_rpc_method_handler(streaming, **serializers)
