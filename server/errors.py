"""Domain errors of the server, and the one table that maps every error to a gRPC status."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from loraplex.adapters.errors import (
    AdapterNotFound,
    AdapterSourceDenied,
    InvalidAdapter,
    InvalidAdapterId,
    StoreConflict,
)

RETRY_AFTER_KEY = "retry-after-ms"


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
    (StoreConflict, grpc.StatusCode.ABORTED),
    (PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (Exhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TooLong, grpc.StatusCode.DEADLINE_EXCEEDED),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
)


def retry_metadata(exc: BaseException) -> list[tuple[str, str | bytes]]:
    """Trailing metadata that tells a client when to retry: gRPC's standard RetryInfo detail
    (google.rpc.RetryInfo in grpc-status-details-bin) and a plain `retry-after-ms`."""
    if not isinstance(exc, Exhausted):
        return []
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(1, round(exc.retry_after_s * 1000)))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=str(exc), details=[detail])
    return [
        (RETRY_AFTER_KEY, str(delay.ToMilliseconds())),
        ("grpc-status-details-bin", status.SerializeToString()),
    ]


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a known error; None for anything else (an internal error)."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code
    return None
