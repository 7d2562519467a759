"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP
status of the error's canonical code (core/errors.py's one table, through Google's mapping of
canonical codes to HTTP). An error that is not a known one says only the request id."""

from __future__ import annotations

import logging
import math

from starlette.responses import JSONResponse

from loraplex.core.errors import (
    AdapterNotFound,
    InvalidRequest,
    PermissionDenied,
    retry_after,
    shown,
    status_code,
)

log = logging.getLogger(__name__)

# Canonical code -> (HTTP status, OpenAI error type).
HTTP_STATUS: dict[str, tuple[int, str]] = {
    "INVALID_ARGUMENT": (400, "invalid_request_error"),
    "UNAUTHENTICATED": (401, "authentication_error"),
    "PERMISSION_DENIED": (403, "permission_error"),
    "NOT_FOUND": (404, "not_found_error"),
    "ABORTED": (409, "conflict_error"),
    "RESOURCE_EXHAUSTED": (429, "rate_limit_error"),
    "UNAVAILABLE": (503, "service_unavailable_error"),
    "DEADLINE_EXCEEDED": (504, "timeout_error"),
    "INTERNAL": (500, "internal_server_error"),
}


# The runtime's field names that OpenAI's API calls otherwise: an error names the body's field.
OPENAI_FIELDS = {"max_new_tokens": "max_tokens", "adapter_id": "model", "prompt_ids": "prompt"}


class HttpError(Exception):
    """An error of the HTTP layer itself (a body that is not JSON, a missing key, a route that
    needs an admin key), with its canonical code."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def error_response(
    code: str,
    message: str,
    request_id: str,
    param: str | None = None,
    error_code: str | None = None,
    retry_after_s: float | None = None,
) -> JSONResponse:
    status, kind = HTTP_STATUS[code]
    headers = {"x-request-id": request_id}
    if retry_after_s is not None:  # whole seconds, as the header takes them
        headers["retry-after"] = str(max(1, math.ceil(retry_after_s)))
    body = {"error": {"message": message, "type": kind, "param": param, "code": error_code}}
    return JSONResponse(body, status_code=status, headers=headers)


def model_not_found(model: str, request_id: str) -> JSONResponse:
    """The answer for a model the caller cannot use: an unknown one and another tenant's get
    the same words, so the answer says nothing of other tenants' adapters."""
    return error_response(
        "NOT_FOUND",
        f"The model {shown(model)} does not exist.",
        request_id,
        param="model",
        error_code="model_not_found",
    )


def response_for(exc: BaseException, request_id: str, model: str | None = None) -> JSONResponse:
    """The HTTP answer for `exc`. With `model` (a request that names one), not finding the
    model and not being allowed to use it are both 404 model_not_found."""
    if model is not None and isinstance(exc, AdapterNotFound | PermissionDenied):
        return model_not_found(model, request_id)
    if isinstance(exc, HttpError):
        return error_response(exc.code, str(exc), request_id, param=exc.param)
    code = status_code(exc)
    if code is None:
        log.error("internal error in request %s", request_id, exc_info=exc)
        return error_response("INTERNAL", f"internal error (request id {request_id})", request_id)
    message, param = str(exc), None
    if isinstance(exc, InvalidRequest):
        param = OPENAI_FIELDS.get(exc.field, exc.field)
        message = param + message[len(exc.field) :]  # "<field>: <why>"
    return error_response(code, message, request_id, param=param, retry_after_s=retry_after(exc))


def error_event(exc: BaseException, request_id: str) -> dict[str, object]:
    """The `data:` payload that ends a stream that failed after it started."""
    code = status_code(exc) or "INTERNAL"
    status, kind = HTTP_STATUS[code]
    message = str(exc) if code != "INTERNAL" else f"internal error (request id {request_id})"
    if code == "INTERNAL":
        log.error("internal error in request %s", request_id, exc_info=exc)
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}
