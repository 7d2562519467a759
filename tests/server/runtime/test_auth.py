"""API keys: the key file, hashing, and authentication of bearer metadata."""

from __future__ import annotations

import pytest

from loraplex.server.config import ServerConfig
from loraplex.server.runtime.auth import (
    KEY_PREFIX,
    AuthConfigError,
    KeyRing,
    Principal,
    Unauthenticated,
    hash_key,
    new_key,
)


def key_file(tmp_path, entries: str):
    path = tmp_path / "keys.toml"
    path.write_text(entries)
    return path


def test_keys_authenticate_to_their_tenant_and_role(tmp_path):
    app, ops = new_key(), new_key()
    assert app.startswith(KEY_PREFIX) and app != ops and len(app) > 40
    ring = KeyRing.from_file(
        key_file(
            tmp_path,
            f"""
[[keys]]
name = "acme-app"
tenant = "acme"
sha256 = "{hash_key(app)}"

[[keys]]
name = "ops"
tenant = "platform"
role = "admin"
sha256 = "{hash_key(ops)}"
""",
        )
    )
    assert ring.authenticate(f"Bearer {app}") == Principal(
        tenant="acme", role="client", key_name="acme-app"
    )
    principal = ring.authenticate(f"bearer  {ops} ")
    assert principal.is_admin and principal.tenant == "platform"
    # The file holds hashes only: the key itself is not in it.
    assert app not in (tmp_path / "keys.toml").read_text()


@pytest.mark.parametrize(
    ("header", "needle"),
    [
        (None, "missing"),
        ("", "missing"),
        ("Basic dXNlcjpwYXNz", "Bearer"),
        ("Bearer ", "Bearer"),
        ("Bearer lpx_wrong", "invalid"),
    ],
)
def test_missing_malformed_and_wrong_keys_are_refused(tmp_path, header, needle):
    ring = KeyRing([(hash_key(new_key()), Principal(tenant="acme", role="client", key_name="k"))])
    with pytest.raises(Unauthenticated, match=needle):
        ring.authenticate(header)


@pytest.mark.parametrize(
    ("entries", "needle"),
    [
        ("", "no \\[\\[keys\\]\\]"),
        ("[[keys]]\nname = 'a'\ntenant = 'acme'\nsha256 = 'nothex'", "sha256"),
        (f"[[keys]]\nname = 'a'\ntenant = 'ACME'\nsha256 = '{'0' * 64}'", "tenant"),
        (f"[[keys]]\nname = 'a'\ntenant = 'acme'\nrole = 'root'\nsha256 = '{'0' * 64}'", "role"),
        (f"[[keys]]\nname = 'a'\ntenant = 'acme'\nkey = 'x'\nsha256 = '{'0' * 64}'", "unknown"),
        (
            f"[[keys]]\nname = 'a'\ntenant = 'b'\nsha256 = '{'0' * 64}'\n"
            f"[[keys]]\nname = 'a'\ntenant = 'c'\nsha256 = '{'1' * 64}'",
            "duplicate",
        ),
        ("not toml [", "cannot read"),
    ],
)
def test_malformed_key_files_are_refused_at_start_up(tmp_path, entries, needle):
    with pytest.raises(AuthConfigError, match=needle):
        KeyRing.from_file(key_file(tmp_path, entries))


def test_without_keys_only_loopback_is_served_unless_insecure():
    with pytest.raises(ValueError, match="--insecure"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", insecure=True).insecure
    assert ServerConfig(host="::1").host == "::1"
    with pytest.raises(ValueError, match="certificate"):
        ServerConfig(tls_cert=None, tls_key=None, tls_client_ca=ServerConfig().model.home)
