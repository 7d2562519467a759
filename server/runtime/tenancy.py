"""Which adapters a caller may see and use, and who may manage them.

A tenant's client keys see and use its own adapters and those registered as shared; admin
keys see every adapter; without authentication (no key file) there is one tenant and everyone
sees everything. Naming an adapter a client may not use is PERMISSION_DENIED whether or not
it exists, so the answer reveals nothing about other tenants' adapters (and a client never
gets NOT_FOUND for an id: nothing it is allowed to see has that id either).
"""

from __future__ import annotations

from loraplex.core.errors import PermissionDenied, shown
from loraplex.core.types import AdapterVersion
from loraplex.server.runtime.auth import Principal


def may_use(principal: Principal | None, version: AdapterVersion | None) -> bool:
    """Whether `principal` may use `version` (None: no such adapter, which only admins, or
    everyone without authentication, may learn)."""
    if principal is None or principal.is_admin:
        return True
    return version is not None and (version.shared or version.tenant == principal.tenant)


def check_use(principal: Principal | None, adapter_id: str, version: AdapterVersion | None) -> None:
    """Raise PermissionDenied unless `principal` may use `version` (see `may_use`)."""
    if not may_use(principal, version):
        assert principal is not None
        raise PermissionDenied(
            f"adapter {shown(adapter_id)} is not available to tenant {principal.tenant!r} (only "
            "its own adapters and shared ones are)"
        )


def check_admin(principal: Principal | None, operation: str) -> None:
    """Raise PermissionDenied unless `principal` may manage adapters and read the server's
    caches: an admin key (or no authentication at all)."""
    if principal is not None and not principal.is_admin:
        raise PermissionDenied(f"{operation} needs an admin key")


def owner_for(principal: Principal | None, requested: str) -> str:
    """The tenant a new adapter belongs to: the one asked for, else the caller's."""
    return requested or (principal.tenant if principal is not None else "")
