"""The host tier of the adapter cache: validated weights in memory, least recently used first
out under a byte budget, between the store and the device slots (slots.py).

Single flight: however many requests ask for an adapter at once, it is read from the store
once; they all wait on the same load. An entry that requests hold (or that is pinned) is never
evicted; when only held entries remain, the tier runs over its budget rather than fail anyone.
Loads run on a small pool of worker threads (file I/O and numpy, no torch compute), so they
overlap the engine's steps: the adapters of queued requests are fetched while the batch runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from loraplex.core.types import AdapterVersion, AdapterWeights, TierStats

log = logging.getLogger(__name__)

Loader = Callable[[AdapterVersion], AdapterWeights]

# The default budget: this share of the memory available at start (the slots take a quarter of
# it, the dense copies up to half), or a fixed size where the system cannot say.
MEMORY_SHARE = 8
FALLBACK_BUDGET_BYTES = 2 << 30


def default_budget(available_bytes: int) -> int:
    """The host tier's budget when none is configured, from the memory available at start."""
    return available_bytes // MEMORY_SHARE if available_bytes > 0 else FALLBACK_BUDGET_BYTES


@dataclass
class _Entry:
    future: Future[AdapterWeights]
    nbytes: int = 0
    refs: int = 0
    pinned: bool = False
    forgotten: bool = False  # its adapter was deleted: drop it once nobody holds it


@dataclass
class Lease:
    """A reference to a host-tier entry; `release` it exactly once (extra calls are no-ops)."""

    cache: HostCache
    digest: str
    weights: AdapterWeights
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.cache.release(self.digest)


class HostCache:
    """Thread-safe. Keyed by content digest: two names with one content share an entry."""

    def __init__(self, load: Loader, budget_bytes: int, workers: int = 2) -> None:
        self._load = load
        self.budget_bytes = budget_bytes
        self.stats = TierStats()
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # loaded, unheld entries; oldest first
        self._bytes = 0
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="loraplex-adapter-load")
        # Loads given their own function (composed adapters, built step by step on the engine
        # thread) wait long; they get threads of their own, so store loads never queue behind.
        self._builds = ThreadPoolExecutor(workers, thread_name_prefix="loraplex-adapter-build")

    # -- references ---------------------------------------------------------------------------
    def acquire(
        self, version: AdapterVersion, load: Callable[[], AdapterWeights] | None = None
    ) -> Future[AdapterWeights]:
        """Take a reference to `version`'s weights, loading them if needed (with `load`, when
        given, instead of the cache's loader: e.g. building a composed adapter). On success the
        caller must `release(version.digest)` once; a failed load drops the reference itself."""
        with self._lock:
            entry = self._entries.get(version.digest)
            if entry is not None:
                entry.forgotten = False  # the same content registered again
                entry.refs += 1
                self._lru.pop(version.digest, None)
                if entry.future.done():
                    self.stats.hits += 1
                else:
                    self.stats.misses += 1  # joins the load under way
                return entry.future
            self.stats.misses += 1
            entry = _Entry(Future(), refs=1)
            self._entries[version.digest] = entry
        entry.future.set_running_or_notify_cancel()
        (self._pool if load is None else self._builds).submit(self._run_load, version, entry, load)
        return entry.future

    def try_lease(self, version: AdapterVersion) -> Lease | None:
        """A lease on `version` if its weights are loaded now (a hit), else None; never loads."""
        with self._lock:
            entry = self._entries.get(version.digest)
            if entry is None or not entry.future.done() or entry.future.exception() is not None:
                return None
            entry.forgotten = False
            entry.refs += 1
            self._lru.pop(version.digest, None)
            self.stats.hits += 1
            return Lease(cache=self, digest=version.digest, weights=entry.future.result())

    async def lease(
        self, version: AdapterVersion, load: Callable[[], AdapterWeights] | None = None
    ) -> Lease:
        """`acquire` for a coroutine: the reference is dropped if the caller is cancelled."""
        future = self.acquire(version, load)
        try:
            weights = await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            future.add_done_callback(
                lambda f: None if f.exception() else self.release(version.digest)
            )
            raise
        return Lease(cache=self, digest=version.digest, weights=weights)

    def release(self, digest: str) -> None:
        with self._lock:
            entry = self._entries[digest]
            if entry.refs <= 0:
                raise RuntimeError(f"adapter {digest} released more often than acquired")
            entry.refs -= 1
            if entry.refs == 0 and not entry.pinned:
                if entry.forgotten:
                    self._drop(digest)
                else:
                    self._lru[digest] = None
                    self._evict()

    def pin(self, digest: str, pinned: bool) -> None:
        """Keep (or stop keeping) a loaded entry whatever the budget."""
        with self._lock:
            entry = self._entries[digest]
            entry.pinned = pinned
            if pinned:
                self._lru.pop(digest, None)
            elif entry.refs == 0 and entry.future.done():
                self._lru[digest] = None
                self._evict()

    def forget(self, digests: set[str]) -> None:
        """The adapters were deleted: drop their entries now, or when the last holder leaves."""
        with self._lock:
            for digest in digests:
                entry = self._entries.get(digest)
                if entry is None:
                    continue
                entry.forgotten = True
                entry.pinned = False
                if entry.refs == 0 and entry.future.done():
                    self._drop(digest)

    # -- views --------------------------------------------------------------------------------
    def in_use(self) -> set[str]:
        """Digests being loaded or held: their blobs must stay in the store."""
        with self._lock:
            return {d for d, e in self._entries.items() if e.refs or not e.future.done()}

    def resident(self) -> int:
        with self._lock:
            return sum(1 for e in self._entries.values() if e.future.done())

    @property
    def used_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._builds.shutdown(wait=False, cancel_futures=True)

    # -- internals ----------------------------------------------------------------------------
    def _run_load(
        self,
        version: AdapterVersion,
        entry: _Entry,
        load: Callable[[], AdapterWeights] | None,
    ) -> None:
        start = time.perf_counter()
        try:
            weights = load() if load is not None else self._load(version)
            nbytes = weights.nbytes
        except BaseException as exc:
            with self._lock:
                self.stats.load_failures += 1
                if self._entries.get(version.digest) is entry:
                    del self._entries[version.digest]  # the next request tries again
            entry.future.set_exception(exc)
            return
        seconds = time.perf_counter() - start
        with self._lock:
            entry.nbytes = nbytes
            self._bytes += nbytes
            self.stats.loaded(seconds)
            # Every waiter holds a reference; the entry becomes evictable when they release.
            self._evict()
        log.info(
            "adapter %s v%d loaded into host memory (%.1f MB, %.0f ms)",
            *version.key,
            nbytes / 1e6,
            seconds * 1e3,
        )
        entry.future.set_result(weights)

    def _evict(self) -> None:
        """Under the lock: drop unheld entries, oldest first, while over budget."""
        while self._bytes > self.budget_bytes and self._lru:
            digest, _ = self._lru.popitem(last=False)
            self._drop(digest)
            self.stats.evictions += 1

    def _drop(self, digest: str) -> None:
        entry = self._entries.pop(digest)
        self._lru.pop(digest, None)
        self._bytes -= entry.nbytes
