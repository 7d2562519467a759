"""Domain errors as gRPC statuses: the code of the same name, and retry advice on refusals."""

from __future__ import annotations

import grpc
import pytest

from loraplex.core import errors
from loraplex.server.grpc_api.status import RETRY_AFTER_KEY, retry_metadata, status_for
from tests.core.test_errors import DOCUMENTED


@pytest.mark.parametrize(("exc", "code"), DOCUMENTED, ids=lambda v: type(v).__name__)
def test_each_error_becomes_the_grpc_status_of_its_code(exc, code):
    assert status_for(exc) == grpc.StatusCode[code]


def test_unknown_errors_have_no_status_and_refusals_carry_retry_advice():
    assert status_for(KeyError()) is None
    assert dict(retry_metadata(errors.QueueFull("full", 1.5)))[RETRY_AFTER_KEY] == "1500"
    assert retry_metadata(errors.NotReady("loading")) == []
