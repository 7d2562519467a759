"""Per-tenant limits, checked when a request arrives, before it queues: requests in flight
(queued or running) and tokens per minute. Over a limit is RESOURCE_EXHAUSTED at once, with
the time after which a retry can succeed; nothing waits on a quota.

Tokens are counted as a request reserves them (its prompt plus max_new_tokens) from a bucket
refilled continuously at tokens_per_minute / 60 per second, holding at most a minute's worth;
what a request did not generate goes back to the bucket when it ends.

Limits come from server flags (every tenant's default) and, per tenant, from the API key file:

    [tenants.acme]
    max_concurrent = 16
    tokens_per_minute = 200000
"""

from __future__ import annotations

import threading
import time
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from loraplex.core.errors import InvalidRequest, OverQuota
from loraplex.server.config import TenantLimits
from loraplex.server.runtime.auth import AuthConfigError

CONCURRENCY_RETRY_S = 1.0  # the retry advice when a tenant has too many requests in flight


def load_tenant_limits(path: Path) -> dict[str, TenantLimits]:
    """The `[tenants.<name>]` tables of an API key file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise AuthConfigError(f"cannot read {path}: {exc}") from None
    tenants = data.get("tenants", {})
    if not isinstance(tenants, dict):
        raise AuthConfigError(f"{path}: tenants must be a table of [tenants.<name>] tables")
    limits = {}
    for name, table in tenants.items():
        if not isinstance(table, dict):
            raise AuthConfigError(f"{path}: tenants.{name} is not a table")
        try:
            limits[name] = TenantLimits(**table)
        except (TypeError, ValueError) as exc:
            raise AuthConfigError(f"{path}: tenants.{name}: {exc}") from None
    return limits


@dataclass
class _Usage:
    in_flight: int
    tokens: float  # left in the bucket
    updated: float  # when `tokens` was last refilled


class Ticket:
    """A request's place under its tenant's quotas; `release` it once the request ends."""

    def __init__(self, quotas: Quotas, tenant: str, tokens: int) -> None:
        self._quotas = quotas
        self.tenant = tenant
        self.tokens = tokens
        self._released = False

    def release(self, unused_tokens: int = 0) -> None:
        """Idempotent: the request left; `unused_tokens` of its reservation go back."""
        if not self._released:
            self._released = True
            self._quotas._release(self.tenant, min(max(unused_tokens, 0), self.tokens))


class Quotas:
    def __init__(
        self,
        default: TenantLimits,
        per_tenant: Mapping[str, TenantLimits] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.default = default
        self.per_tenant = dict(per_tenant or {})
        self._clock = clock
        self._usage: dict[str, _Usage] = {}
        self._lock = threading.Lock()

    def limits(self, tenant: str) -> TenantLimits:
        return self.per_tenant.get(tenant, self.default)

    def admit(self, tenant: str, tokens: int) -> Ticket:
        """Take a place for a request reserving `tokens`, or raise OverQuota (InvalidRequest
        when it could never fit the tenant's limit)."""
        limits = self.limits(tenant)
        per_minute = limits.tokens_per_minute
        if per_minute and tokens > per_minute:
            raise InvalidRequest(
                "max_new_tokens",
                f"prompt + max_new_tokens is {tokens} tokens, over the tenant's limit of "
                f"{per_minute} tokens per minute",
            )
        with self._lock:
            now = self._clock()
            usage = self._usage.get(tenant)
            if usage is None:
                usage = self._usage[tenant] = _Usage(0, float(per_minute), now)
            if limits.max_concurrent and usage.in_flight >= limits.max_concurrent:
                raise OverQuota(
                    f"tenant {tenant!r} has {limits.max_concurrent} requests in flight, its limit",
                    CONCURRENCY_RETRY_S,
                )
            if per_minute:
                rate = per_minute / 60.0
                usage.tokens = min(per_minute, usage.tokens + (now - usage.updated) * rate)
                usage.updated = now
                if usage.tokens < tokens:
                    raise OverQuota(
                        f"tenant {tenant!r} is over its limit of {per_minute} tokens per minute",
                        (tokens - usage.tokens) / rate,
                    )
                usage.tokens -= tokens
            usage.in_flight += 1
        return Ticket(self, tenant, tokens)

    def check(self, tenant: str) -> None:
        """Raise OverQuota if the tenant is at its limit of requests in flight: a cheap check
        before any work on a request (`admit` decides; this only refuses early)."""
        limit = self.limits(tenant).max_concurrent
        if limit and self.in_flight(tenant) >= limit:
            raise OverQuota(
                f"tenant {tenant!r} has {limit} requests in flight, its limit",
                CONCURRENCY_RETRY_S,
            )

    def in_flight(self, tenant: str) -> int:
        with self._lock:
            usage = self._usage.get(tenant)
            return usage.in_flight if usage else 0

    def _release(self, tenant: str, unused_tokens: int) -> None:
        with self._lock:
            usage = self._usage[tenant]
            usage.in_flight -= 1
            per_minute = self.limits(tenant).tokens_per_minute
            if per_minute:
                usage.tokens = min(per_minute, usage.tokens + unused_tokens)
            elif usage.in_flight == 0:
                del self._usage[tenant]  # nothing to remember: memory stays bounded
