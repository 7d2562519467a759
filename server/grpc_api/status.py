"""Domain errors as gRPC statuses: the code from core/errors.py's one table, and the standard
retry advice for refusals that may succeed later."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from loraplex.core.errors import retry_after, status_code

RETRY_AFTER_KEY = "retry-after-ms"


def status_for(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of a known error; None for anything else (an internal error)."""
    code = status_code(exc)
    return grpc.StatusCode[code] if code is not None else None


def retry_metadata(exc: BaseException) -> list[tuple[str, str | bytes]]:
    """Trailing metadata that tells a client when to retry: gRPC's standard RetryInfo detail
    (google.rpc.RetryInfo in grpc-status-details-bin) and a plain `retry-after-ms`."""
    seconds = retry_after(exc)
    if seconds is None:
        return []
    delay = duration_pb2.Duration()
    delay.FromMilliseconds(max(1, round(seconds * 1000)))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    status = status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=str(exc), details=[detail])
    return [
        (RETRY_AFTER_KEY, str(delay.ToMilliseconds())),
        ("grpc-status-details-bin", status.SerializeToString()),
    ]
