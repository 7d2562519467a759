"""The device slot table: which adapter version sits in which slot, who is using it, LRU order.

The engine thread is its only user, so it holds no lock. A slot is held while any running
request references it (refcount > 0) and is never evicted then; a pinned adapter holds one
reference for as long as it is pinned. Among unreferenced slots the least recently used one is
reused first.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Set
from dataclasses import dataclass

from loraplex.core.types import AdapterKey, TierStats


@dataclass
class SlotEntry:
    key: AdapterKey
    refcount: int = 0


@dataclass(frozen=True)
class SlotGrant:
    """The result of acquiring a slot for an adapter."""

    slot: int
    needs_load: bool  # the slot does not hold this adapter yet: the caller must write weights
    evicted: AdapterKey | None  # the adapter that was in the slot before, if any


class SlotTable:
    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._entries: dict[int, SlotEntry] = {}
        self._by_key: dict[AdapterKey, int] = {}
        # Unreferenced resident slots, least recently used first.
        self._lru: OrderedDict[int, None] = OrderedDict()
        self._pinned: set[int] = set()
        # Slots the engine holds for itself (the adapter merged into the base): a reference
        # that does not end when requests do, so never worth draining.
        self.held: set[int] = set()
        self.stats = TierStats()

    def set_limit(self, num_slots: int) -> None:
        """Change the number of slots (--max-loras auto follows the memory the adapters
        loaded need). Fewer: unreferenced adapters in the slots beyond are evicted now,
        referenced ones when their last reference is released; nothing new goes there."""
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        for slot in [s for s in self._lru if s >= num_slots]:
            self._evict(slot)

    def _evict(self, slot: int) -> AdapterKey:
        self._lru.pop(slot, None)
        key = self._entries.pop(slot).key
        del self._by_key[key]
        self.stats.evictions += 1
        return key

    def lookup(self, key: AdapterKey) -> int | None:
        return self._by_key.get(key)

    def acquire(self, key: AdapterKey) -> SlotGrant | None:
        """Reference `key`'s slot, choosing (and evicting) one if it is not resident.

        Returns None when every slot is referenced by running requests.
        """
        slot = self._by_key.get(key)
        if slot is not None:
            self._take(slot)
            self.stats.hits += 1
            return SlotGrant(slot=slot, needs_load=False, evicted=None)
        grant = self._claim(key, protect=frozenset())
        if grant is None:
            return None
        self.stats.misses += 1
        self._take(grant.slot)
        return grant

    def prefetch(self, key: AdapterKey, protect: Set[AdapterKey]) -> SlotGrant | None:
        """Place `key` (not resident) in a free slot, or in the least recently used
        unreferenced one unless it holds an adapter in `protect` (wanted sooner). The slot
        stays unreferenced: the most recently used, so next to be reused. None: no room."""
        grant = self._claim(key, protect)
        if grant is not None:
            self._lru[grant.slot] = None
        return grant

    def _claim(self, key: AdapterKey, protect: Set[AdapterKey]) -> SlotGrant | None:
        evicted: AdapterKey | None = None
        free = [s for s in range(self.num_slots) if s not in self._entries]
        if free:
            slot = free[0]
        else:
            victim = next((s for s in self._lru if self._entries[s].key not in protect), None)
            if victim is None:
                return None
            slot = victim
            evicted = self._evict(slot)
        self._entries[slot] = SlotEntry(key)
        self._by_key[key] = slot
        return SlotGrant(slot=slot, needs_load=True, evicted=evicted)

    def pin(self, key: AdapterKey) -> SlotGrant | None:
        """Hold `key` in a slot until `unpin` (at least one slot is left for the rest)."""
        if key in self.pinned_keys():
            raise ValueError(f"adapter {key[0]} v{key[1]} is already pinned")
        if self.reserved() >= self.num_slots - 1:
            return None
        grant = self.acquire(key)
        if grant is not None:
            self._pinned.add(grant.slot)
        return grant

    def unpin(self, key: AdapterKey) -> None:
        slot = self._by_key.get(key)
        if slot is None or slot not in self._pinned:
            raise ValueError(f"adapter {key[0]} v{key[1]} is not pinned")
        self._pinned.discard(slot)
        self.release(slot)

    def drain_candidate(self, exclude: Set[int]) -> int | None:
        """The referenced, unpinned slot with the fewest references (the lowest slot among
        equals), not in `exclude`: the one to stop sending new requests to, so it frees
        soonest for a waiting adapter. None when there is none."""
        held = [
            (entry.refcount, slot)
            for slot, entry in self._entries.items()
            if entry.refcount > 0
            and slot not in self._pinned
            and slot not in self.held
            and slot not in exclude
        ]
        return min(held)[1] if held else None

    def reserved(self) -> int:
        """Slots kept from the rest for good: pinned, or held for the merged adapter."""
        return len(self._pinned | self.held)

    def has_room(self) -> bool:
        """Whether an adapter not resident could get a slot now (free, or unreferenced)."""
        return any(s not in self._entries for s in range(self.num_slots)) or bool(self._lru)

    def pinned_keys(self) -> list[AdapterKey]:
        return [self._entries[s].key for s in sorted(self._pinned)]

    def release(self, slot: int) -> None:
        entry = self._entries[slot]
        if entry.refcount <= 0:
            raise RuntimeError(f"slot {slot} released more often than acquired")
        entry.refcount -= 1
        if entry.refcount == 0:
            self._lru[slot] = None  # most recently used
            if slot >= self.num_slots:  # beyond the limit, which fell while it was in use
                self._evict(slot)

    def discard(self, slot: int) -> None:
        """Forget an unreferenced slot's adapter (e.g. its load failed): the slot is free."""
        entry = self._entries[slot]
        if entry.refcount != 0:
            raise RuntimeError(f"slot {slot} is still referenced {entry.refcount} times")
        del self._entries[slot]
        del self._by_key[entry.key]
        self._lru.pop(slot, None)

    def refcount(self, slot: int) -> int:
        entry = self._entries.get(slot)
        return entry.refcount if entry else 0

    def resident(self) -> dict[int, AdapterKey]:
        """slot -> adapter key for every occupied slot."""
        return {slot: e.key for slot, e in self._entries.items()}

    def _take(self, slot: int) -> None:
        entry = self._entries[slot]
        entry.refcount += 1
        self._lru.pop(slot, None)
