"""The domain types every part shares: an adapter version (a manifest in the store), its
validated weights, and what an adapter must fit to serve on the base model."""

from __future__ import annotations

from dataclasses import dataclass
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
