"""Who may use an adapter: its tenant, everyone when shared, admins, and all without auth."""

from __future__ import annotations

import pytest

from loraplex.core.errors import PermissionDenied
from loraplex.core.types import AdapterVersion
from loraplex.server.runtime.auth import Principal
from loraplex.server.runtime.tenancy import check_admin, check_use, owner_for


def version(tenant: str, shared: bool = False) -> AdapterVersion:
    return AdapterVersion("x", 1, "sha256:0", 4, 8.0, ("q_proj",), 0, "", "", "", tenant, shared)


ACME = Principal(tenant="acme", role="client", key_name="k1")
GLOBEX = Principal(tenant="globex", role="client", key_name="k2")
ADMIN = Principal(tenant="ops", role="admin", key_name="k3")


def test_a_client_uses_its_own_and_shared_adapters_only():
    check_use(ACME, "x", version("acme"))
    check_use(GLOBEX, "x", version("acme", shared=True))
    with pytest.raises(PermissionDenied, match="globex"):
        check_use(GLOBEX, "x", version("acme"))


def test_an_unknown_id_is_denied_to_clients_like_another_tenants_adapter():
    with pytest.raises(PermissionDenied) as unknown:
        check_use(GLOBEX, "x", None)
    with pytest.raises(PermissionDenied) as others:
        check_use(GLOBEX, "x", version("acme"))
    assert str(unknown.value) == str(others.value)  # nothing tells them apart
    check_use(ADMIN, "x", None)  # admins (and no auth) go on to NOT_FOUND
    check_use(None, "x", None)


def test_new_adapters_belong_to_the_tenant_asked_for_else_the_callers():
    assert owner_for(ADMIN, "acme") == "acme"
    assert owner_for(ADMIN, "") == "ops"
    assert owner_for(None, "") == ""


def test_managing_adapters_needs_an_admin_key_or_no_authentication():
    check_admin(ADMIN, "deleting an adapter")
    check_admin(None, "deleting an adapter")
    with pytest.raises(PermissionDenied, match="deleting an adapter needs an admin key"):
        check_admin(ACME, "deleting an adapter")
