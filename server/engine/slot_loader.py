"""Putting adapters into device slots, on the engine thread: the loads that admitted requests
need (a failed load fails just the requests sharing it), prefetching the adapters of queued
requests into free or idle slots while they wait, and pins. The slot table (slots.py) decides
which slot; this writes the weights there (host -> device) and counts the loads."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from loraplex.core.errors import Exhausted
from loraplex.core.types import AdapterKey, AdapterVersion, AdapterWeights
from loraplex.server.engine.model_runner import ModelRunner
from loraplex.server.engine.request import EngineRequest
from loraplex.server.engine.scheduler import Admission
from loraplex.server.engine.slots import SlotTable
from loraplex.server.engine.state import EngineStats

log = logging.getLogger(__name__)

WeightsLoader = Callable[[AdapterVersion], AdapterWeights]
PREFETCH_PER_STEP = 2  # device loads for queued requests per step (each pauses the step)
PIN_RETRY_S = 1.0  # the retry advice when no slot can be pinned now


class SlotLoader:
    def __init__(
        self,
        slots: SlotTable,
        runner: Callable[[], ModelRunner],
        stats: EngineStats,
        load_weights: WeightsLoader | None = None,
    ) -> None:
        self._slots = slots
        self._runner = runner
        self._stats = stats
        # Reads an adapter version's weights from the store, for requests that bring none.
        self._load_weights = load_weights
        self.limit: tuple[int, str] = (slots.num_slots, "")  # the slots now, and why (fit)

    def load(self, slot: int, adapter: AdapterVersion, weights: AdapterWeights | None) -> None:
        """Write an adapter into `slot` (weights None: read them with `load_weights`); on
        failure the slot is cleared and the error raised."""
        start = time.perf_counter()
        try:
            if weights is None:
                assert self._load_weights is not None, "give the Engine load_weights"
                weights = self._load_weights(adapter)
            self._runner().load_adapter(slot, weights)
        except Exception as exc:
            log.warning("loading adapter %s v%d failed: %s", *adapter.key, exc)
            self._runner().clear_slot(slot)
            self._slots.stats.load_failures += 1
            raise
        self._slots.stats.loaded(time.perf_counter() - start)
        self._stats.adapter_loads += 1
        log.debug("adapter %s v%d loaded into slot %d", *adapter.key, slot)
        self.fit()

    def fit(self) -> None:
        """The slot limit for the rank the stacks hold now (--max-loras auto: larger adapters,
        fewer slots), then give back the memory that no resident adapter needs."""
        runner = self._runner()
        limit = runner.slot_limit()
        if limit[0] != self._slots.num_slots:
            log.info("adapter slots: %d (%s)", *limit)
            self._slots.set_limit(limit[0])
        self.limit = limit
        runner.fit_lora(self._slots.resident())

    def load_admitted(self, admitted: list[Admission]) -> set[int]:
        """Write newly granted adapters into their slots; returns the slots whose load failed,
        after failing every admitted request that shares them and freeing the slots."""
        failed: dict[int, Exception] = {}
        for admission in admitted:
            grant, request = admission.grant, admission.request
            if grant is None or not grant.needs_load or request.adapter is None:
                continue
            try:
                self.load(grant.slot, request.adapter, request.weights)
            except Exception as exc:
                failed[grant.slot] = exc
        for admission in admitted:
            if admission.slot in failed:
                self._slots.release(admission.slot)
                admission.request.emit(failed[admission.slot])
        for slot in failed:
            self._slots.discard(slot)
        return set(failed)

    def prefetch(self, queued: Sequence[EngineRequest]) -> None:
        """Load the adapters of `queued` requests (the next in line) into free (or idle) slots
        while they wait, so they start without a load; slots wanted by requests further ahead
        are left alone."""
        wanted: set[AdapterKey] = set()
        loads = 0
        for request in queued:
            if request.adapter is None or request.cancelled.is_set():
                continue
            key = request.adapter.key
            if key not in wanted and self._slots.lookup(key) is None:
                grant = self._slots.prefetch(key, protect=wanted)
                if grant is None:
                    return
                try:
                    self.load(grant.slot, request.adapter, request.weights)
                except Exception:
                    self._slots.discard(grant.slot)  # the request fails when admitted
                    return
                loads += 1
                if loads >= PREFETCH_PER_STEP:
                    return
            wanted.add(key)

    def pin(self, adapter: AdapterVersion, weights: AdapterWeights | None) -> None:
        """Keep `adapter` in a slot until unpinned (one slot always stays unpinned)."""
        grant = self._slots.pin(adapter.key)
        if grant is None:
            raise Exhausted(
                "no device slot can be pinned: every slot is in use or pinned "
                f"(max_loras={self._slots.num_slots}, one slot stays unpinned)",
                PIN_RETRY_S,
            )
        if grant.needs_load:
            try:
                self.load(grant.slot, adapter, weights)
            except Exception:
                self._slots.unpin(adapter.key)
                self._slots.discard(grant.slot)
                raise
