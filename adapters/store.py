"""The adapter store: name -> versions, each a manifest over a content-addressed blob, on any
fsspec file system (a local directory by default, or S3-compatible object storage that
several replicas share).

Layout under the store's root:

    blobs/<sha256 hex>/adapter_config.json
    blobs/<sha256 hex>/adapter_model.safetensors
    manifests/<name>/v00000003.json     one per version: tenant, digest, rank, targets, bytes,
                                        base-model fingerprint, source, time, and the
                                        adapter's own chat template if it has one
    manifests/<name>/deleted.json       tombstone: versions <= through_version are gone

Registration writes the blob's files, then the version's manifest in one atomic write (a
rename on a local disk, a single PUT on S3). The manifest is the commit point: a crash before
it leaves at most an orphan blob nobody can see (collected later), never a half-registered
adapter. A delete writes the tombstone first, so versions never come back and are never
reused. Manifests are immutable, so a refresh only reads the ones it has not seen.

Fields added to the manifest after its first format (chat_template) are written only when
set, so servers of an earlier version sharing the store still read every adapter that does not
use them; a field this version does not know is skipped when read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator, Set
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

import fsspec
from fsspec.implementations.local import LocalFileSystem

from loraplex.adapters.entries import ADAPTER_FILES
from loraplex.core.errors import AdapterNotFound, StoreConflict
from loraplex.core.types import AdapterVersion

log = logging.getLogger(__name__)
COMMIT_TRIES = 8  # reads of the store a commit makes when other writers take its version

_VERSION_FILE = re.compile(r"^v(\d{8})\.json$")
TOMBSTONE = "deleted.json"
ORPHAN_MIN_AGE_S = 3600.0  # an orphan blob younger than this may be a replica's registration


class Registered(NamedTuple):
    version: AdapterVersion
    created: bool  # False: the same content was already the latest version (nothing changed)


@dataclass(frozen=True)
class _Index:
    """What a scan of the manifests found."""

    live: list[str]  # manifest paths of live versions
    parsed: dict[str, AdapterVersion]  # the ones not seen before, read
    last_version: dict[str, int]  # per id, the highest version ever used


def digest_files(adapter_dir: Path) -> str:
    """sha256 over the adapter's files (name and content), in a fixed order."""
    h = hashlib.sha256()
    for name in ADAPTER_FILES:
        h.update(name.encode() + b"\0")
        with open(adapter_dir / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def open_filesystem(url: str, storage_options: dict[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec file system, root path) for a directory or URL such as s3://bucket/prefix.

    Instances are not shared and listings are not cached: replicas write behind our back."""
    options = dict(storage_options or {})
    if "://" not in url:
        return LocalFileSystem(), str(Path(url).expanduser().resolve())
    options.setdefault("skip_instance_cache", True)
    if url.startswith("s3://"):
        options.setdefault("use_listings_cache", False)
    fs, root = fsspec.core.url_to_fs(url, **options)
    return fs, root.rstrip("/")


class AdapterStore:
    """Thread-safe. The index of live versions is kept in memory; `refresh` re-reads it."""

    def __init__(
        self,
        url: str | Path,
        storage_options: dict[str, Any] | None = None,
        staging_dir: Path | None = None,
    ) -> None:
        self.url = str(url)
        self.fs, self.root = open_filesystem(self.url, storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)
        # Incoming adapters are staged on a local disk; for a local store on the same one, so
        # a blob moves into place with a rename.
        self.staging_dir = staging_dir or (
            Path(self.root) / ".staging" if self.local else Path(tempfile.gettempdir())
        )
        self.staging_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()  # the index; never held across storage reads
        self._refresh_lock = threading.Lock()
        self._refreshed_at = -math.inf
        self._writes = 0  # commits and deletes, so a refresh can tell it raced one
        self._seen: dict[str, AdapterVersion] = {}  # manifest path -> its (immutable) content
        self._adapters: dict[str, list[AdapterVersion]] = {}
        self._last_version: dict[str, int] = {}
        self.fs.makedirs(self._path("blobs"), exist_ok=True)
        self.fs.makedirs(self._path("manifests"), exist_ok=True)
        self._migrate_registry_json()
        self.refresh()

    # -- paths ------------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join((self.root, *parts))

    def _manifest_path(self, adapter_id: str, version: int) -> str:
        return self._path("manifests", adapter_id, f"v{version:08d}.json")

    def blob_path(self, digest: str) -> str:
        return self._path("blobs", digest.removeprefix("sha256:"))

    # -- reads --------------------------------------------------------------------------------
    def latest(self, adapter_id: str) -> AdapterVersion:
        return self.versions(adapter_id)[-1]

    def versions(self, adapter_id: str) -> list[AdapterVersion]:
        with self._lock:
            versions = self._adapters.get(adapter_id)
            if not versions:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
            return list(versions)

    def latest_versions(self) -> list[AdapterVersion]:
        """The latest version of every adapter, by id."""
        with self._lock:
            return [self._adapters[a][-1] for a in sorted(self._adapters)]

    def refresh(self) -> None:
        """Re-read the manifests (only new ones are fetched: manifests never change).

        A caller that waited for another's read gets a new one only if that read started
        before the call. The read holds no lock that lookups take: they never wait on storage."""
        requested = time.monotonic()
        with self._refresh_lock:
            if self._refreshed_at >= requested:
                return
            started = time.monotonic()
            for _ in range(3):
                writes = self._writes
                index = self._scan()
                with self._lock:
                    if self._writes == writes:  # no commit or delete raced the read
                        self._apply(index)
                        break
            else:
                with self._lock:
                    self._apply(self._scan())
            self._refreshed_at = started

    def _scan(self) -> _Index:
        root = self._path("manifests")
        by_name: dict[str, dict[int, str]] = {}
        tombstones: dict[str, str] = {}
        for path in self.fs.find(root):
            name, _, file = path[len(root) + 1 :].rpartition("/")
            if file == TOMBSTONE:
                tombstones[name] = path
            elif (m := _VERSION_FILE.match(file)) and "/" not in name:
                by_name.setdefault(name, {})[int(m[1])] = path
        through = {
            name: int(json.loads(self.fs.cat_file(p))["through_version"])
            for name, p in tombstones.items()
        }
        live = [
            p
            for name, versions in by_name.items()
            for v, p in versions.items()
            if v > through.get(name, 0)
        ]
        unseen = [p for p in live if p not in self._seen]
        contents = self.fs.cat(unseen) if unseen else {}
        parsed = {p: _parse_manifest(data) for p, data in contents.items()}
        last_version = {name: max([*vs, through.get(name, 0)]) for name, vs in by_name.items()} | {
            name: n for name, n in through.items() if name not in by_name
        }
        return _Index(live, parsed, last_version)

    def _apply(self, index: _Index) -> None:
        """Under the lock: make a scan's result the index."""
        self._seen.update(index.parsed)
        adapters: dict[str, list[AdapterVersion]] = {}
        for p in index.live:
            record = self._seen[p]
            adapters.setdefault(record.adapter_id, []).append(record)
        for versions in adapters.values():
            versions.sort(key=lambda r: r.version)
        self._adapters = adapters
        self._last_version = index.last_version

    @contextlib.contextmanager
    def open_blob(self, digest: str) -> Iterator[Path]:
        """A local directory holding the blob's files, checked against their digest."""
        remote = self.blob_path(digest)
        with contextlib.ExitStack() as stack:
            if self.local:
                local = Path(remote)
            else:
                local = Path(stack.enter_context(tempfile.TemporaryDirectory(dir=self.staging_dir)))
                for name in ADAPTER_FILES:
                    self.fs.get_file(f"{remote}/{name}", str(local / name))
            if not all((local / n).is_file() for n in ADAPTER_FILES):
                raise FileNotFoundError(f"blob {digest} is missing from the store")
            actual = digest_files(local)
            if actual != digest:
                raise RuntimeError(f"blob {digest} is corrupt: its content hashes to {actual}")
            yield local

    # -- writes -------------------------------------------------------------------------------
    def new_staging_dir(self) -> Path:
        """A private local directory for an incoming adapter's files."""
        return Path(tempfile.mkdtemp(prefix="incoming-", dir=self.staging_dir))

    def commit(
        self,
        adapter_id: str,
        staged: Path,
        *,
        rank: int,
        lora_alpha: float,
        target_modules: tuple[str, ...],
        base_model_fingerprint: str,
        source: str,
        tenant: str = "",
        shared: bool = False,
        chat_template: str = "",
    ) -> Registered:
        """Keep a staged, validated adapter; returns (version, created). The same content,
        chat template and owner under the same id is a no-op; new content (or a new template,
        owner or sharing) becomes the next version."""
        digest = digest_files(staged)
        for _ in range(COMMIT_TRIES):
            with self._lock:
                versions = self._adapters.get(adapter_id, [])
                latest = versions[-1] if versions else None
                if latest is not None and (
                    latest.digest,
                    latest.tenant,
                    latest.shared,
                    latest.chat_template,
                ) == (digest, tenant, shared, chat_template):
                    return Registered(latest, created=False)
                self._put_blob(staged, digest)
                record = AdapterVersion(
                    adapter_id=adapter_id,
                    version=self._last_version.get(adapter_id, 0) + 1,
                    digest=digest,
                    rank=rank,
                    lora_alpha=lora_alpha,
                    target_modules=target_modules,
                    size_bytes=sum((staged / n).stat().st_size for n in ADAPTER_FILES),
                    created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                    source=source,
                    base_model_fingerprint=base_model_fingerprint,
                    tenant=tenant,
                    shared=shared,
                    chat_template=chat_template,
                )
                path = self._manifest_path(adapter_id, record.version)
                try:
                    self._write(path, _manifest(record), exclusive=True)
                except FileExistsError:
                    # Another server sharing the store took this version since this one read
                    # it: read again (outside the lock), then take the next one.
                    log.info("%s v%d was taken by another writer", adapter_id, record.version)
                else:
                    self._seen[path] = record
                    self._writes += 1
                    self._adapters[adapter_id] = [*versions, record]
                    self._last_version[adapter_id] = record.version
                    return Registered(record, created=True)
            self.refresh()
        raise StoreConflict(
            f"{adapter_id!r}: other writers kept taking the next version; try again"
        )

    def delete(self, adapter_id: str) -> list[AdapterVersion]:
        """Remove an adapter and all its versions; returns them. Blobs stay until
        `remove_blobs` (requests may still be loading them)."""
        with self._lock:
            versions = self.versions(adapter_id)
            through = self._last_version[adapter_id]
            tombstone = json.dumps({"through_version": through}).encode()
            self._write(self._path("manifests", adapter_id, TOMBSTONE), tombstone)
            self._writes += 1
            del self._adapters[adapter_id]
            for v in versions:  # tidy: the tombstone already hides them
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self._manifest_path(adapter_id, v.version))
            return versions

    def remove_blobs(self, digests: Set[str], keep: Set[str] = frozenset()) -> list[str]:
        """Remove the blobs of `digests` that no live version references and that are not in
        `keep` (e.g. being loaded); returns those removed."""
        with self._lock:
            used = {v.digest for vs in self._adapters.values() for v in vs}
        removed = []
        for digest in sorted(digests - used - keep):
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm(self.blob_path(digest), recursive=True)
                removed.append(digest)
        return removed

    def collect_orphans(
        self, min_age_s: float = ORPHAN_MIN_AGE_S, keep: Set[str] = frozenset()
    ) -> list[str]:
        """Remove blobs no manifest references (left by a crash before the commit point, or
        kept at a delete for a load) once they are older than `min_age_s` and not in `keep`,
        and stale staging directories; returns the digests."""
        with self._lock:
            used = {v.digest.removeprefix("sha256:") for vs in self._adapters.values() for v in vs}
        used |= {d.removeprefix("sha256:") for d in keep}
        now = time.time()
        orphans = []
        try:
            blobs = self.fs.ls(self._path("blobs"), detail=False)
        except FileNotFoundError:  # object stores have no empty directories
            blobs = []
        for path in blobs:
            name = path.rstrip("/").rsplit("/", 1)[-1]
            if name in used or now - self._mtime(path) < min_age_s:
                continue
            self.fs.rm(path, recursive=True)
            orphans.append("sha256:" + name if not name.startswith(".") else name)
        if self.local:
            for stale in self.staging_dir.glob("incoming-*"):
                if now - stale.stat().st_mtime >= min_age_s:
                    shutil.rmtree(stale, ignore_errors=True)
        if orphans:
            log.info("removed %d orphan blobs from the adapter store", len(orphans))
        return orphans

    def _mtime(self, path: str) -> float:
        if self.local:
            return os.stat(path).st_mtime
        # An S3 "directory" has no time of its own: the newest of its files.
        times = [info.get("LastModified") for info in self.fs.find(path, detail=True).values()]
        stamps = [t.timestamp() for t in times if t is not None]
        return max(stamps, default=time.time())

    def _put_blob(self, staged: Path, digest: str) -> None:
        target = self.blob_path(digest)
        if self.local:
            if Path(target).is_dir():
                return
            # Fill a private directory, then rename it into place: all files or none.
            tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=self._path("blobs")))
            try:
                for name in ADAPTER_FILES:
                    shutil.copyfile(staged / name, tmp / name)
                    _fsync(tmp / name)
                os.replace(tmp, target)
                _fsync(Path(self._path("blobs")))
            except OSError:
                if not Path(target).is_dir():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            return
        for name in ADAPTER_FILES:  # each PUT is atomic; the manifest comes after both
            remote = f"{target}/{name}"
            if not self.fs.exists(remote):
                self.fs.put_file(str(staged / name), remote)

    def _write(self, path: str, data: bytes, exclusive: bool = False) -> None:
        """Write a small object atomically; with `exclusive`, fail if it exists."""
        if not self.local:
            if exclusive and self.fs.exists(path):
                raise FileExistsError(f"{path} exists: another writer took this version")
            self.fs.pipe_file(path, data)
            return
        directory = Path(path).parent
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            if exclusive:
                os.link(tmp, path)  # atomic, and fails if another writer got there first
            else:
                os.replace(tmp, path)
            _fsync(directory)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _migrate_registry_json(self) -> None:
        """Stores written by loraplex 0.1 kept one registry.json: turn it into manifests."""
        old = Path(self.root) / "registry.json"
        if not self.local or not old.is_file():
            return
        data = json.loads(old.read_text(encoding="utf-8"))
        for records in data["adapters"].values():
            for r in records:
                record = AdapterVersion(**{**r, "target_modules": tuple(r["target_modules"])})
                path = self._manifest_path(record.adapter_id, record.version)
                if not Path(path).exists():
                    self._write(path, _manifest(record))
        for name, last in data.get("last_version", {}).items():
            if name not in data["adapters"]:
                self._write(
                    self._path("manifests", name, TOMBSTONE),
                    json.dumps({"through_version": last}).encode(),
                )
        os.replace(old, old.with_suffix(".json.migrated"))
        log.info("migrated %s to per-version manifests", old)


_OPTIONAL_FIELDS = ("chat_template",)  # written only when set (see the module docstring)
_MANIFEST_FIELDS = frozenset(f.name for f in fields(AdapterVersion))


def _manifest(record: AdapterVersion) -> bytes:
    data = asdict(record)
    for name in _OPTIONAL_FIELDS:
        if not data[name]:
            del data[name]
    return json.dumps(data, indent=1).encode()


def _parse_manifest(data: bytes) -> AdapterVersion:
    record = json.loads(data)
    record["target_modules"] = tuple(record["target_modules"])
    return AdapterVersion(**{k: v for k, v in record.items() if k in _MANIFEST_FIELDS})


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
