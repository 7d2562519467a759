"""What the runtime answers with: adapters, cache tiers, the merge and the model as the API shows
them. Each front end converts these to its protocol's messages, field by field."""

from __future__ import annotations

from dataclasses import dataclass

from loraplex.adapters.compositions import Composition
from loraplex.core.types import AdapterVersion, KernelChoice, TierStats
from loraplex.server.engine.state import PrefixCacheView


@dataclass(frozen=True)
class AdapterView:
    """An adapter: its latest version (or the one just registered), every version held, and how
    this server holds it now."""

    version: AdapterVersion
    versions: tuple[int, ...]
    pinned: bool = False  # kept in a device slot and host memory
    merged: bool = False  # folded into the base weights
    composition: Composition | None = None  # a composed adapter's inputs and method


@dataclass(frozen=True)
class Registration:
    adapter: AdapterView
    created: bool  # False: the same content was registered already (nothing changed)
    # The source's entries besides the adapter's files and its chat template's source
    # (tokenizer files, optimizer state, checkpoints...): left unopened, not stored.
    ignored_files: tuple[str, ...] = ()


@dataclass(frozen=True)
class TierView:
    """One cache tier's state and counters."""

    tier: str  # "device" or "host"
    resident: int  # adapters held
    capacity: int  # slots (device); 0 where a byte budget bounds the tier
    used_bytes: int
    budget_bytes: int
    stats: TierStats


@dataclass(frozen=True)
class CacheView:
    tiers: tuple[TierView, ...]
    pinned: tuple[str, ...]  # pinned adapter ids, sorted
    prefix_cache: PrefixCacheView | None = None  # None: --no-prefix-cache


@dataclass(frozen=True)
class MergeView:
    """What is folded into the base now, and the merge policy's view of the traffic."""

    adapter_id: str  # "" when nothing is merged
    version: int
    pinned: bool
    policy: str
    token_share: float  # of the merged adapter, else of the leading one
    leading_adapter_id: str
    merges: int
    unmerges: int
    last_merge_seconds: float
    last_unmerge_seconds: float


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    model_type: str
    quantization: str
    device: str
    dtype: str
    max_context_length: int
    vocab_size: int
    num_layers: int
    supported_target_modules: tuple[str, ...]
    max_lora_rank: int
    max_loras: int
    max_batch_size: int
    base_model_fingerprint: str
    version: str
    has_chat_template: bool
    dtype_choice: str = ""
    machine: str = ""
    base_kernels: tuple[KernelChoice, ...] = ()
    dense_cache_bytes: int = 0
    max_loras_choice: str = ""
