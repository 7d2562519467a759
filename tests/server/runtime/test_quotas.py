"""Per-tenant limits: requests in flight and a token bucket, refused at once with advice."""

from __future__ import annotations

import pytest

from loraplex.core.errors import InvalidRequest, OverQuota
from loraplex.server.config import TenantLimits
from loraplex.server.runtime.auth import AuthConfigError
from loraplex.server.runtime.quotas import Quotas, load_tenant_limits


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_requests_in_flight_are_limited_per_tenant():
    quotas = Quotas(TenantLimits(max_concurrent=2), {"big": TenantLimits(max_concurrent=3)})
    tickets = [quotas.admit("small", 10) for _ in range(2)]
    with pytest.raises(OverQuota, match="2 requests in flight") as err:
        quotas.admit("small", 10)
    assert err.value.retry_after_s > 0
    with pytest.raises(OverQuota):  # the early check, before a request is tokenized
        quotas.check("small")
    quotas.check("big")
    for _ in range(3):  # another tenant is not held back, and has its own limit
        quotas.admit("big", 10)
    tickets[0].release()
    tickets[0].release()  # once only
    assert quotas.in_flight("small") == 1
    quotas.admit("small", 10)


def test_tokens_per_minute_refill_and_unused_tokens_come_back():
    clock = Clock()
    quotas = Quotas(TenantLimits(tokens_per_minute=600), clock=clock)  # 10 tokens a second
    first = quotas.admit("t", 500)
    with pytest.raises(OverQuota) as err:
        quotas.admit("t", 200)
    assert err.value.retry_after_s == pytest.approx(10.0)  # 100 missing at 10 per second
    clock.now = 10.0
    quotas.admit("t", 200).release(0)
    with pytest.raises(OverQuota):
        quotas.admit("t", 100)
    first.release(unused_tokens=450)  # it generated 50 of its reservation
    quotas.admit("t", 400)
    clock.now = 1e6
    quotas.admit("t", 600)  # refilled, but never beyond a minute's worth
    with pytest.raises(OverQuota):
        quotas.admit("t", 1)


def test_a_request_larger_than_a_minute_of_tokens_is_invalid_not_retryable():
    quotas = Quotas(TenantLimits(tokens_per_minute=100))
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        quotas.admit("t", 101)


def test_no_limits_remember_nothing():
    quotas = Quotas(TenantLimits())
    tickets = [quotas.admit(f"t{i}", 10**9) for i in range(100)]
    for t in tickets:
        t.release()
    assert quotas._usage == {}


def test_limits_from_the_key_file(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text("[tenants.acme]\nmax_concurrent = 4\ntokens_per_minute = 1000\n")
    assert load_tenant_limits(path) == {"acme": TenantLimits(4, 1000)}
    path.write_text("[tenants.acme]\nmax_concurent = 4\n")
    with pytest.raises(AuthConfigError, match=r"tenants\.acme"):
        load_tenant_limits(path)
    path.write_text("[tenants.acme]\nmax_concurrent = -1\n")
    with pytest.raises(AuthConfigError, match="max_concurrent"):
        load_tenant_limits(path)
