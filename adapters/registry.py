"""Registration: an adapter id and a source directory in, a validated stored version out."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from loraplex.adapters.errors import AdapterSourceDenied, InvalidAdapter, InvalidAdapterId
from loraplex.adapters.store import ADAPTER_FILES, AdapterStore, AdapterVersion, digest_files
from loraplex.adapters.validate import AdapterWeights, BaseModelSpec, load_adapter

log = logging.getLogger(__name__)

ADAPTER_ID = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


def check_adapter_id(adapter_id: str) -> str:
    if not ADAPTER_ID.match(adapter_id) or ".." in adapter_id:
        raise InvalidAdapterId(
            f"adapter_id {adapter_id[:80]!r} is not a valid id: use 1-63 characters of "
            "a-z, 0-9, '.', '_' or '-', starting with a letter or digit"
        )
    return adapter_id


class AdapterRegistry:
    """Validates adapters against the base model before storing them, and loads stored ones."""

    def __init__(self, store: AdapterStore, spec: BaseModelSpec, allowed_roots: list[Path]) -> None:
        self.store = store
        self.spec = spec
        self.allowed_roots = [r.resolve() for r in allowed_roots]

    def register(self, adapter_id: str, path: str) -> tuple[AdapterVersion, bool]:
        """Check, validate and store an adapter in one go (on the calling thread)."""
        source = self.check_source(adapter_id, path)
        return self.add(adapter_id, source, load_adapter(source, self.spec))

    def check_source(self, adapter_id: str, path: str) -> Path:
        """The first, file-system-only step of registering: the id and the source directory."""
        check_adapter_id(adapter_id)
        return self._resolve_source(path)

    def validate(self, source: Path) -> AdapterWeights:
        """The tensor step of registering (the server runs it on its engine thread)."""
        return load_adapter(source, self.spec)

    def add(
        self, adapter_id: str, source: Path, weights: AdapterWeights
    ) -> tuple[AdapterVersion, bool]:
        """The last step: store the validated adapter under its content digest."""
        digest = digest_files(source)
        version, created = self.store.add(
            adapter_id,
            source,
            digest,
            rank=weights.rank,
            lora_alpha=weights.lora_alpha,
            target_modules=weights.target_modules,
            base_model_fingerprint=self.spec.fingerprint,
        )
        log.info(
            "adapter %s version %d %s (%s, rank %d, %s)",
            adapter_id,
            version.version,
            "registered" if created else "already registered",
            digest[:19],
            weights.rank,
            ",".join(weights.target_modules),
        )
        return version, created

    def resolve(self, adapter_id: str) -> AdapterVersion:
        """The version a new request for `adapter_id` is served with."""
        check_adapter_id(adapter_id)
        return self.store.latest(adapter_id)

    def load_weights(self, version: AdapterVersion) -> AdapterWeights:
        """Read a stored version's weights (validated again: the blob is read from disk)."""
        return load_adapter(self.store.blob_dir(version.digest), self.spec)

    def _resolve_source(self, path: str) -> Path:
        if not path or "\0" in path:
            raise InvalidAdapter("path must name an adapter directory")
        source = Path(path).expanduser().resolve()  # follows symlinks: checked below
        if not any(source.is_relative_to(root) for root in self.allowed_roots):
            raise AdapterSourceDenied(
                f"path {path!r} is outside the server's allowed adapter roots"
            )
        if not source.is_dir():
            raise InvalidAdapter(f"path {path!r} is not a directory")
        for name in ADAPTER_FILES:
            f = source / name
            if f.is_symlink() and not any(
                f.resolve().is_relative_to(root) for root in self.allowed_roots
            ):
                raise AdapterSourceDenied(f"{name} links outside the allowed adapter roots")
        return source
