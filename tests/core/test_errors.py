"""The one table of status codes: every domain error has the code the API documents."""

from __future__ import annotations

import pytest

from loraplex.core import errors

DOCUMENTED = [
    (errors.InvalidRequest("top_p", "must be in (0, 1]"), "INVALID_ARGUMENT"),
    (errors.InvalidAdapterId("not an id"), "INVALID_ARGUMENT"),
    (errors.InvalidAdapter("bad tensor"), "INVALID_ARGUMENT"),
    (errors.AdapterNotFound("gone"), "NOT_FOUND"),
    (errors.AdapterSourceDenied("outside the roots"), "PERMISSION_DENIED"),
    (errors.PermissionDenied("another tenant's"), "PERMISSION_DENIED"),
    (errors.StoreConflict("version taken"), "ABORTED"),
    (errors.QueueFull("full", 1.0), "RESOURCE_EXHAUSTED"),
    (errors.OverQuota("over", 2.5), "RESOURCE_EXHAUSTED"),
    (errors.TooLong("past the limit"), "DEADLINE_EXCEEDED"),
    (errors.NotReady("loading"), "UNAVAILABLE"),
]


@pytest.mark.parametrize(("exc", "code"), DOCUMENTED, ids=lambda v: type(v).__name__)
def test_each_error_has_its_documented_code(exc, code):
    assert errors.status_code(exc) == code


def test_anything_else_is_internal_and_only_refusals_say_when_to_retry():
    assert errors.status_code(RuntimeError("boom")) is None
    assert errors.retry_after(errors.OverQuota("over", 2.5)) == 2.5
    assert errors.retry_after(errors.NotReady("loading")) is None
