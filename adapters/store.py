"""The adapter store: id -> versions, persisted, with content-addressed blobs.

Layout under the store root:

    registry.json                  {"adapters": {id: [version record, ...]},
                                    "last_version": {id: n}}  (versions are never reused)
    blobs/<sha256 hex>/            adapter_config.json + adapter_model.safetensors
    blobs/.staging-*/              copies being validated; never referenced

An adapter is copied into staging first, and what is validated, digested and kept is that
copy, so a source changing underneath cannot slip in unvalidated bytes. Every write is
fsynced and renamed into place: a crash never leaves a half-registered adapter visible.
The store is thread-safe.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from loraplex.adapters.errors import AdapterNotFound

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass(frozen=True)
class AdapterVersion:
    """One registered version of an adapter."""

    adapter_id: str
    version: int
    digest: str  # "sha256:<hex>" over the adapter files
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]
    size_bytes: int
    created_at: str  # RFC 3339, UTC
    source: str
    base_model_fingerprint: str

    @property
    def key(self) -> tuple[str, int]:
        return (self.adapter_id, self.version)


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


class AdapterStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs"
        self._registry_path = root / "registry.json"
        self._lock = threading.Lock()
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._adapters, self._last_version = self._read_registry()

    def blob_dir(self, digest: str) -> Path:
        return self._blobs / digest.removeprefix("sha256:")

    def stage(self, src_dir: Path) -> Path:
        """Copy an adapter's files into a private staging directory (fsynced)."""
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self._blobs))
        for name in ADAPTER_FILES:
            shutil.copyfile(src_dir / name, staging / name)
            _fsync(staging / name)
        return staging

    def discard_staged(self, staged: Path) -> None:
        shutil.rmtree(staged, ignore_errors=True)

    def commit(
        self,
        adapter_id: str,
        staged: Path,
        rank: int,
        lora_alpha: float,
        target_modules: tuple[str, ...],
        base_model_fingerprint: str,
        source: str,
    ) -> tuple[AdapterVersion, bool]:
        """Keep a staged, validated adapter; returns (version, created). The same content under
        the same id is a no-op; new content becomes the next version."""
        digest = digest_files(staged)
        with self._lock:
            versions = self._adapters.get(adapter_id, [])
            if versions and versions[-1].digest == digest:
                return versions[-1], False
            blob = self.blob_dir(digest)
            if not blob.exists():
                os.replace(staged, blob)
                _fsync(self._blobs)
            record = AdapterVersion(
                adapter_id=adapter_id,
                version=self._last_version.get(adapter_id, 0) + 1,
                digest=digest,
                rank=rank,
                lora_alpha=lora_alpha,
                target_modules=target_modules,
                size_bytes=sum((blob / n).stat().st_size for n in ADAPTER_FILES),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                source=source,
                base_model_fingerprint=base_model_fingerprint,
            )
            adapters = {**self._adapters, adapter_id: [*versions, record]}
            last_version = {**self._last_version, adapter_id: record.version}
            self._write_registry(adapters, last_version)
            self._adapters, self._last_version = adapters, last_version
            return record, True

    def latest(self, adapter_id: str) -> AdapterVersion:
        with self._lock:
            versions = self._adapters.get(adapter_id)
            if not versions:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
            return versions[-1]

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

    def delete(self, adapter_id: str) -> list[int]:
        """Remove an adapter and all its versions; returns the versions removed. Blobs no
        other adapter references are removed too."""
        with self._lock:
            versions = self._adapters.get(adapter_id)
            if not versions:
                raise AdapterNotFound(f"adapter {adapter_id!r} is not registered")
            updated = {k: v for k, v in self._adapters.items() if k != adapter_id}
            self._write_registry(updated, self._last_version)
            self._adapters = updated
            still_used = {v.digest for vs in updated.values() for v in vs}
            for digest in {v.digest for v in versions} - still_used:
                shutil.rmtree(self.blob_dir(digest), ignore_errors=True)
            return [v.version for v in versions]

    def _read_registry(self) -> tuple[dict[str, list[AdapterVersion]], dict[str, int]]:
        if not self._registry_path.exists():
            return {}, {}
        data = json.loads(self._registry_path.read_text(encoding="utf-8"))
        adapters = {
            adapter_id: [
                AdapterVersion(**{**r, "target_modules": tuple(r["target_modules"])})
                for r in records
            ]
            for adapter_id, records in data["adapters"].items()
        }
        return adapters, dict(data.get("last_version", {}))

    def _write_registry(
        self, adapters: dict[str, list[AdapterVersion]], last_version: dict[str, int]
    ) -> None:
        data = {
            "adapters": {k: [asdict(v) for v in vs] for k, vs in adapters.items()},
            "last_version": last_version,
        }
        fd, tmp = tempfile.mkstemp(prefix=".registry-", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._registry_path)
            _fsync(self.root)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _fsync(path: Path) -> None:
    """Flush a file, or a directory's entries, to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
