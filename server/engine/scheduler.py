"""Admission: which waiting requests join the running batch, under the KV cache (rows and
token budget) and adapter-slot budgets, fairly between tenants.

Each tenant's requests wait in arrival order; admission serves the tenant with the lowest
virtual token counter first (see fairness.py), so one tenant's flood cannot starve another. A
request that finds no room in the KV cache holds back everyone after it in that order; one
whose adapter needs a slot while every slot is busy gets the next slot that frees (see
`Scheduler.admit`), and none starves.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from loraplex.core.errors import NotReady, QueueFull, Unmeetable
from loraplex.server.config import EngineConfig
from loraplex.server.engine.fairness import VirtualTokenCounter
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.pacing import Pacing
from loraplex.server.engine.request import EngineRequest
from loraplex.server.engine.slots import SlotGrant, SlotTable

QUEUE_RETRY_S = 1.0  # the retry advice when the queue is full


@dataclass(frozen=True)
class Admission:
    request: EngineRequest
    grant: SlotGrant | None  # None for base-model requests
    rows: tuple[int, ...]  # its KV cache rows, one per sample (see batch.py)

    @property
    def row(self) -> int:
        """The first sample's row (the one that prefills)."""
        return self.rows[0]

    @property
    def slot(self) -> int:
        return self.grant.slot if self.grant else NO_ADAPTER


