"""The slot table: exact contents, refcounts and LRU order."""

from __future__ import annotations

import pytest

from loraplex.server.engine.slots import SlotGrant, SlotTable


def test_acquire_loads_once_and_shares_a_slot():
    table = SlotTable(2)
    assert table.acquire(("a", 1)) == SlotGrant(slot=0, needs_load=True, evicted=None)
    assert table.acquire(("a", 1)) == SlotGrant(slot=0, needs_load=False, evicted=None)
    assert table.refcount(0) == 2
    assert table.acquire(("b", 1)) == SlotGrant(slot=1, needs_load=True, evicted=None)
    assert table.resident() == {0: ("a", 1), 1: ("b", 1)}


def test_versions_are_distinct_adapters():
    table = SlotTable(2)
    table.acquire(("a", 1))
    assert table.acquire(("a", 2)).slot == 1


def test_referenced_slots_are_never_evicted():
    table = SlotTable(2)
    table.acquire(("a", 1))
    table.acquire(("b", 1))
    assert table.acquire(("c", 1)) is None
    assert table.resident() == {0: ("a", 1), 1: ("b", 1)}


def test_least_recently_released_is_evicted_first():
    table = SlotTable(2)
    table.acquire(("a", 1))
    table.acquire(("b", 1))
    table.release(1)  # b released first: least recently used
    table.release(0)
    grant = table.acquire(("c", 1))
    assert grant == SlotGrant(slot=1, needs_load=True, evicted=("b", 1))
    assert table.resident() == {0: ("a", 1), 1: ("c", 1)}
    assert table.lookup(("b", 1)) is None
    # a was idle but is reused without a load
    assert table.acquire(("a", 1)) == SlotGrant(slot=0, needs_load=False, evicted=None)


def test_reacquired_slot_leaves_lru():
    table = SlotTable(1)
    table.acquire(("a", 1))
    table.release(0)
    table.acquire(("a", 1))  # in use again
    assert table.acquire(("b", 1)) is None


def test_release_more_than_acquired_is_an_error():
    table = SlotTable(1)
    table.acquire(("a", 1))
    table.release(0)
    with pytest.raises(RuntimeError):
        table.release(0)


def test_discard_frees_the_slot_once_unreferenced():
    table = SlotTable(1)
    table.acquire(("a", 1))
    with pytest.raises(RuntimeError):
        table.discard(0)  # a running request still uses it
    table.release(0)
    table.discard(0)
    assert table.resident() == {}
    assert table.acquire(("b", 1)) == SlotGrant(slot=0, needs_load=True, evicted=None)


def test_pinned_adapters_stay_and_one_slot_is_left_for_the_rest():
    table = SlotTable(3)
    assert table.pin(("a", 1)).needs_load
    assert table.pin(("b", 1)) is not None
    assert table.pin(("c", 1)) is None  # the last slot stays unpinned
    assert table.pinned_keys() == [("a", 1), ("b", 1)]
    for key in [("x", 1), ("y", 1), ("z", 1)]:  # churn through the one free slot
        grant = table.acquire(key)
        assert grant is not None and grant.evicted not in {("a", 1), ("b", 1)}
        table.release(grant.slot)
    table.unpin(("a", 1))
    grant = table.acquire(("w", 1))
    table.release(grant.slot)
    assert table.acquire(("q", 1)).evicted in {("a", 1), ("w", 1)}  # a is evictable again
    with pytest.raises(ValueError):
        table.unpin(("a", 1))


def test_prefetch_fills_free_or_idle_slots_but_not_those_wanted_sooner():
    table = SlotTable(2)
    a = table.acquire(("a", 1))
    table.release(a.slot)
    b = table.acquire(("b", 1))  # b stays referenced
    # The only idle slot holds a, which a request ahead wants: no prefetch.
    assert table.prefetch(("c", 1), protect={("a", 1)}) is None
    grant = table.prefetch(("c", 1), protect=set())
    assert grant is not None and grant.slot == a.slot and grant.evicted == ("a", 1)
    assert table.refcount(grant.slot) == 0  # unreferenced until its request is admitted
    again = table.acquire(("c", 1))
    assert not again.needs_load and table.stats.hits == 1
    assert table.prefetch(("d", 1), protect=set()) is None  # both slots referenced
    table.release(b.slot)


def test_a_lower_limit_evicts_idle_slots_beyond_it_and_retires_busy_ones_on_release():
    table = SlotTable(4)
    for name in "abcd":
        table.acquire((name, 1))
    table.release(1)  # b idle; a, c, d busy
    table.release(3)  # d idle
    table.set_limit(2)
    assert table.resident() == {0: ("a", 1), 1: ("b", 1), 2: ("c", 1)}  # d evicted, c busy
    assert table.acquire(("c", 1)).slot == 2  # still resident: shared while it lasts
    table.release(2)
    table.release(2)
    assert table.lookup(("c", 1)) is None  # retired on its last release
    grant = table.acquire(("e", 1))
    assert grant is not None and grant.slot == 1 and grant.evicted == ("b", 1)  # never beyond
    assert not table.has_room()
    table.set_limit(3)
    assert table.has_room() and table.acquire(("f", 1)).slot == 2
