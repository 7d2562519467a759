"""The garbage collector's pauses timed per generation, their histogram on /metrics, and the
heap frozen after start-up (runtime/heap.py)."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.registry import Collector

from loraplex.server.metrics import gc_pauses_family
from loraplex.server.runtime.heap import PAUSE_BUCKETS, GcPauses, freeze_heap, unfreeze_heap


def test_collections_are_timed_per_generation_while_installed():
    pauses = GcPauses()
    pauses.install()
    try:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
    finally:
        pauses.uninstall()
    young, full = pauses.stats[0], pauses.stats[2]
    assert young.count >= 1 and full.count >= 2
    for stats in (young, full):
        assert sum(stats.counts) == stats.count
        assert 0 < stats.max_s <= stats.total_s
    gc.collect(2)  # uninstalled: no longer counted
    assert pauses.stats[2].count == full.count


def test_the_histogram_is_cumulative_with_the_pauses_sum():
    pauses = GcPauses()
    stats = pauses.stats[2]
    for seconds in (0.0002, 0.03, 0.3, 5.0):  # the last beyond every bucket
        stats.count += 1
        stats.total_s += seconds
        stats.counts[sum(b < seconds for b in PAUSE_BUCKETS)] += 1

    class One(Collector):
        def collect(self):
            yield gc_pauses_family(pauses)

    registry = CollectorRegistry()
    registry.register(One())
    text = generate_latest(registry).decode()
    line = 'loraplex_gc_pause_seconds_bucket{{generation="2",le="{}"}} {}'
    assert line.format("0.0005", "1.0") in text
    assert line.format("0.05", "2.0") in text
    assert line.format("0.5", "3.0") in text
    assert line.format("1.0", "3.0") in text
    assert line.format("+Inf", "4.0") in text
    assert 'loraplex_gc_pause_seconds_count{generation="2"} 4.0' in text
    assert 'loraplex_gc_pause_seconds_sum{generation="2"} 5.3302' in text
    assert 'loraplex_gc_pause_seconds_count{generation="0"} 0.0' in text


def test_a_frozen_heap_is_out_of_the_collectors_walks_until_unfrozen():
    before = gc.get_freeze_count()
    try:
        frozen = freeze_heap()
        # (a frozen object may still be freed by reference counting meanwhile)
        assert frozen > before and gc.get_freeze_count() > before
        # A full collection now walks next to nothing: what was there is frozen.
        assert len(gc.get_objects(generation=2)) < frozen // 100
    finally:
        unfreeze_heap()
    assert gc.get_freeze_count() == 0
