"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the HTTP
status of the error's canonical code (core/errors.py's one table, through Google's mapping of
canonical codes to HTTP). An error that is not a known one says only the request id."""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

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


class ErrorAnswer(NamedTuple):
    """What an error tells the client: its canonical code, words and the field it names."""

    code: str
    message: str
    param: str | None = None
    error_code: str | int | None = None
    retry_after_s: float | None = None


def answer_for(exc: BaseException, request_id: str, model: str | None = None) -> ErrorAnswer:
    """The answer for `exc`. With `model` (a request that names one), not finding the model and
    not being allowed to use it are both model_not_found, in the same words: the answer says
    nothing of other tenants' adapters. An unknown error is logged and says only the request
    id."""
    if model is not None and isinstance(exc, AdapterNotFound | PermissionDenied):
        message = f"The model {shown(model)} does not exist."
        return ErrorAnswer("NOT_FOUND", message, "model", "model_not_found")
    if isinstance(exc, HttpError):
        return ErrorAnswer(exc.code, str(exc), exc.param)
    code = status_code(exc)
    if code is None:
        log.error("internal error in request %s", request_id, exc_info=exc)
        return ErrorAnswer("INTERNAL", f"internal error (request id {request_id})")
    message, param = str(exc), None
    if isinstance(exc, InvalidRequest):
        param = OPENAI_FIELDS.get(exc.field, exc.field)
        message = param + message[len(exc.field) :]  # "<field>: <why>"
    return ErrorAnswer(code, message, param, retry_after_s=retry_after(exc))


def error_body(answer: ErrorAnswer) -> dict[str, Any]:
    """OpenAI's error object: the body of an error response, or a failed stream's last event."""
    _, kind = HTTP_STATUS[answer.code]
    error = {"message": answer.message, "type": kind, "param": answer.param}
    return {"error": error | {"code": answer.error_code}}


def error_response(answer: ErrorAnswer, request_id: str) -> JSONResponse:
    status, _ = HTTP_STATUS[answer.code]
    headers = {"x-request-id": request_id}
    if answer.retry_after_s is not None:  # whole seconds, as the header takes them
        headers["retry-after"] = str(max(1, math.ceil(answer.retry_after_s)))
    return JSONResponse(error_body(answer), status_code=status, headers=headers)


def response_for(exc: BaseException, request_id: str, model: str | None = None) -> JSONResponse:
    """The HTTP answer for `exc` (see answer_for)."""
    return error_response(answer_for(exc, request_id, model), request_id)


def model_not_found(model: str, request_id: str) -> JSONResponse:
    """The answer for a model the caller cannot use (unknown, or another tenant's)."""
    return response_for(AdapterNotFound(model), request_id, model)


def error_event(exc: BaseException, request_id: str) -> dict[str, Any]:
    """The `data:` payload that ends a stream that failed after it started: its `code` the
    HTTP status the error would have had (the stream's own status was sent already)."""
    answer = answer_for(exc, request_id)
    status, _ = HTTP_STATUS[answer.code]
    return error_body(answer._replace(error_code=answer.error_code or status))
