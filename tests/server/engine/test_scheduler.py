"""Admission order: fair between tenants (VTC), FCFS within one, bounded, and fair waiting
for adapter slots."""

from __future__ import annotations

import pytest

from loraplex.core.errors import QueueFull
from loraplex.core.types import AdapterVersion
from loraplex.server.config import EngineConfig
from loraplex.server.engine.request import EngineRequest, SamplingParams
from loraplex.server.engine.scheduler import Scheduler
from loraplex.server.engine.slots import SlotTable


def request(name: str, adapter: str | None, tenant: str = "", prompt_len: int = 3) -> EngineRequest:
    version = (
        AdapterVersion(adapter, 1, f"sha256:{adapter}", 4, 8.0, ("q_proj",), 0, "", "", "")
        if adapter
        else None
    )
    return EngineRequest(
        name, [1] * prompt_len, SamplingParams(4), version, lambda item: None, tenant=tenant
    )


class Rows:
    """A KV cache of `n` rows for the scheduler's allocate/unallocate callbacks."""

    def __init__(self, n: int) -> None:
        self.free = n

    def allocate(self, req: EngineRequest) -> tuple[int, ...] | None:
        if self.free == 0:
            return None
        self.free -= 1
        return (self.free,)

    def unallocate(self, rows: tuple[int, ...], req: EngineRequest) -> None:
        self.free += len(rows)


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


def test_tenants_take_turns_whoever_queued_first():
    scheduler = Scheduler(EngineConfig(), SlotTable(2))
    for i in range(6):
        scheduler.add(request(f"a{i}", None, "flood"))
    scheduler.add(request("b0", None, "quiet"))
    scheduler.add(request("b1", None, "quiet"))
    rows = Rows(4)
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    # Both start at the same counter; each admission charges its prompt, so they alternate.
    assert names(admitted) == ["a0", "b0", "a1", "b1"]
    assert [r.request_id for r in scheduler.drain()] == ["a2", "a3", "a4", "a5"]


def test_a_tenant_that_was_served_more_waits_behind_one_served_less():
    scheduler = Scheduler(EngineConfig(), SlotTable(2))
    rows = Rows(100)
    scheduler.add(request("a0", None, "flood"))
    scheduler.add(request("b0", None, "quiet"))
    scheduler.admit(rows.allocate, rows.unallocate)
    scheduler.charge({"flood": 50, "quiet": 5})  # a0 generated far more than b0 meanwhile
    for i in range(1, 4):
        scheduler.add(request(f"a{i}", None, "flood"))
    scheduler.add(request("b1", None, "quiet"))
    scheduler.add(request("b2", None, "quiet"))
    admitted, _ = scheduler.admit(Rows(3).allocate, rows.unallocate)
    assert names(admitted) == ["b1", "b2", "a1"]


def test_idle_time_is_not_banked_as_credit():
    scheduler = Scheduler(EngineConfig(), SlotTable(2))
    rows = Rows(100)
    scheduler.add(request("a0", None, "busy"))
    scheduler.admit(rows.allocate, rows.unallocate)
    scheduler.charge({"busy": 1000})
    scheduler.add(request("b0", None, "back"))  # b was never served: it starts at a's counter
    fairness = scheduler.fairness
    assert fairness.counter("back") == fairness.counter("busy")
    for i in range(1, 3):
        scheduler.add(request(f"a{i}", None, "busy"))
    scheduler.add(request("b1", None, "back"))
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    assert names(admitted) == ["b0", "a1", "a2", "b1"]  # turns, not 1000 tokens of b first


def test_the_queue_is_bounded_in_requests_and_in_prompt_tokens():
    scheduler = Scheduler(EngineConfig(max_queue=3, max_queued_tokens=100), SlotTable(1))
    scheduler.add(request("big", None, prompt_len=150))  # alone, any size is queued
    with pytest.raises(QueueFull, match="prompt tokens") as err:
        scheduler.add(request("more", None, prompt_len=1))
    assert err.value.retry_after_s > 0
    assert scheduler.drain()[0].request_id == "big" and scheduler.queued_tokens() == 0
    for i in range(3):
        scheduler.add(request(f"r{i}", None, prompt_len=10))
    with pytest.raises(QueueFull, match="3 waiting"):
        scheduler.add(request("r3", None, prompt_len=10))
    assert scheduler.queued_tokens() == 30


def test_counters_reset_once_nobody_is_active():
    scheduler = Scheduler(EngineConfig(), SlotTable(1))
    rows = Rows(4)
    first = request("a0", None, "a")
    scheduler.add(first)
    scheduler.admit(rows.allocate, rows.unallocate)
    scheduler.charge({"a": 10})
    assert scheduler.fairness.counter("a") > 0
    scheduler.finished(first)
    assert scheduler.fairness.counter("a") == 0


def test_a_tenant_at_its_share_of_rows_leaves_the_rest_to_others():
    scheduler = Scheduler(EngineConfig(tenant_max_running=2), SlotTable(1))
    for i in range(4):
        scheduler.add(request(f"a{i}", None, "flood"))
    rows = Rows(4)
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    assert names(admitted) == ["a0", "a1"] and rows.free == 2  # two rows stay free
    scheduler.add(request("b0", None, "quiet"))
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    assert names(admitted) == ["b0"]  # at once, not after the flood
    scheduler.finished(request("a0", None, "flood"))  # one of a's requests ended
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    assert names(admitted) == ["a2"]


def test_a_cancelled_request_leaves_the_queue_at_once():
    scheduler = Scheduler(EngineConfig(max_queue=2, tenant_max_running=1), SlotTable(1))
    rows = Rows(4)
    scheduler.add(request("a0", None, "a"))
    scheduler.admit(rows.allocate, rows.unallocate)  # a holds its one row
    queued = [request(f"a{i}", None, "a") for i in (1, 2)]
    for r in queued:
        scheduler.add(r)
    with pytest.raises(QueueFull):
        scheduler.add(request("b0", None, "b"))
    # Its client went away: admission would never reach it (a is at its share of rows), so
    # it must not keep its place until then.
    queued[0].cancel()
    assert scheduler.remove(queued[0]) and not scheduler.remove(queued[0])
    assert scheduler.num_waiting() == 1 and scheduler.queued_tokens() == 3
    scheduler.add(request("b0", None, "b"))
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    assert names(admitted) == ["b0"]


def test_a_tenants_share_counts_the_rows_of_its_samples():
    """A request with n samples holds n rows of its tenant's share; one larger than the whole
    share still runs alone."""
    scheduler = Scheduler(EngineConfig(tenant_max_running=4), SlotTable(1))

    def sampled(name: str, n: int) -> EngineRequest:
        r = request(name, None, "flood")
        r.params = SamplingParams(4, n=n)
        return r

    first, second, big = sampled("a0", 3), sampled("a1", 3), sampled("a2", 6)
    for r in (first, second):
        scheduler.add(r)
    rows = Rows(16)
    admitted, _ = scheduler.admit(rows.allocate, rows.unallocate)
    assert names(admitted) == ["a0"]  # 3 + 3 rows would pass the share of 4
    scheduler.add(request("b0", None, "quiet"))
    assert names(scheduler.admit(rows.allocate, rows.unallocate)[0]) == ["b0"]
    scheduler.finished(first)
    assert names(scheduler.admit(rows.allocate, rows.unallocate)[0]) == ["a1"]
    scheduler.finished(second)
    scheduler.add(big)
    assert names(scheduler.admit(rows.allocate, rows.unallocate)[0]) == ["a2"]  # alone: runs
