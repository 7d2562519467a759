"""Registration: an adapter id and a source (directory, URI or upload) in, a validated stored
version out; and the way back, a stored version's weights for the host cache."""

from __future__ import annotations

import logging
import math
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from loraplex.adapters.chat_template import read_chat_template
from loraplex.adapters.compositions import COMPOSED_ID, is_composed_id
from loraplex.adapters.sources import (
    Staged,
    Upload,
    is_uri,
    source_prefix,
    stage_directory,
    stage_uri,
)
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.validate import load_adapter
from loraplex.core.errors import AdapterNotFound, InvalidAdapter, InvalidAdapterId, shown
from loraplex.core.types import AdapterVersion, AdapterWeights, BaseModelSpec

log = logging.getLogger(__name__)

ADAPTER_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")  # fullmatched: no trailing newline
INVALID_ID = "(invalid id)"  # what logs and metrics show for an id that is not one
# An unknown id re-reads the store (a replica may have registered it); the same id again
# within this many seconds does not.
MISS_REFRESH_S = 2.0
_MAX_MISSES_KEPT = 10_000


class SourceRegistration(NamedTuple):
    """What registering a source did."""

    version: AdapterVersion
    created: bool  # False: the same content was already the latest version (nothing changed)
    # The source's entries besides the files registration reads, left unopened (see
    # entries.py), sorted, as `listed_name` shows them; only the adapter's files are stored.
    ignored_files: tuple[str, ...]


def is_valid_id(adapter_id: object, composed: bool = False) -> bool:
    """Whether `adapter_id` is a registrable id (or, with `composed`, a composition's derived
    id): short, and of characters that are safe in paths, logs and metric labels."""
    if not isinstance(adapter_id, str):
        return False
    if is_composed_id(adapter_id):  # the prefix is reserved: only the exact derived form
        return composed and COMPOSED_ID.fullmatch(adapter_id) is not None
    return ADAPTER_ID.fullmatch(adapter_id) is not None and ".." not in adapter_id


def check_adapter_id(adapter_id: str, *, composed: bool = False) -> str:
    """`adapter_id` if it is valid (see `is_valid_id`); InvalidAdapterId otherwise, echoing a
    bounded part of it. Every id a caller names passes here before it is looked up, logged or
    echoed; a composed one (`composed`) must have the exact form of a derived id."""
    if not is_valid_id(adapter_id, composed):
        raise InvalidAdapterId(
            f"adapter_id {shown(adapter_id)} is not a valid id: use 1-63 characters of "
            "a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
        )
    return adapter_id


def check_new_adapter_id(adapter_id: str) -> str:
    """An id to register under: valid, and not of the form reserved for compositions."""
    if is_composed_id(adapter_id):
        raise InvalidAdapterId(
            f"adapter_id {shown(adapter_id)}: ids starting with 'composed-' name compositions; "
            "register the adapter under another id"
        )
    return check_adapter_id(adapter_id)


def loggable_id(adapter_id: str) -> str:
    """`adapter_id` as a log line or a metric may show it: as it is when it is a valid id (of
    an adapter or a composition), else INVALID_ID (what a client sent is never echoed raw)."""
    return adapter_id if not adapter_id or is_valid_id(adapter_id, composed=True) else INVALID_ID


