"""What other threads may know of the engine: facts fixed once it has started (`EngineInfo`),
and snapshots of its state that the engine thread builds between two steps (`EngineSnapshot`).
Nothing outside the engine thread reads its live state; these are copies.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from loraplex.core.types import AdapterKey, KernelChoice, TierStats


@dataclass(frozen=True)
class EngineInfo:
    """The served model, as the engine loaded it (safe to read from any thread)."""

    model_id: str
    model_type: str
    quantization: str
    device: str
    dtype: str
    vocab_size: int
    num_layers: int
    fingerprint: str  # the base weights' identity (adapters are registered against it)
    max_context: int  # longest sequence served: prompt + new tokens
    target_shapes: dict[str, tuple[int, int]]  # LoRA-capable module -> (in, out), model order
    tokenizer: object  # a transformers tokenizer
    dtype_choice: str = ""  # why this compute dtype (the flag, or what auto measured)
    machine: str = ""  # what measured choices are for: capability, torch, threads
    base_kernels: tuple[KernelChoice, ...] = ()  # the 4-bit layers' kernels
    dense_cache_bytes: int = 0  # held by dense copies of 4-bit layers
    max_loras: int = 0  # device slots
    max_loras_choice: str = ""  # why that many (the flag, or what auto found)
    eos_token_ids: tuple[int, ...] = ()  # the tokens that end a sequence


@dataclass
class EngineStats:
    """Counters of the engine's work since it started."""

    prefill_steps: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    max_batch_size: int = 0
    mixed_adapter_steps: int = 0  # decode steps whose batch held more than one adapter (or base)
    mixed_prefill_decode_steps: int = 0  # steps that decoded and prefilled in one forward
    prefill_tokens: int = 0
    adapter_loads: int = 0


@dataclass(frozen=True)
class SlotView:
    """One occupied device slot."""

    slot: int
    adapter: AdapterKey
    refcount: int  # running requests (and a pin, and a merge) that hold it
    pinned: bool


@dataclass(frozen=True)
class MergeState:
    """The adapter folded into the base, if any, and the merge policy's view of the traffic."""

    adapter: AdapterKey | None = None
    pinned: bool = False  # by an operator: the policy leaves it alone
    merges: int = 0
    unmerges: int = 0
    last_merge_s: float = 0.0
    last_unmerge_s: float = 0.0
    leader: AdapterKey | None = None  # the adapter with the most tokens at the policy's last look
    leader_share: float = 0.0
    merged_share: float = 0.0


@dataclass(frozen=True)
class PrefixCacheView:
    """The prefix cache's counters (tokens, as vLLM counts them) and occupancy."""

    queries: int  # prompt tokens looked up
    hits: int  # of them, found cached
    used_blocks: int
    blocks: int
    block_tokens: int

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state between two steps."""

    running: int  # sequences in the running batch
    waiting: int  # requests queued for admission
    queued_tokens: int  # their prompt tokens
    running_adapters: tuple[str, ...]  # ids of the adapters running requests use, sorted
    waiting_adapters: tuple[str, ...]  # ids of the adapters queued requests name, sorted
    kv_cache_usage: float  # share of the KV cache's token budget (paged: blocks) reserved
    kv_rows_used: int
    num_slots: int
    slots: tuple[SlotView, ...]  # occupied device slots, by slot
    device_tier: TierStats  # the device slots' cache counters (a copy)
    merge: MergeState
    stats: EngineStats = field(default_factory=EngineStats)  # a copy
    prefix_cache: PrefixCacheView | None = None  # None: --no-prefix-cache
    kv_blocks: tuple[int, int] | None = None  # the paged cache's (blocks, in use); None: rows

    def slot_of(self, key: AdapterKey) -> int | None:
        """The slot holding `key`, if it is resident."""
        return next((s.slot for s in self.slots if s.adapter == key), None)
