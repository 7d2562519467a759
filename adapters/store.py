"""The adapter store: id -> versions, persisted, with content-addressed blobs.

Layout under the store root:

    registry.json                  {"adapters": {id: [version record, ...]}}
    blobs/<sha256 hex>/            adapter_config.json + adapter_model.safetensors

Every write goes to a temporary name first and is renamed into place, so a crash never
leaves a half-registered adapter visible. The store is thread-safe.
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
        self._adapters: dict[str, list[AdapterVersion]] = self._read_registry()

    def blob_dir(self, digest: str) -> Path:
        return self._blobs / digest.removeprefix("sha256:")

    def add(
        self,
        adapter_id: str,
        src_dir: Path,
        digest: str,
        rank: int,
        lora_alpha: float,
        target_modules: tuple[str, ...],
        base_model_fingerprint: str,
    ) -> tuple[AdapterVersion, bool]:
        """Store a validated adapter; returns (version, created). The same content under the
        same id is a no-op; new content becomes the next version."""
        with self._lock:
            versions = self._adapters.get(adapter_id, [])
            if versions and versions[-1].digest == digest:
                return versions[-1], False
            self._write_blob(src_dir, digest)
            record = AdapterVersion(
                adapter_id=adapter_id,
                version=(versions[-1].version + 1) if versions else 1,
                digest=digest,
                rank=rank,
                lora_alpha=lora_alpha,
                target_modules=target_modules,
                size_bytes=sum((src_dir / n).stat().st_size for n in ADAPTER_FILES),
                created_at=datetime.now(UTC).isoformat(timespec="seconds"),
                source=str(src_dir),
                base_model_fingerprint=base_model_fingerprint,
            )
            updated = {**self._adapters, adapter_id: [*versions, record]}
            self._write_registry(updated)
            self._adapters = updated
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
            self._write_registry(updated)
            self._adapters = updated
            still_used = {v.digest for vs in updated.values() for v in vs}
            for digest in {v.digest for v in versions} - still_used:
                shutil.rmtree(self.blob_dir(digest), ignore_errors=True)
            return [v.version for v in versions]

    def _write_blob(self, src_dir: Path, digest: str) -> None:
        target = self.blob_dir(digest)
        if target.exists():
            return
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self._blobs))
        try:
            for name in ADAPTER_FILES:
                shutil.copyfile(src_dir / name, staging / name)
            if digest_files(staging) != digest:
                raise RuntimeError("adapter files changed while they were being registered")
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _read_registry(self) -> dict[str, list[AdapterVersion]]:
        if not self._registry_path.exists():
            return {}
        data = json.loads(self._registry_path.read_text(encoding="utf-8"))
        return {
            adapter_id: [
                AdapterVersion(**{**r, "target_modules": tuple(r["target_modules"])})
                for r in records
            ]
            for adapter_id, records in data["adapters"].items()
        }

    def _write_registry(self, adapters: dict[str, list[AdapterVersion]]) -> None:
        data = {"adapters": {k: [asdict(v) for v in vs] for k, vs in adapters.items()}}
        fd, tmp = tempfile.mkstemp(prefix=".registry-", dir=self.root)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self._registry_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
