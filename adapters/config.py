"""Where adapters are kept, and what `loraplex adapters export` does: the options of the store
(shared by `serve`) and of an export."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loraplex.core.config import ModelConfig

DEFAULT_MAX_ADAPTER_BYTES = 1 << 30


def path_or_url(value: str) -> Path | str:
    """A local path (expanded) or, kept as given, a URL such as s3://bucket/prefix."""
    return value if "://" in value else Path(value).expanduser()


@dataclass(frozen=True)
class StoreConfig:
    adapter_store: Path | str | None = field(
        default=None, metadata={"parse": path_or_url, "metavar": "DIR|URL"}
    )
    """Adapter store: a directory or an object-store URL (s3://bucket/prefix) that replicas
    share (default: HOME/adapters)."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, ...) for the store and s3:// sources (default:
    AWS). Credentials come from the usual AWS environment variables and files."""

    def store_location(self, home: Path) -> str:
        """The store's directory or URL (by default under the loraplex home)."""
        return str(self.adapter_store or home / "adapters")

    @property
    def storage_options(self) -> dict[str, object]:
        """fsspec options for object storage (the store and s3:// sources)."""
        if self.s3_endpoint_url:
            return {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}}
        return {}


@dataclass(frozen=True)
class ExportConfig:
    adapter: str = field(metadata={"positional": True, "metavar": "NAME"})
    """Adapter id (a directory with --from-dir)."""
    merged: Path = field(metadata={"metavar": "OUT"})
    """Directory to write: the base with the adapter merged in, a plain HF checkpoint."""
    version: int | None = None
    """Stored version (default: the latest)."""
    from_dir: bool = False
    """NAME is a local PEFT LoRA directory."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """dtype of the saved weights (the merge is computed in float32)."""
    force: bool = False
    """Replace a non-empty OUT."""
    store: StoreConfig = field(default_factory=StoreConfig)
    """The adapter store, as `serve` is given it."""
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"exclude": ("dtype",)})
    """The base as the server serves it (nf4: dequantized before the merge); its compute
    dtype is float32 here."""
