"""Registration: an adapter id and a source directory in, a validated stored version out."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from loraplex.adapters.errors import (
    AdapterNotFound,
    AdapterSourceDenied,
    InvalidAdapter,
    InvalidAdapterId,
)
from loraplex.adapters.store import ADAPTER_FILES, AdapterStore, AdapterVersion
from loraplex.adapters.validate import (
    AdapterWeights,
    BaseModelSpec,
    check_no_pickle,
    load_adapter,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
TensorRunner = Callable[[Callable[[], AdapterWeights]], AdapterWeights]


def _on_this_thread(fn: Callable[[], T]) -> T:
    return fn()


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

    def register(
        self, adapter_id: str, path: str, run: TensorRunner = _on_this_thread
    ) -> tuple[AdapterVersion, bool]:
        """Check, stage, validate and keep an adapter; returns (version, created).

        `run` executes the tensor work (validation): the server passes its engine thread's.
        A failure at any step leaves nothing behind.
        """
        check_adapter_id(adapter_id)
        source = self._resolve_source(path)
        staged = self.store.stage(source)
        try:
            weights = run(lambda: load_adapter(staged, self.spec))
            version, created = self.store.commit(
                adapter_id,
                staged,
                rank=weights.rank,
                lora_alpha=weights.lora_alpha,
                target_modules=weights.target_modules,
                base_model_fingerprint=self.spec.fingerprint,
                source=str(source),
            )
        finally:
            self.store.discard_staged(staged)  # a no-op once it moved into place
        log.info(
            "adapter %s version %d %s (%s, rank %d, %s)",
            adapter_id,
            version.version,
            "registered" if created else "already registered",
            version.digest[:19],
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
        blob = self.store.blob_dir(version.digest)
        if not blob.is_dir():
            raise AdapterNotFound(
                f"adapter {version.adapter_id!r} version {version.version} was deleted"
            )
        try:
            return load_adapter(blob, self.spec)
        except InvalidAdapter as exc:  # the server's own copy is damaged: not the client's fault
            raise RuntimeError(
                f"stored adapter {version.adapter_id!r} v{version.version} is corrupt: {exc}"
            ) from exc

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
        check_no_pickle(source)  # only the safetensors files are staged: look at the source
        for name in ADAPTER_FILES:
            f = source / name
            if f.is_symlink() and not any(
                f.resolve().is_relative_to(root) for root in self.allowed_roots
            ):
                raise AdapterSourceDenied(f"{name} links outside the allowed adapter roots")
        return source
