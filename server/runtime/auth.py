"""API keys: who is calling (a tenant) and what they may do (a role).

Keys live in a TOML file, hashed (sha256: keys are 256-bit random tokens, so a fast hash is
enough, as for GitHub or Stripe tokens; the file never holds a usable secret):

    [[keys]]
    name = "acme-app"          # shown in logs, never the key
    tenant = "acme"
    role = "client"            # client: generate; admin: manage adapters of any tenant
    sha256 = "9f86d081..."     # `loraplex keys new` prints a key and this line

Clients send `authorization: Bearer <key>`. A presented key is compared with every stored hash
in constant time (no early exit), so the time taken says nothing about which key is close.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

Role = Literal["client", "admin"]
ROLES: tuple[Role, ...] = ("client", "admin")
KEY_PREFIX = "lpx_"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class AuthConfigError(ValueError):
    """The key file is malformed (raised at start-up, naming the entry)."""


class Unauthenticated(Exception):
    """No key, a malformed header, or a key that matches none."""


@dataclass(frozen=True)
class Principal:
    """Who is calling."""

    tenant: str
    role: Role
    key_name: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@dataclass(frozen=True)
class _Key:
    digest: bytes
    principal: Principal


def new_key() -> str:
    """A fresh API key: 256 random bits, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, keys: list[tuple[str, Principal]]) -> None:
        """`keys`: (sha256 hex, principal) pairs."""
        self._keys = [_Key(bytes.fromhex(h), p) for h, p in keys]

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise AuthConfigError(f"cannot read the key file {path}: {exc}") from None
        entries = data.get("keys")
        if not isinstance(entries, list) or not entries:
            raise AuthConfigError(f"{path}: no [[keys]] entries")
        keys, names, digests = [], set(), set()
        for i, entry in enumerate(entries):
            where = f"{path}: keys[{i}]"
            if not isinstance(entry, dict):
                raise AuthConfigError(f"{where} is not a table")
            unknown = set(entry) - {"name", "tenant", "role", "sha256"}
            if unknown:
                raise AuthConfigError(f"{where}: unknown fields {sorted(unknown)}")
            name, tenant = _identifier(where, entry, "name"), _identifier(where, entry, "tenant")
            role, digest = entry.get("role", "client"), entry.get("sha256")
            if role not in ROLES:
                raise AuthConfigError(f"{where}: role must be client or admin, got {role!r}")
            if not isinstance(digest, str) or not _HEX64.match(digest):
                raise AuthConfigError(f"{where}: sha256 must be 64 lower-case hex digits")
            if name in names or digest in digests:
                raise AuthConfigError(f"{where}: duplicate name or key")
            names.add(name)
            digests.add(digest)
            keys.append((digest, Principal(tenant=tenant, role=role, key_name=name)))
        return cls(keys)

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `authorization: Bearer <key>` value."""
        if not authorization:
            raise Unauthenticated("missing authorization metadata: send 'Bearer <api key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("authorization must be 'Bearer <api key>'")
        presented = hashlib.sha256(key.strip().encode()).digest()
        found: Principal | None = None
        for stored in self._keys:  # every key, no early exit: constant time in the key
            if hmac.compare_digest(presented, stored.digest):
                found = stored.principal
        if found is None:
            raise Unauthenticated("invalid api key")
        return found

    @property
    def client_tenants(self) -> set[str]:
        """Tenants that have client keys (those whose requests share the engine)."""
        return {k.principal.tenant for k in self._keys if not k.principal.is_admin}

    def __len__(self) -> int:
        return len(self._keys)


def _identifier(where: str, entry: dict[str, object], field: str) -> str:
    value = entry.get(field)
    if not isinstance(value, str) or not _NAME.match(value):
        raise AuthConfigError(f"{where}: {field} must be an identifier, got {value!r}")
    return value
