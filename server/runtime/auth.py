"""API keys: who is calling (a tenant) and what they may do (a role).

Keys live in a TOML file, hashed (sha256: keys are 256-bit random tokens, so a fast hash is
enough, as for GitHub or Stripe tokens; the file never holds a usable secret):

    [[keys]]
    name = "acme-app"          # shown in logs, never the key
    tenant = "acme"
    role = "client"            # client: generate; admin: manage adapters of any tenant
    sha256 = "9f86d081..."     # `loraplex keys new` prints this entry (the key on stderr)

Clients send `authorization: Bearer <key>`. A presented key is compared with every stored hash
in constant time (no early exit), so the time taken says nothing about which key is close.

Reading a key file warns in the log (each warning once a process) about what makes it unsafe:
text that looks like an API key (a key belongs with its client, never in this file), and
permissions that let other users write it (anyone who can could add an admin key) or read it.
`KeyRing.reload` re-reads the file in place: a key removed from it stops working at the next
call, without a restart (`loraplex serve` reloads at SIGHUP and when the file changes); a file
that no longer parses leaves the keys as they were.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import threading
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from loraplex.core.errors import PermissionDenied

Role = Literal["client", "admin"]
ROLES: tuple[Role, ...] = ("client", "admin")
KEY_PREFIX = "lpx_"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
# What a key looks like (KEY_PREFIX and 43 URL-safe characters), allowing for shorter ones.
_KEY_LIKE = re.compile(re.escape(KEY_PREFIX) + r"[A-Za-z0-9_-]{16,}")

log = logging.getLogger(__name__)
_warned: set[tuple[str, str]] = set()  # (file, warning) already logged: each once a process
_warned_lock = threading.Lock()


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


def is_identifier(value: str) -> bool:
    """Whether `value` may be a key's name or a tenant: lower-case letters, digits, '.', '_'
    and '-', starting with a letter or digit, at most 63 characters."""
    return bool(_NAME.match(value))


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    def __init__(self, keys: list[tuple[str, Principal]], path: Path | None = None) -> None:
        """`keys`: (sha256 hex, principal) pairs; `path`: the file they came from, if any (what
        `reload` re-reads)."""
        self.path = path
        self._keys = _keys(keys)
        self._digest: bytes | None = None  # sha256 of the file content the keys came from
        self._lock = threading.Lock()  # one reload at a time
        self._refresh_error: str | None = None  # why the last refresh failed (said once)

    @classmethod
    def from_file(cls, path: Path) -> KeyRing:
        content = _read(path)
        ring = cls(parse_key_file(path, content), path)
        ring._digest = hashlib.sha256(content.encode()).digest()
        return ring

    def reload(self) -> bool:
        """Re-read the key file: from the next call on, the keys are the file's (a key no longer
        in it is refused). False if the file did not change. Raises AuthConfigError, keeping
        the keys as they were, when it cannot be read or parsed."""
        if self.path is None:
            raise AuthConfigError("these keys did not come from a file: nothing to reload")
        with self._lock:
            content = _read(self.path)
            digest = hashlib.sha256(content.encode()).digest()
            if digest == self._digest:
                return False
            keys = _keys(parse_key_file(self.path, content))
            self._keys, self._digest = keys, digest  # one assignment: calls see old or new
            return True

    def refresh(self, say_again: bool = False) -> bool:
        """`reload`, logged for operators: a change at info, a file that no longer reads or
        parses at error (once until it changes, unless `say_again`; the keys stay as they
        were). True if the keys changed."""
        if say_again:
            self._refresh_error = None
        try:
            changed = self.reload()
        except AuthConfigError as exc:
            if str(exc) != self._refresh_error:
                log.error("API keys not reloaded, the previous ones stay in force: %s", exc)
            self._refresh_error = str(exc)
            return False
        self._refresh_error = None
        if changed:
            log.info("API keys reloaded: %d keys from %s", len(self), self.path)
        return changed

    def authenticate(self, authorization: str | None) -> Principal:
        """The principal of an `authorization: Bearer <key>` value."""
        if not authorization:
            raise Unauthenticated("missing authorization metadata: send 'Bearer <api key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("authorization must be 'Bearer <api key>'")
        presented = hashlib.sha256(key.strip().encode()).digest()
        found: Principal | None = None
        # Every key, no early exit: constant time in the key. The list of one moment (a
        # reload replaces it whole, never changes it).
        for stored in self._keys:
            if hmac.compare_digest(presented, stored.digest):
                found = stored.principal
        if found is None:
            raise Unauthenticated("invalid api key")
        return found

    def caller(self, authorization: str | None, admin_only: bool, what: str) -> Principal:
        """The caller of `what` (an RPC, a route), by the one rule every front end applies: a
        valid key (else Unauthenticated) and, for what only admins may call, an admin key
        (else PermissionDenied)."""
        principal = self.authenticate(authorization)
        if admin_only and not principal.is_admin:
            raise PermissionDenied(f"{what} needs an admin key")
        return principal

    @property
    def client_tenants(self) -> set[str]:
        """Tenants that have client keys (those whose requests share the engine)."""
        return {k.principal.tenant for k in self._keys if not k.principal.is_admin}

    def __len__(self) -> int:
        return len(self._keys)


def parse_key_file(path: Path, content: str) -> list[tuple[str, Principal]]:
    """The (sha256 hex, principal) pairs of a key file's `content` (`path` names it in errors)."""
    try:
        data = tomllib.loads(content)
    except tomllib.TOMLDecodeError as exc:
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
    return keys


def _keys(keys: list[tuple[str, Principal]]) -> list[_Key]:
    return [_Key(bytes.fromhex(h), p) for h, p in keys]


def _read(path: Path) -> str:
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthConfigError(f"cannot read the key file {path}: {exc}") from None
    for warning in key_file_warnings(path, content):
        with _warned_lock:
            seen = (str(path), warning) in _warned
            _warned.add((str(path), warning))
        if not seen:
            log.warning("%s", warning)
    return content


def key_file_warnings(path: Path, content: str) -> list[str]:
    """What makes the key file at `path` (holding `content`) unsafe, in words; never a key."""
    warnings = []
    lines = [i for i, line in enumerate(content.splitlines(), 1) if _KEY_LIKE.search(line)]
    if lines:
        warnings.append(
            f"the key file {path} holds what looks like an API key ({KEY_PREFIX}..., line "
            f"{', '.join(map(str, lines))}): it should hold only sha256 hashes. Give the key "
            "to its client, delete it from the file, and make a new key if the file was shared"
        )
    try:
        mode = path.stat().st_mode
    except OSError:
        return warnings
    if os.name == "posix" and mode & (stat.S_IWGRP | stat.S_IWOTH):
        warnings.append(
            f"the key file {path} is writable by other users (mode {stat.S_IMODE(mode):o}): "
            "anyone who can write it can add an admin key. chmod 600 (or 640) it"
        )
    elif os.name == "posix" and mode & stat.S_IROTH:
        warnings.append(
            f"the key file {path} is readable by every user (mode {stat.S_IMODE(mode):o}): "
            "chmod 600 (or 640) it"
        )
    return warnings


def _identifier(where: str, entry: dict[str, object], field: str) -> str:
    value = entry.get(field)
    if not isinstance(value, str) or not _NAME.match(value):
        raise AuthConfigError(f"{where}: {field} must be an identifier, got {value!r}")
    return value