class AdapterRegistry:
    """Validates adapters against the base model before they are stored. Thread-safe; its
    methods block (file and network I/O): call them off the event loop."""

    def __init__(
        self,
        store: AdapterStore,
        spec: BaseModelSpec,
        allowed_roots: Sequence[Path | str],
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        self.store = store
        self.spec = spec
        # Local roots for directories, URI prefixes for object stores (none: no URI at all).
        self.allowed_roots = [Path(r).resolve() for r in allowed_roots if not is_uri(str(r))]
        self.uri_roots = [source_prefix(str(r)) for r in allowed_roots if is_uri(str(r))]
        self.storage_options = dict(storage_options or {})
        self._lock = threading.Lock()
        self._misses: dict[str, float] = {}  # unknown id -> when it last made us re-read

    def register(
        self, adapter_id: str, source: str, tenant: str = "", shared: bool = False
    ) -> SourceRegistration:
        """Stage, validate and keep an adapter from a directory or URI. A failure at any step
        leaves nothing behind."""
        check_new_adapter_id(adapter_id)

        def stage(staging: Path) -> Staged:
            if is_uri(source):
                return stage_uri(
                    source, self.uri_roots, self.storage_options, staging, self.spec.max_bytes
                )
            return stage_directory(source, self.allowed_roots, staging, self.spec.max_bytes)

        return self._register(adapter_id, stage, tenant, shared)

    def new_upload(self) -> Upload:
        return Upload(self.store.new_staging_dir(), self.spec.max_bytes)

    def register_upload(
        self, adapter_id: str, upload: Upload, tenant: str = "", shared: bool = False
    ) -> SourceRegistration:
        """Validate and keep a finished upload (its staging directory is consumed)."""
        check_new_adapter_id(adapter_id)

        def staged(staging: Path) -> Staged:
            upload.finish()
            return Staged("upload", upload.ignored)

        try:
            return self._register(adapter_id, staged, tenant, shared, upload.staging)
        finally:
            self.discard_upload(upload)

    def discard_upload(self, upload: Upload) -> None:
        upload.close()
        shutil.rmtree(upload.staging, ignore_errors=True)

    def resolve(self, adapter_id: str) -> AdapterVersion:
        """The version a new request for `adapter_id` is served with."""
        check_adapter_id(adapter_id)
        try:
            return self.store.latest(adapter_id)
        except AdapterNotFound:
            now = time.monotonic()
            with self._lock:
                if now - self._misses.get(adapter_id, -math.inf) < MISS_REFRESH_S:
                    raise
                if len(self._misses) >= _MAX_MISSES_KEPT:
                    self._misses.clear()
                self._misses[adapter_id] = now
            self.store.refresh()  # a replica may have registered it
            return self.store.latest(adapter_id)

    def delete(self, adapter_id: str) -> list[AdapterVersion]:
        return self.store.delete(check_adapter_id(adapter_id))

    def load_weights(self, version: AdapterVersion) -> AdapterWeights:
        """Read a stored version's weights: digest checked, validated again."""
        try:
            with self.store.open_blob(version.digest) as blob:
                return load_adapter(blob, self.spec)
        except FileNotFoundError:
            raise AdapterNotFound(
                f"adapter {version.adapter_id!r} version {version.version} was deleted"
            ) from None
        except InvalidAdapter as exc:  # the server's own copy is damaged: not the client's fault
            raise RuntimeError(
                f"stored adapter {version.adapter_id!r} v{version.version} is corrupt: {exc}"
            ) from exc

    def _register(
        self,
        adapter_id: str,
        stage: Callable[[Path], Staged],
        tenant: str,
        shared: bool,
        staging: Path | None = None,
    ) -> SourceRegistration:
        staging = staging or self.store.new_staging_dir()
        try:
            staged = stage(staging)
            weights = load_adapter(staging, self.spec)
            template = read_chat_template(staging)
            version, created = self.store.commit(
                adapter_id,
                staging,
                rank=weights.rank,
                lora_alpha=weights.lora_alpha,
                target_modules=weights.target_modules,
                base_model_fingerprint=self.spec.fingerprint,
                source=staged.source,
                tenant=tenant,
                shared=shared,
                chat_template=template.text,
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        ignored = tuple(sorted(staged.ignored + template.unused))
        log.info(
            "adapter %s version %d %s (%s, rank %d, %s%s)%s",
            adapter_id,
            version.version,
            "registered" if created else "already registered",
            version.digest[:19],
            weights.rank,
            ",".join(weights.target_modules),
            f", chat template from {template.source}" if template.text else "",
            f"; ignored {len(ignored)}: {shown(', '.join(ignored), 400)}" if ignored else "",
        )
        return SourceRegistration(version, created, ignored)
