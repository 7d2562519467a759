"""The domain errors, and the one table that gives each its canonical status code.

Everything a client can act on is a `LoraplexError`; the front ends turn the code of
`status_code(exc)` into their protocol's (a gRPC status, an HTTP status), and anything else
into an internal error that says no more than the request id. The codes are gRPC's canonical
names, which Google's HTTP mapping also starts from.
"""

from __future__ import annotations

SHOWN_CHARS = 80  # of a value a client or a file gave, echoed in an error or a log line


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """`repr(value)`, cut to about `limit` characters: what a request, a file or a URL gave
    is echoed in error details and logs only this long, whatever its size."""
    if isinstance(value, str | bytes) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} long)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


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


class Unmeetable(Exhausted):
    """The request cannot finish before its client's deadline at the pace the server runs now
    (refused before it runs, or taken out of the queue while it still can be told so)."""


class DeviceOutOfMemory(Exhausted):
    """The device ran out of memory in a step: that step's requests end with it, and the
    server goes on with the next ones."""


class OverMemoryBudget(LoraplexError):
    """Dense copies (a merged adapter's layers) would pass the memory budget they share with
    the base's own copies (--dense-cache-mb): the adapter is served unmerged."""


class OverQuota(Exhausted):
    """A tenant is over one of its limits (requests in flight, tokens per minute)."""


class PermissionDenied(LoraplexError):
    """The caller may not use what it named (another tenant's adapter, or none it can see)."""


class TooLong(LoraplexError):
    """A request ran past the server's maximum time per request."""


class NotReady(LoraplexError):
    """The model is still loading, or the server is shutting down."""


class Unrecoverable(NotReady):
    """The model failed to load, or the device failed (a CUDA error that sticks): the server
    will not serve until it is restarted."""


class AdapterError(LoraplexError):
    """Base class for adapter problems a client can act on."""


class AdapterNotFound(AdapterError):
    """No adapter (or version) is registered under that id."""


class InvalidAdapter(AdapterError):
    """The adapter files are malformed or do not fit the base model."""


class InvalidAdapterId(AdapterError):
    """The adapter id is not an identifier (ids are never paths)."""


class AdapterSourceDenied(AdapterError):
    """The source path lies outside every allowed root."""


class StoreConflict(AdapterError):
    """Writers sharing the store kept taking the version number a commit wanted."""


OK = "OK"
CANCELLED = "CANCELLED"
INTERNAL = "INTERNAL"
# First match wins: subclasses before their bases.
_CODES: tuple[tuple[type[Exception], str], ...] = (
    (InvalidRequest, "INVALID_ARGUMENT"),
    (InvalidAdapterId, "INVALID_ARGUMENT"),
    (InvalidAdapter, "INVALID_ARGUMENT"),
    (AdapterNotFound, "NOT_FOUND"),
    (AdapterSourceDenied, "PERMISSION_DENIED"),
    (StoreConflict, "ABORTED"),
    (PermissionDenied, "PERMISSION_DENIED"),
    (Exhausted, "RESOURCE_EXHAUSTED"),
    (OverMemoryBudget, "RESOURCE_EXHAUSTED"),
    (TooLong, "DEADLINE_EXCEEDED"),
    (NotReady, "UNAVAILABLE"),
)


def status_code(exc: BaseException) -> str | None:
    """The canonical status code of a known error; None for anything else (internal)."""
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return None


def retry_after(exc: BaseException) -> float | None:
    """Seconds after which a retry may succeed, for errors that say so."""
    return exc.retry_after_s if isinstance(exc, Exhausted) else None
