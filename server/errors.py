"""Domain errors of the server, and the one table that maps every error to a gRPC status."""

from __future__ import annotations

import grpc

from loraplex.adapters.errors import (
    AdapterNotFound,
    AdapterSourceDenied,
    InvalidAdapter,
    InvalidAdapterId,
)


class LoraplexError(Exception):
    """Base class of errors a client can act on."""


class InvalidRequest(LoraplexError):
    """A request field is out of range or malformed; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class Exhausted(LoraplexError):
    """A bound was reached (the queue, a tenant's quota): the client should retry later."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(f"{message}; retry in {retry_after_s:.3g} s")
        self.retry_after_s = retry_after_s


class QueueFull(Exhausted):
    """The engine's waiting queue is full."""


class OverQuota(Exhausted):
    """A tenant is over one of its limits (requests in flight, tokens per minute)."""


class PermissionDenied(LoraplexError):
    """The caller may not use what it named (another tenant's adapter, or none it can see)."""


class TooLong(LoraplexError):
    """A request ran past the server's maximum time per request."""


class NotReady(LoraplexError):
    """The model is still loading, or the server is shutting down."""


_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (InvalidRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidAdapterId, grpc.StatusCode.INVALID_ARGUMENT),
    (InvalidAdapter, grpc.StatusCode.INVALID_ARGUMENT),
    (AdapterNotFound, grpc.StatusCode.NOT_FOUND),
    (AdapterSourceDenied, grpc.StatusCode.PERMISSION_DENIED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooLong, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
)


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a known error; None for anything else (an internal error)."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return None
