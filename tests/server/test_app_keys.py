"""The server process's API keys, without a model (its load never starts: every call a key
admits answers UNAVAILABLE, "still loading"): a key taken out of the key file stops working
without a restart, and plaintext keys beyond loopback are said out loud."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import grpc
import pytest

from loraplex.server.app import LoraplexServer
from loraplex.server.client import LoraplexClient
from loraplex.server.config import ServerConfig
from tests.helpers import write_key_file

ROLES = {"revoked": ("acme", "client"), "kept": ("acme", "client")}


@pytest.fixture
def never_loading(monkeypatch):
    async def no_model(self) -> None:
        return None

    monkeypatch.setattr(LoraplexServer, "_load", no_model)


def code_of(address: str, key: str) -> grpc.StatusCode:
    """The status of a ModelInfo call with `key` (UNAVAILABLE: admitted, the model loading)."""
    with LoraplexClient(address, 10, api_key=key) as client:
        try:
            client.model_info()
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def run(config: ServerConfig, scenario) -> None:
    async def main() -> None:
        server = LoraplexServer(config)
        port = await server.start()
        try:
            await scenario(server, f"127.0.0.1:{port}")
        finally:
            await server.stop(grace=0)

    asyncio.run(main())


def revoke(path: Path, keys: dict[str, str]) -> dict[str, str]:
    """Rewrite the key file without the "revoked" key, with a new one; returns the new keys."""
    fresh = write_key_file(path.with_suffix(".new"), {"added": ("globex", "client")})
    old = path.read_text().split("[[keys]]")
    kept = "".join("[[keys]]" + e for e in old if e and 'name = "kept-key"' in e)
    path.write_text(kept + path.with_suffix(".new").read_text())
    return {**keys, **fresh}


def test_a_key_taken_out_of_the_file_stops_working_without_a_restart(tmp_path, never_loading):
    """The file is watched (--auth-keys-reload-s): the revoked key is refused within a few
    checks, the others keep working, and a key added since works."""
    path = tmp_path / "keys.toml"
    keys = write_key_file(path, ROLES)
    path.chmod(0o600)
    config = ServerConfig(port=0, metrics_port=None, auth_keys=path, auth_keys_reload_s=0.05)

    async def scenario(server: LoraplexServer, address: str) -> None:
        assert await asyncio.to_thread(code_of, address, keys["revoked"]) == (
            grpc.StatusCode.UNAVAILABLE
        )
        new = revoke(path, keys)
        deadline = time.monotonic() + 10
        while await asyncio.to_thread(code_of, address, keys["revoked"]) != (
            grpc.StatusCode.UNAUTHENTICATED
        ):
            assert time.monotonic() < deadline, "the revoked key still works"
            await asyncio.sleep(0.05)
        for name in ("kept", "added"):
            assert await asyncio.to_thread(code_of, address, new[name]) == (
                grpc.StatusCode.UNAVAILABLE
            ), name

    run(config, scenario)


def test_reload_keys_applies_at_once_and_a_broken_file_keeps_the_last_keys(
    tmp_path, never_loading, caplog
):
    """What SIGHUP calls: with no watching at all (--auth-keys-reload-s 0)."""
    path = tmp_path / "keys.toml"
    keys = write_key_file(path, ROLES)
    path.chmod(0o600)
    config = ServerConfig(port=0, metrics_port=None, auth_keys=path, auth_keys_reload_s=0)

    async def scenario(server: LoraplexServer, address: str) -> None:
        new = revoke(path, keys)
        await asyncio.sleep(0.2)
        # Not watched: the revoked key works until the reload.
        assert await asyncio.to_thread(code_of, address, keys["revoked"]) == (
            grpc.StatusCode.UNAVAILABLE
        )
        assert await server.reload_keys() is True
        assert await asyncio.to_thread(code_of, address, keys["revoked"]) == (
            grpc.StatusCode.UNAUTHENTICATED
        )
        assert await server.reload_keys() is False  # unchanged
        path.write_text("[[keys]]\nname = 'broken'\n")
        with caplog.at_level(logging.ERROR):
            assert await server.reload_keys() is False
        assert "previous ones stay in force" in caplog.text
        assert await asyncio.to_thread(code_of, address, new["added"]) == (
            grpc.StatusCode.UNAVAILABLE
        )

    run(config, scenario)


def test_plaintext_keys_beyond_loopback_are_logged_when_allowed(tmp_path, never_loading, caplog):
    path = tmp_path / "keys.toml"
    write_key_file(path, ROLES)
    path.chmod(0o600)
    config = ServerConfig(
        host="0.0.0.0", port=0, metrics_port=None, auth_keys=path, allow_plaintext_keys=True
    )

    async def scenario(server: LoraplexServer, address: str) -> None:
        assert "API keys over plaintext on 0.0.0.0" in caplog.text

    with caplog.at_level(logging.WARNING):
        run(config, scenario)
