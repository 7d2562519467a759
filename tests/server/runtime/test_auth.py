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


def entry(name: str, tenant: str, key: str, role: str = "client") -> str:
    return (
        f'[[keys]]\nname = "{name}"\ntenant = "{tenant}"\nrole = "{role}"\n'
        f'sha256 = "{hash_key(key)}"\n'
    )


def test_a_revoked_key_stops_working_at_reload_without_a_new_ring(tmp_path):
    """The ring a server holds re-reads its file in place; a key taken out
    of it is refused from then on, one added works, and a broken file changes nothing."""
    revoked, kept, added = new_key(), new_key(), new_key()
    path = key_file(tmp_path, entry("old", "acme", revoked) + entry("ops", "acme", kept, "admin"))
    ring = KeyRing.from_file(path)
    assert ring.authenticate(f"Bearer {revoked}").key_name == "old"
    assert ring.reload() is False  # nothing changed
    path.write_text(entry("ops", "acme", kept, "admin") + entry("new", "globex", added))
    assert ring.reload() is True
    with pytest.raises(Unauthenticated):
        ring.authenticate(f"Bearer {revoked}")
    assert ring.authenticate(f"Bearer {added}").tenant == "globex"
    assert ring.authenticate(f"Bearer {kept}").is_admin and len(ring) == 2
    assert ring.client_tenants == {"globex"}
    for broken in ("not toml [", entry("new", "globex", added) * 2, ""):
        path.write_text(broken)
        with pytest.raises(AuthConfigError):
            ring.reload()
        assert ring.authenticate(f"Bearer {added}").tenant == "globex"  # still the last good
    path.unlink()
    with pytest.raises(AuthConfigError, match="cannot read"):
        ring.reload()
    with pytest.raises(AuthConfigError, match="file"):
        KeyRing([]).reload()


def test_key_files_holding_keys_or_open_to_others_are_warned_about(tmp_path, caplog):
    """A key pasted into the key file, and a file others may write or read,
    are named in the log at load (once), without the key itself."""
    from loraplex.server.runtime.auth import key_file_warnings

    key = new_key()
    path = key_file(tmp_path, f"# the key: {key}\n" + entry("app", "acme", key))
    path.chmod(0o600)
    with caplog.at_level("WARNING", logger="loraplex.server.runtime.auth"):
        KeyRing.from_file(path)
        KeyRing.from_file(path)  # the same warning is not repeated
    (warning,) = [r.getMessage() for r in caplog.records]
    assert "looks like an API key" in warning and "line 1" in warning
    assert key not in warning and key[len(KEY_PREFIX) :][:8] not in warning
    clean = key_file(tmp_path, entry("app", "acme", key))
    for mode, needle in ((0o600, None), (0o640, None), (0o644, "readable"), (0o664, "writable"),
                         (0o602, "writable")):  # fmt: skip
        clean.chmod(mode)
        found = key_file_warnings(clean, clean.read_text())
        if needle is None:
            assert found == [], oct(mode)
        else:
            (only,) = found
            assert needle in only and f"{mode:o}" in only, oct(mode)


def test_keys_over_plaintext_beyond_loopback_need_tls_or_an_explicit_flag(tmp_path):
    """Keys on a non-loopback address without TLS would cross the network
    readable: refused unless --allow-plaintext-keys says TLS ends in front."""
    keys = key_file(tmp_path, entry("app", "acme", new_key()))
    for host in ("0.0.0.0", "::", "10.1.2.3", "example.com"):
        with pytest.raises(ValueError, match="--allow-plaintext-keys"):
            ServerConfig(host=host, auth_keys=keys)
        with pytest.raises(ValueError, match="--allow-plaintext-keys"):
            ServerConfig(host=host, auth_keys=keys, insecure=True)  # not the same opt-out
        assert ServerConfig(host=host, auth_keys=keys, allow_plaintext_keys=True)
        assert ServerConfig(host=host, auth_keys=keys, tls_cert=keys, tls_key=keys)
    for host in ("127.0.0.1", "localhost", "::1"):
        assert ServerConfig(host=host, auth_keys=keys).auth_keys == keys
