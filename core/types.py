"""The domain types every part shares: an adapter version (a manifest in the store), its
validated weights, what an adapter must fit to serve on the base model, and the counters of an
adapter cache tier (host memory or device slots)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch


class AdapterKey(NamedTuple):
    """One version of one adapter: what a device slot or a merge holds."""

    adapter_id: str
    version: int


@dataclass(frozen=True)
class AdapterVersion:
    """One registered version of an adapter: its manifest."""

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
    tenant: str = ""  # the tenant that owns it
    shared: bool = False  # every tenant may use it
    # The adapter's own chat template (Jinja, checked at registration), applied to its chat
    # requests in place of the base's; "" for none. Not in repr: it may be kilobytes long.
    chat_template: str = field(default="", repr=False)

    @property
    def key(self) -> AdapterKey:
        return AdapterKey(self.adapter_id, self.version)


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter: per module (A (r, in), B (out, r) scaled), float32, contiguous."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]  # short names, e.g. ("q_proj", "v_proj")
    scaling: float = 1.0  # PEFT's alpha/r (or alpha/sqrt(r)), already folded into every B

    @property
    def nbytes(self) -> int:
        """Host memory held by the tensors (the host cache's size of this adapter)."""
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the base's LoRA-capable linear layers and the server's limits."""

    linear_shapes: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    max_rank: int
    fingerprint: str
    max_bytes: int = 1 << 30  # of adapter_model.safetensors


@dataclass
class TierStats:
    """Counters of one cache tier (host or device)."""

    hits: int = 0
    misses: int = 0  # requests that waited for a load from the tier below
    evictions: int = 0
    loads: int = 0  # loads that completed (concurrent misses share one)
    load_seconds: float = 0.0  # their total time
    load_failures: int = 0
    # Called with each completed load's time (metrics); must not block.
    load_observers: list[Callable[[float], None]] = field(
        default_factory=list, repr=False, compare=False
    )

    def loaded(self, seconds: float) -> None:
        """Count a completed load."""
        self.loads += 1
        self.load_seconds += seconds
        for observe in self.load_observers:
            observe(seconds)


@dataclass(frozen=True)
class KernelChoice:
    """What a group of layers of one shape uses from `min_rows` rows up (for ModelInfo)."""

    shape: tuple[int, int]  # (in, out)
    min_rows: int
    kernel: str
    layers: int
