"""Admission: which waiting requests join the running batch, under the KV cache (rows and
token budget) and adapter-slot budgets. First come, first served: a request that finds no
room in the KV cache holds back those behind it; one whose adapter needs a slot while every
slot is busy gets the next slot that frees (see `Scheduler.admit`), and none starves.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from loraplex.adapters.lora import NO_ADAPTER
from loraplex.adapters.slots import SlotGrant, SlotTable
from loraplex.server.config import EngineConfig
from loraplex.server.engine.request import EngineRequest
from loraplex.server.errors import NotReady, QueueFull


@dataclass(frozen=True)
class Admission:
    request: EngineRequest
    grant: SlotGrant | None  # None for base-model requests
    row: int  # its KV cache row

    @property
    def slot(self) -> int:
        return self.grant.slot if self.grant else NO_ADAPTER


class Scheduler:
    def __init__(self, config: EngineConfig, slots: SlotTable) -> None:
        self.config = config
        self.slots = slots
        self._waiting: deque[EngineRequest] = deque()
        self._cond = threading.Condition()
        self._closed = False  # under _cond: set once, then every add is refused

    def add(self, request: EngineRequest) -> None:
        """Thread-safe: queue a request, or raise QueueFull (or NotReady once closed)."""
        with self._cond:
            if self._closed:
                raise NotReady("the engine is shutting down")
            if len(self._waiting) >= self.config.max_queue:
                raise QueueFull(f"the request queue is full ({self.config.max_queue} waiting)")
            self._waiting.append(request)
            self._cond.notify()

    def remove_older_than(self, arrival: float) -> list[EngineRequest]:
        """Take out the waiting requests at the head of the queue that arrived before `arrival`
        (the queue is in submission order: the head holds the longest waiting)."""
        with self._cond:
            old = []
            while self._waiting and self._waiting[0].arrival < arrival:  # oldest first
                old.append(self._waiting.popleft())
            return old

    def peek(self, n: int) -> list[EngineRequest]:
        """The first `n` waiting requests, in order (they stay queued)."""
        with self._cond:
            return [r for _, r in zip(range(n), self._waiting, strict=False)]

    def num_waiting(self) -> int:
        with self._cond:
            return len(self._waiting)

    def wait(self, timeout: float, unless: Callable[[], bool] = lambda: False) -> None:
        """Block until a request is queued, `wake` is called or `timeout` passes; return at once
        when `unless()` holds (checked under the lock, so a wake-up cannot be missed)."""
        with self._cond:
            if not self._waiting and not unless():
                self._cond.wait(timeout)

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def close(self) -> None:
        """Refuse every later request; those already queued stay until drained."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def drain(self) -> list[EngineRequest]:
        """Remove and return every waiting request."""
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
            return waiting

    def admit(
        self,
        allocate: Callable[[EngineRequest], int | None],
        unallocate: Callable[[int, EngineRequest], None],
    ) -> tuple[list[Admission], list[EngineRequest]]:
        """Pop the requests that start now, in arrival order, while `allocate(request)` finds
        them a KV cache row (None: no room, and the rest wait); also returns cancelled ones
        dropped from the queue.

        A request whose adapter needs a slot while every slot is held by running requests
        waits, and one held slot is chosen to drain for it: no new request joins that slot,
        so it frees once its requests finish and the waiting request takes it (it is first in
        line). Requests behind it whose adapter is resident in another slot, or that want the
        base model, go ahead meanwhile instead of idling; none waits longer than the requests
        running in one slot take to finish.
        """
        admitted: list[Admission] = []
        dropped: list[EngineRequest] = []
        kept: list[EngineRequest] = []  # waiting on, ahead of those still queued
        draining: set[int] = set()
        wanting: set[tuple[str, int]] = set()  # adapters a slot drains for
        with self._cond:
            while self._waiting:
                request = self._waiting.popleft()
                if request.cancelled.is_set():
                    dropped.append(request)
                    continue
                key = request.adapter.key if request.adapter is not None else None
                if key is not None and kept:
                    slot = self.slots.lookup(key)
                    if slot is None or slot in draining:  # it needs a slot too: it waits
                        self._drain_for(key, draining, wanting)
                        kept.append(request)
                        continue
                row = allocate(request)
                if row is None:
                    kept.append(request)
                    break  # the KV cache is full: wait for running sequences to finish
                grant = None
                if key is not None:
                    grant = self.slots.acquire(key)
                    if grant is None:
                        unallocate(row, request)
                        self._drain_for(key, draining, wanting)
                        kept.append(request)
                        continue
                admitted.append(Admission(request, grant, row))
            self._waiting.extendleft(reversed(kept))
        return admitted, dropped

    def _drain_for(
        self, key: tuple[str, int], draining: set[int], wanting: set[tuple[str, int]]
    ) -> None:
        """Choose a slot to drain for adapter `key` (one per adapter): the held slot with the
        fewest running requests, if any is left."""
        if key in wanting:
            return
        wanting.add(key)
        slot = self.slots.drain_candidate(exclude=draining)
        if slot is not None:
            draining.add(slot)
