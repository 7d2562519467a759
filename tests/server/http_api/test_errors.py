"""Every domain error's HTTP answer, in OpenAI's error shape, from the one table."""

from __future__ import annotations

import json

import pytest

from loraplex.core.errors import (
    AdapterNotFound,
    InvalidRequest,
    NotReady,
    OverQuota,
    PermissionDenied,
    QueueFull,
    StoreConflict,
    TooLong,
    Unmeetable,
)
from loraplex.server.http_api.errors import response_for


def answer(exc: BaseException, model: str | None = None) -> tuple[int, dict, dict]:
    response = response_for(exc, "req-1", model=model)
    return response.status_code, dict(response.headers), json.loads(response.body)["error"]


@pytest.mark.parametrize(
    ("exc", "status", "kind"),
    [
        (InvalidRequest("top_p", "must be in (0, 1]"), 400, "invalid_request_error"),
        (PermissionDenied("needs an admin key"), 403, "permission_error"),
        (AdapterNotFound("no adapter 'x'"), 404, "not_found_error"),
        (StoreConflict("busy"), 409, "conflict_error"),
        (QueueFull("the queue is full", 2.5), 429, "rate_limit_error"),
        (OverQuota("tenant over its limit", 0.2), 429, "rate_limit_error"),
        (Unmeetable("cannot finish before the deadline", 7.0), 429, "rate_limit_error"),
        (NotReady("the model is still loading"), 503, "service_unavailable_error"),
        (TooLong("ran past 600 s"), 504, "timeout_error"),
    ],
)
def test_known_errors_keep_their_message_and_status(exc, status, kind):
    code, headers, error = answer(exc)
    assert (code, error["type"]) == (status, kind)
    assert error["message"] == str(exc)
    assert headers["x-request-id"] == "req-1"


def test_bad_parameter_is_named_as_openai_names_it():
    assert answer(InvalidRequest("stop", "must be a string"))[2]["param"] == "stop"
    error = answer(InvalidRequest("max_new_tokens", "must be >= 1, got 0"))[2]
    assert error["param"] == "max_tokens" and error["message"] == "max_tokens: must be >= 1, got 0"


def test_refusals_that_pass_say_when_to_retry():
    _, headers, _ = answer(QueueFull("the queue is full", 2.5))
    assert headers["retry-after"] == "3"  # whole seconds, rounded up
    assert "retry-after" not in answer(InvalidRequest("x", "y"))[1]


def test_internal_errors_say_only_the_request_id():
    code, _, error = answer(RuntimeError("secret path /etc/keys in a traceback"))
    assert code == 500 and "secret" not in error["message"] and "req-1" in error["message"]


def test_a_model_the_caller_may_not_use_is_not_found_in_the_same_words():
    denied = answer(PermissionDenied("adapter 'theirs' is not available to tenant 'acme'"), "m")
    unknown = answer(AdapterNotFound("no adapter 'm'"), "m")
    assert denied == unknown
    assert unknown[0] == 404 and unknown[2]["code"] == "model_not_found"
