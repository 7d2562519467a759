"""Admission order: FCFS under the KV cache, and fair waiting for adapter slots."""

from __future__ import annotations

from loraplex.adapters.slots import SlotTable
from loraplex.adapters.store import AdapterVersion
from loraplex.server.config import EngineConfig
from loraplex.server.engine.request import EngineRequest, SamplingParams
from loraplex.server.engine.scheduler import Scheduler


def request(name: str, adapter: str | None) -> EngineRequest:
    version = (
        AdapterVersion(adapter, 1, f"sha256:{adapter}", 4, 8.0, ("q_proj",), 0, "", "", "")
        if adapter
        else None
    )
    return EngineRequest(name, [1, 2, 3], SamplingParams(4), version, lambda item: None)


class Rows:
    """A KV cache of `n` rows for the scheduler's allocate/unallocate callbacks."""

    def __init__(self, n: int) -> None:
        self.free = n

    def allocate(self, req: EngineRequest) -> int | None:
        if self.free == 0:
            return None
        self.free -= 1
        return self.free

    def unallocate(self, row: int, req: EngineRequest) -> None:
        self.free += 1


def names(admissions) -> list[str]:
    return [a.request.request_id for a in admissions]


def test_a_request_waiting_for_a_slot_gets_the_slot_drained_for_it():
    slots = SlotTable(2)
    for key in [("a", 1), ("a", 1), ("b", 1)]:  # running: two on a, one on b
        slots.acquire(key)
    scheduler = Scheduler(EngineConfig(), slots)
    for name, adapter in [("c1", "c"), ("a1", "a"), ("b1", "b"), ("base", None), ("d1", "d")]:
        scheduler.add(request(name, adapter))
    rows = Rows(10)
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    # c waits for a slot; b's (fewest running) drains for it, so b1 waits too; a1 and the
    # base request go ahead; d needs a slot as well and waits behind c.
    assert names(admitted) == ["a1", "base"]
    assert [r.request_id for r in scheduler.drain()] == ["c1", "b1", "d1"]


def test_the_waiting_request_is_first_in_line_when_the_slot_frees():
    slots = SlotTable(1)
    slots.acquire(("a", 1))
    scheduler = Scheduler(EngineConfig(), slots)
    for name, adapter in [("b1", "b"), ("a1", "a"), ("a2", "a")]:
        scheduler.add(request(name, adapter))
    rows = Rows(10)
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    assert names(admitted) == []  # a's slot drains for b: a1 and a2 may not join it
    assert scheduler.num_waiting() == 3 and rows.free == 10
    slots.release(slots.lookup(("a", 1)))
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    assert names(admitted) == ["b1"] and admitted[0].grant.evicted == ("a", 1)
    assert [r.request_id for r in scheduler.drain()] == ["a1", "a2"]


def test_a_full_kv_cache_holds_back_everyone_behind():
    slots = SlotTable(2)
    scheduler = Scheduler(EngineConfig(), slots)
    for name, adapter in [("a1", "a"), ("b1", "b"), ("base", None)]:
        scheduler.add(request(name, adapter))
    rows = Rows(1)
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    assert names(admitted) == ["a1"]
    assert [r.request_id for r in scheduler.drain()] == ["b1", "base"]


def test_cancelled_requests_are_dropped_in_place():
    scheduler = Scheduler(EngineConfig(), SlotTable(1))
    first, second = request("x", None), request("y", None)
    first.cancel()
    scheduler.add(first)
    scheduler.add(second)
    rows = Rows(4)
    admitted, dropped = scheduler.admit(rows.allocate, rows.unallocate)
    assert names(admitted) == ["y"] and dropped == [first]


def test_one_slot_drains_per_waiting_adapter():
    slots = SlotTable(3)
    for key in [("a", 1), ("b", 1), ("b", 1), ("e", 1), ("e", 1), ("e", 1)]:
        slots.acquire(key)
    scheduler = Scheduler(EngineConfig(), slots)
    for name, adapter in [("c1", "c"), ("c2", "c"), ("b1", "b"), ("e1", "e")]:
        scheduler.add(request(name, adapter))
    rows = Rows(10)
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    # Only a's slot drains (for c, twice wanted); b and e keep serving.
    assert names(admitted) == ["b1", "e1"]