class Scheduler:
    def __init__(
        self, config: EngineConfig, slots: SlotTable, pacing: Pacing | None = None
    ) -> None:
        self.config = config
        self.slots = slots
        self.pacing = pacing or Pacing(config.max_batch_size, config.max_prefill_tokens)
        self.fairness = VirtualTokenCounter()
        self._queues: dict[str, deque[EngineRequest]] = {}  # tenant -> its waiting requests
        self._num_waiting = 0
        self._queued_tokens = 0  # prompt tokens waiting
        self._arrivals = itertools.count()  # ties between tenants go to the earlier request
        self._order: dict[int, int] = {}  # id(request) -> arrival number
        self._running: Counter[str] = Counter()  # tenant -> rows its admitted requests hold
        self._cond = threading.Condition()
        self._closed = False  # under _cond: set once, then every add is refused

    def check(self) -> None:
        """Raise QueueFull (or NotReady) if a request would be refused now: a cheap check
        before any work on a request (`add` decides; this only refuses early)."""
        with self._cond:
            self._check()

    def _check(self) -> None:
        if self._closed:
            raise NotReady("the engine is shutting down")
        if self._num_waiting >= self.config.max_queue:
            raise QueueFull(
                f"the request queue is full ({self.config.max_queue} waiting)", QUEUE_RETRY_S
            )

    def add(self, request: EngineRequest) -> None:
        """Thread-safe: queue a request, or raise QueueFull (or NotReady once closed)."""
        tokens = len(request.prompt_ids)
        with self._cond:
            self._check()
            if self._num_waiting and self._queued_tokens + tokens > self.config.max_queued_tokens:
                raise QueueFull(
                    f"the request queue is full ({self._queued_tokens} prompt tokens waiting, "
                    f"at most {self.config.max_queued_tokens})",
                    QUEUE_RETRY_S,
                )
            if request.deadline is not None:
                self._check_deadline(request)
            self.fairness.arrive(request.tenant)
            self._queues.setdefault(request.tenant, deque()).append(request)
            self._order[id(request)] = next(self._arrivals)
            self._num_waiting += 1
            self._queued_tokens += tokens
            self._cond.notify()

    def _check_deadline(self, request: EngineRequest) -> None:
        """Refuse (Unmeetable) a request that would wait and run past its deadline at the pace
        measured (under _cond). Admission is fair between tenants, so about as many requests
        of each active tenant go before it as of its own."""
        assert request.deadline is not None
        now = time.monotonic()
        own = len(self._queues.get(request.tenant, ()))
        tenants = len(self._queues.keys() | self._running.keys() | {request.tenant})
        ahead = min(self._num_waiting, (own + 1) * tenants - 1)
        running = sum(self._running.values())
        run = self._run_s(request, running + ahead + 1)
        wait = self.pacing.wait_s(ahead, running, run)
        left = request.deadline - now
        if wait + run > left:
            raise Unmeetable(
                f"the request cannot finish before its deadline ({left:.3g} s from now): about "
                f"{wait:.3g} s to wait for a place and {run:.3g} s to run",
                max(wait, QUEUE_RETRY_S),
            )

    def _run_s(self, request: EngineRequest, batch: int) -> float:
        """About how long `request` runs once admitted, among about `batch` sequences (at
        most a full batch), at the pace measured."""
        params = request.params
        tokens = self.pacing.expected_tokens(params.max_new_tokens, params.ignore_eos)
        batch = min(batch, self.config.max_batch_size)
        return self.pacing.run_s(len(request.prompt_ids), tokens, batch)

    def remove_unmeetable(self, margin: float = 0.0) -> list[EngineRequest]:
        """Take out the waiting requests that can no longer finish before their deadline even
        if they started within `margin` seconds (their clients are told while they still
        listen: the margin covers the time until the next look)."""
        now = time.monotonic() + margin
        with self._cond:
            running = sum(self._running.values()) + 1  # the batch it would join
            late = [
                r
                for queue in self._queues.values()
                for r in queue
                if r.deadline is not None and now + self._run_s(r, running) > r.deadline
            ]
            for r in late:
                self._queues[r.tenant].remove(r)
                self._left(r)
            self._prune()
        return late

    def remove(self, request: EngineRequest) -> bool:
        """Thread-safe: take a (cancelled) request out of the queue at once, so it holds no
        place there; False if it is not queued (admitted already, or gone)."""
        with self._cond:
            queue = self._queues.get(request.tenant)
            if queue is None or id(request) not in self._order:
                return False
            queue.remove(request)
            self._left(request)
            self._prune()
            return True

    def finished(self, request: EngineRequest) -> None:
        """Thread-safe: an admitted request left the engine."""
        with self._cond:
            self.fairness.leave(request.tenant)
            self._running[request.tenant] -= request.params.n
            if self._running[request.tenant] <= 0:
                del self._running[request.tenant]

    def charge(self, generated: dict[str, int]) -> None:
        """Thread-safe: count tokens generated for each tenant (once per step)."""
        with self._cond:
            for tenant, n in generated.items():
                self.fairness.charge(tenant, output_tokens=n)

    def _take(self, request: EngineRequest) -> None:
        """Account for a request leaving the queue (under _cond; the caller removes it)."""
        self._num_waiting -= 1
        self._queued_tokens -= len(request.prompt_ids)
        del self._order[id(request)]

    def _left(self, request: EngineRequest) -> None:
        """A request left the queue without running (cancelled, overdue, drained)."""
        self._take(request)
        self.fairness.leave(request.tenant)

    def remove_older_than(self, arrival: float) -> list[EngineRequest]:
        """Take out the waiting requests that arrived before `arrival` (each tenant's queue is
        in arrival order: only the heads need looking at)."""
        with self._cond:
            old = []
            for queue in self._queues.values():
                while queue and queue[0].arrival < arrival:
                    old.append(queue.popleft())
                    self._left(old[-1])
            self._prune()
            return old

    def peek(self, n: int) -> list[EngineRequest]:
        """About the first `n` requests admission will look at (they stay queued)."""
        with self._cond:
            return list(itertools.islice(self._in_order(), n))

    def _in_order(self) -> Iterator[EngineRequest]:
        """Waiting requests, tenants with lower counters first (without charging any)."""
        tenants = sorted(
            self._queues,
            key=lambda t: (self.fairness.counter(t), self._order[id(self._queues[t][0])]),
        )
        for tenant in tenants:
            yield from self._queues[tenant]

    def num_waiting(self) -> int:
        with self._cond:
            return self._num_waiting

    def queued_tokens(self) -> int:
        with self._cond:
            return self._queued_tokens

    def wait(self, timeout: float, unless: Callable[[], bool] = lambda: False) -> None:
        """Block until a request is queued, `wake` is called or `timeout` passes; return at once
        when `unless()` holds (checked under the lock, so a wake-up cannot be missed)."""
        with self._cond:
            if not self._num_waiting and not unless():
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
        """Remove and return every waiting request, in arrival order."""
        with self._cond:
            waiting = sorted(
                (r for q in self._queues.values() for r in q), key=lambda r: self._order[id(r)]
            )
            for request in waiting:
                self._left(request)
            self._queues.clear()
            return waiting

    def _prune(self) -> None:
        for tenant in [t for t, q in self._queues.items() if not q]:
            del self._queues[tenant]

    def admit(
        self,
        allocate: Callable[[EngineRequest], tuple[int, ...] | None],
        unallocate: Callable[[tuple[int, ...], EngineRequest], None],
    ) -> tuple[list[Admission], list[EngineRequest]]:
        """Pop the requests that start now while `allocate(request)` finds them KV cache rows
        (None: no room, and the rest wait); also returns cancelled ones dropped from the queue.

        The order: the tenant with the lowest virtual token counter next (admitting a request
        charges its prompt, so tenants take turns), each tenant's requests first come, first
        served. A tenant already running `tenant_max_running` requests is passed over, so the
        rows it leaves are there for others the moment they send.

        A request whose adapter needs a slot while every slot is held by running requests
        waits, and one held slot is chosen to drain for it: no new request joins that slot,
        so it frees once its requests finish and the waiting request takes it (it is first in
        line). Requests after it whose adapter is resident in another slot, or that want the
        base model, go ahead meanwhile instead of idling; none waits longer than the requests
        running in one slot take to finish.
        """
        admitted: list[Admission] = []
        dropped: list[EngineRequest] = []
        leaving: set[int] = set()  # id() of the requests admitted or dropped
        waited = False  # a request earlier in the order is waiting for a slot
        draining: set[int] = set()
        wanting: set[tuple[str, int]] = set()  # adapters a slot drains for
        with self._cond:
            position = dict.fromkeys(self._queues, 0)
            turns = [self._turn(t, 0) for t in self._queues]
            heapq.heapify(turns)
            while turns:
                _, _, tenant = heapq.heappop(turns)
                queue, i = self._queues[tenant], position[tenant]
                request = queue[i]
                position[tenant] = i + 1
                limit = self.config.tenant_max_running
                held = self._running[tenant]  # rows: a request with n samples holds n
                # (a request alone runs, even one larger than the share)
                over = bool(limit) and held > 0 and held + request.params.n > limit
                if over and not request.cancelled.is_set():
                    continue  # the tenant holds its share of rows: its requests wait
                outcome = self._try_admit(request, allocate, unallocate, waited, draining, wanting)
                if outcome == "full":  # the KV cache is full: wait for sequences to finish
                    break
                if outcome == "dropped":
                    dropped.append(request)
                    leaving.add(id(request))
                    self._left(request)
                elif outcome == "waits":
                    waited = True
                elif isinstance(outcome, Admission):
                    admitted.append(outcome)
                    leaving.add(id(request))
                    self._take(request)
                    self._running[tenant] += request.params.n
                    self.fairness.charge(tenant, prompt_tokens=len(request.prompt_ids))
                if i + 1 < len(queue):
                    heapq.heappush(turns, self._turn(tenant, i + 1))
            for tenant in position:
                queue = self._queues[tenant]
                if any(id(r) in leaving for r in queue):
                    self._queues[tenant] = deque(r for r in queue if id(r) not in leaving)
            self._prune()
        return admitted, dropped

    def _turn(self, tenant: str, i: int) -> tuple[float, int, str]:
        """Heap entry for the i-th waiting request of `tenant`: lowest counter first, then
        the earlier arrival."""
        return (self.fairness.counter(tenant), self._order[id(self._queues[tenant][i])], tenant)

    def _try_admit(
        self,
        request: EngineRequest,
        allocate: Callable[[EngineRequest], tuple[int, ...] | None],
        unallocate: Callable[[tuple[int, ...], EngineRequest], None],
        waited: bool,
        draining: set[int],
        wanting: set[tuple[str, int]],
    ) -> Admission | str:
        """An Admission, or why not: "dropped" (cancelled), "waits" (for a slot), "full"."""
        if request.cancelled.is_set():
            return "dropped"
        key = request.adapter.key if request.adapter is not None else None
        if key is not None and waited:
            slot = self.slots.lookup(key)
            if slot is None or slot in draining:  # it needs a slot too: it waits
                self._drain_for(key, draining, wanting)
                return "waits"
        rows = allocate(request)
        if rows is None:
            return "full"
        grant = None
        if key is not None:
            grant = self.slots.acquire(key)
            if grant is None:
                unallocate(rows, request)
                self._drain_for(key, draining, wanting)
                return "waits"
        return Admission(request=request, grant=grant, rows=rows)

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
