"""Python's garbage collector and the latency tail.

A full (generation 2) collection walks every container object the process holds. Once the
model, tokenizer, torch and the front ends are loaded, that is about half a million objects,
and on this project's CPUs a walk takes 0.1-0.4 s with the GIL held: every thread stops (the
engine between steps, the event loop between chunks), and whichever request is waiting for its
first token then waits that much longer. Serving allocates long-lived objects slowly (request
records, cached prefixes), so such a collection comes every minute or so, at random: the
online benchmark's rare p99 time-to-first-token outliers (265 ms and 188 ms against a p50 of
about 35 ms) were these pauses.

So once the server is loaded and warmed up, its heap is frozen (gc.freeze(): what exists then
moves to a generation the collector never walks, as vLLM and SGLang do): collections then walk
only what serving allocated since. What is frozen and later becomes garbage is still freed by
reference counting, unless it sits in a reference cycle; a runtime that closes unfreezes, so
that a process that builds several runtimes (tests, a replica restarting its engine) does not
keep the cycles of the earlier ones.

`GcPauses` times every collection (gc.callbacks), for /metrics
(`loraplex_gc_pause_seconds`): its callback only does arithmetic, never takes a lock or logs,
since a collection may start inside any allocation, including one made under such a lock.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

# Pause buckets, seconds: a young collection takes well under a millisecond, a full one over
# an unfrozen heap a few hundred.
PAUSE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
GENERATIONS = (0, 1, 2)


def freeze_heap() -> int:
    """Collect, then freeze every object that survives (see the module's docstring); returns
    how many objects are frozen."""
    start = time.perf_counter()
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info(
        "froze the Python heap after start-up: %d objects, which garbage collections no longer "
        "walk (collected first in %.0f ms)",
        frozen,
        (time.perf_counter() - start) * 1e3,
    )
    return frozen


def unfreeze_heap() -> None:
    """Give the frozen objects back to the collector (a runtime closing)."""
    gc.unfreeze()


@dataclass
class PauseStats:
    """The collections of one generation: how many, their total and longest seconds, and how
    many took at most each of PAUSE_BUCKETS (not cumulative: counts[i] for bucket i, the last
    entry for longer ones)."""

    count: int = 0
    total_s: float = 0.0
    max_s: float = 0.0
    counts: list[int] = field(default_factory=lambda: [0] * (len(PAUSE_BUCKETS) + 1))


class GcPauses:
    """Times the garbage collector's pauses while installed."""

    def __init__(self) -> None:
        self.stats = {generation: PauseStats() for generation in GENERATIONS}
        self._started = 0.0
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._callback)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._callback)
            self._installed = False

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        # Collections never overlap (the GIL, and the collector's own guard), so the start
        # mark and the counters need no lock; nothing here allocates a container.
        if phase == "start":
            self._started = time.perf_counter()
            return
        seconds = time.perf_counter() - self._started
        stats = self.stats.get(info.get("generation", 2))
        if stats is None:
            return
        stats.count += 1
        stats.total_s += seconds
        stats.max_s = max(stats.max_s, seconds)
        stats.counts[bisect.bisect_left(PAUSE_BUCKETS, seconds)] += 1
