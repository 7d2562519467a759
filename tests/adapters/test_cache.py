"""The host tier: single-flight loads, LRU under a byte budget, held and pinned entries."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from loraplex.adapters.cache import (
    FALLBACK_BUDGET_BYTES,
    MEMORY_SHARE,
    HostCache,
    default_budget,
)
from loraplex.core.types import AdapterVersion, AdapterWeights


def version(name: str, n: int = 1) -> AdapterVersion:
    return AdapterVersion(name, n, f"sha256:{name}{n}", 4, 8.0, ("q_proj",), 0, "", "", "")


def weights(nbytes: int) -> AdapterWeights:
    a = torch.zeros(nbytes // 8, 1)
    b = torch.zeros(1, nbytes // 8)
    return AdapterWeights({"m": (a, b)}, 1, 8.0, ("q_proj",))


class CountingLoader:
    """Loads `nbytes` of weights per adapter, counting calls; `gate` holds loads back."""

    def __init__(self, nbytes: int = 800) -> None:
        self.nbytes = nbytes
        self.calls: list[str] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail: set[str] = set()

    def __call__(self, v: AdapterVersion) -> AdapterWeights:
        self.calls.append(v.adapter_id)
        self.gate.wait(10)
        if v.adapter_id in self.fail:
            raise FileNotFoundError(f"{v.adapter_id} is gone")
        return weights(self.nbytes)


def test_concurrent_first_requests_cause_one_load():
    loader = CountingLoader()
    loader.gate.clear()
    cache = HostCache(loader, budget_bytes=10_000)
    with ThreadPoolExecutor(16) as pool:
        futures = list(pool.map(lambda _: cache.acquire(version("a")), range(16)))
        loader.gate.set()
        results = [f.result(10) for f in futures]
    assert loader.calls == ["a"]
    assert all(r is results[0] for r in results)
    assert cache.stats.loads == 1 and cache.stats.misses == 16 and cache.stats.hits == 0
    for _ in range(16):
        cache.release(version("a").digest)
    cache.acquire(version("a")).result(1)
    assert loader.calls == ["a"] and cache.stats.hits == 1


def test_lru_eviction_under_the_budget_spares_held_and_pinned_entries():
    loader = CountingLoader(nbytes=800)  # each entry holds 800 bytes
    cache = HostCache(loader, budget_bytes=3 * 800)
    for name in "abc":
        cache.acquire(version(name)).result(1)
    cache.pin(version("a").digest, True)
    cache.release(version("a").digest)
    cache.release(version("b").digest)
    # "c" is still held; "d" pushes the tier over budget: "b" (unheld, unpinned) goes.
    cache.acquire(version("d")).result(1)
    assert cache.stats.evictions == 1
    assert cache.used_bytes == 3 * 800
    cache.acquire(version("a")).result(1)
    cache.acquire(version("c")).result(1)
    assert loader.calls == ["a", "b", "c", "d"]  # a and c were still there
    cache.acquire(version("b")).result(1)
    assert loader.calls[-1] == "b"  # b was evicted: loaded again


def test_when_everything_is_held_the_tier_runs_over_budget_rather_than_fail():
    cache = HostCache(CountingLoader(nbytes=800), budget_bytes=1000)
    for name in "abc":
        cache.acquire(version(name)).result(1)
    assert cache.used_bytes == 3 * 800 and cache.stats.evictions == 0
    for name in "abc":
        cache.release(version(name).digest)
    assert cache.used_bytes <= 1000


def test_a_failed_load_fails_its_waiters_and_the_next_request_tries_again():
    loader = CountingLoader()
    loader.fail.add("a")
    cache = HostCache(loader, budget_bytes=10_000)
    with pytest.raises(FileNotFoundError):
        cache.acquire(version("a")).result(1)
    assert cache.stats.load_failures == 1 and cache.in_use() == set()
    loader.fail.clear()
    cache.acquire(version("a")).result(1)
    assert loader.calls == ["a", "a"]


def test_forget_drops_a_deleted_adapter_once_its_holders_leave():
    cache = HostCache(CountingLoader(), budget_bytes=10_000)
    cache.acquire(version("a")).result(1)
    cache.acquire(version("b")).result(1)
    cache.release(version("b").digest)
    cache.forget({version("a").digest, version("b").digest})
    assert cache.resident() == 1 and cache.in_use() == {version("a").digest}
    cache.release(version("a").digest)
    assert cache.resident() == 0 and cache.used_bytes == 0


def test_a_cancelled_lease_gives_its_reference_back():
    loader = CountingLoader()
    loader.gate.clear()
    cache = HostCache(loader, budget_bytes=10_000)

    async def run():
        task = asyncio.create_task(cache.lease(version("a")))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        loader.gate.set()
        lease = await cache.lease(version("a"))  # joins or hits the same entry
        lease.release()
        lease.release()  # a second release is a no-op

    asyncio.run(run())
    assert loader.calls == ["a"]
    assert cache.in_use() == set()


def test_the_default_budget_is_a_share_of_the_available_memory():
    assert default_budget(24 << 30) == (24 << 30) // MEMORY_SHARE
    assert default_budget(0) == FALLBACK_BUDGET_BYTES  # the system cannot say
