"""Admission: which waiting requests join the running batch, under the KV cache (rows and
token budget) and adapter-slot budgets. First come, first served: a request that cannot be
admitted yet (no room in the cache, or its adapter needs a slot and every slot is busy) holds
back those behind it, so none starves.
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
        """Pop the requests that start now, in order, while `allocate(request)` finds them a KV
        cache row (None: no room) and an adapter slot can be had (if not, `unallocate` gives
        the row back); also returns cancelled ones dropped from the queue."""
        admitted: list[Admission] = []
        dropped: list[EngineRequest] = []
        with self._cond:
            while self._waiting:
                request = self._waiting[0]
                if request.cancelled.is_set():
                    dropped.append(self._waiting.popleft())
                    continue
                row = allocate(request)
                if row is None:
                    break  # the KV cache is full: wait for running sequences to finish
                grant = None
                if request.adapter is not None:
                    grant = self.slots.acquire(request.adapter.key)
                    if grant is None:
                        unallocate(row, request)
                        break  # every slot is in use by running requests
                self._waiting.popleft()
                admitted.append(Admission(request, grant, row))
        return admitted, dropped
