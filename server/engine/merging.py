"""When to fold one adapter into the base weights (as dLoRA does), and when to take it out.

Merged, the dominant adapter's requests run at base speed (no LoRA work at all for them) and
every other request subtracts its delta again (model_runner.ModelRunner._plans): the same math
(the merged weights are rounded to the compute dtype once, so outputs move at that rounding's
level), but one more LoRA product for those tokens. So merging pays when one adapter carries most of
the tokens, and costs when traffic is mixed. The policy looks at the share of the last
`window_tokens` tokens the engine processed (prompt and generated) within the last
`window_seconds`, plus the tokens the queued requests will bring (prompt + max_new_tokens: the
queue mix of the near future), and keeps a gap between its thresholds (hysteresis) and a
minimum time between changes, so a share hovering near a threshold does not flap:

    merge M      when M's share >= merge_share     (and the window holds enough to judge)
    unmerge M    when M's share <  unmerge_share   (or another adapter leads with >= merge_share)

Merging also needs the merged layers to be no slower than the base at the batch sizes that run:
a merged layer is a dense copy, and where the base reads its 4-bit codes faster than a copy (a
few rows on a CPU: linear.py's nf4 kernel) the adapter is cheaper left unmerged. The policy asks
the model runner about the median tokens per step in its window.

An operator can pin a merge (the MergeAdapter RPC), which the policy leaves alone, or turn the
policy off (`--merge-policy off`).

`MergePolicy` decides; `MergeControl` acts on it, on the engine thread, between two steps: it
owns what is merged, asks the policy every MERGE_CHECK_S (idle or not), and carries out an
operator's pinned merge. A merged adapter holds a reference to its device slot for as long as
it is merged, and one slot always stays for the rest of the traffic.

The policy's merges are prepared a slice at a time: computing the dense copies of every layer
an adapter targets takes about 0.3 s of the engine's time on a CPU, and done at once between
two steps it stopped every running request for that long (seen at the end of bursts, when the
last requests standing share one adapter). The engine thread copies the adapter's weights
(milliseconds), then computes the merged layers one unit at a time before each step, about a
fifth of the engine's time (MERGE_SLICE_SHARE of the time since the last slice: 10 ms before
the 40 ms steps of light load, 25 ms before the 100 ms steps of 64 rows; a unit is never
split), and swaps them in between two steps once all are ready; an idle engine goes on until
done or until a request or call comes. (The engine's one thread runs every tensor op: see
engine.py.) An operator's pinned merge (the MergeAdapter RPC) is done at once: its caller
waits for it.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections import Counter, deque
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from loraplex.core.errors import Exhausted, OverMemoryBudget
from loraplex.core.types import AdapterKey, AdapterVersion, AdapterWeights
from loraplex.server.config import MergeSettings
from loraplex.server.engine.request import EngineRequest
from loraplex.server.engine.slots import SlotTable
from loraplex.server.engine.state import MergeState

if TYPE_CHECKING:
    from loraplex.server.engine.forward import PreparedMerge
    from loraplex.server.engine.model_runner import ModelRunner

log = logging.getLogger(__name__)

TokenCounts = Counter[AdapterKey | None]  # None: the base model's tokens
MERGE_CHECK_S = 0.25  # how often the merge policy is asked
# While a merge is prepared, the work done before one step: this share of the time since the
# last slice (the step between them and that slice), within these bounds. A fixed 10 ms spread
# a merge of the embedded model (0.5-0.9 s of work) over 10 s of 64-row steps, most of a burst
# of one adapter's traffic served unmerged with the merge's work added to every step.
MERGE_SLICE_SHARE = 0.2
MERGE_SLICE_S = 0.01  # at least
MERGE_SLICE_MAX_S = 0.05  # at most
MERGE_QUEUE_LOOKAHEAD = 64  # queued requests counted in the merge policy's token shares
SLOT_RETRY_S = 1.0  # the retry advice when no slot can hold the adapter to merge
LoadSlot = Callable[[int, AdapterVersion, AdapterWeights | None], None]


class TokenWindow:
    """Tokens per adapter over the last `size` tokens (whole steps: it may hold a step more)
    and, with `seconds`, over that much time only: under light load the window follows what
    runs now, not what ran minutes ago."""

    def __init__(self, size: int, seconds: float = float("inf")) -> None:
        self.size = size
        self.seconds = seconds
        self.counts: TokenCounts = Counter()
        self.total = 0
        self._steps: deque[tuple[float, TokenCounts]] = deque()

    def add(self, step: TokenCounts, now: float = 0.0) -> None:
        if not step:
            return
        self._steps.append((now, step))
        self.counts.update(step)
        self.total += sum(step.values())
        while self._steps and self.total - sum(self._steps[0][1].values()) >= self.size:
            self._drop()
        self.expire(now)

    def step_tokens(self) -> float:
        """The median tokens of the steps in the window (0 when empty)."""
        if not self._steps:
            return 0.0
        return float(statistics.median(sum(step.values()) for _, step in self._steps))

    def expire(self, now: float) -> None:
        """Drop the steps older than `seconds`."""
        while self._steps and now - self._steps[0][0] > self.seconds:
            self._drop()

    def _drop(self) -> None:
        _, old = self._steps.popleft()
        self.counts.subtract(old)
        self.total -= sum(old.values())
        self.counts = +self.counts  # drop zeros


@dataclass(frozen=True)
class Shares:
    leader: AdapterKey | None  # the adapter (not the base) with the most tokens
    leader_share: float
    merged_share: float  # the merged adapter's share (0 when none is merged)


class MergePolicy:
    """Decides; the engine acts (it owns the slots and the weights)."""

    def __init__(
        self,
        settings: MergeSettings,
        clock: Callable[[], float] = time.monotonic,
        pays: Callable[[float], bool] = lambda step_tokens: True,
    ) -> None:
        """`pays(step_tokens)`: whether merged layers are as fast as the base's at steps of
        that many tokens."""
        self.settings = settings
        self.window = TokenWindow(settings.window_tokens, settings.window_seconds)
        self._clock = clock
        self._pays = pays
        self._changed_at = -float("inf")
        self._since: float | None = None  # when the first step was observed

    def observe(self, step: TokenCounts) -> None:
        """The tokens one engine step processed, per adapter."""
        now = self._clock()
        if self._since is None and step:
            self._since = now
        self.window.add(step, now)

    def _enough_seen(self, now: float, queued: TokenCounts) -> bool:
        """Half a window of tokens (seen or queued), or (light load: that many may never
        come) steps observed for half the window's time and some in the window now."""
        s = self.settings
        if self.window.total + sum(queued.values()) >= s.window_tokens // 2:
            return True
        observed = self._since is not None and now - self._since >= s.window_seconds / 2
        return observed and self.window.total > 0

    def shares(self, merged: AdapterKey | None, queued: TokenCounts) -> Shares:
        self.window.expire(self._clock())
        counts = self.window.counts + queued
        total = sum(counts.values())
        if total == 0:
            return Shares(leader=None, leader_share=0.0, merged_share=0.0)
        adapters = [(n, key) for key, n in counts.items() if key is not None]
        leader = max(adapters, default=(0, None))
        merged_share = counts[merged] / total if merged is not None else 0.0
        return Shares(leader=leader[1], leader_share=leader[0] / total, merged_share=merged_share)

    def decide(self, merged: AdapterKey | None, queued: TokenCounts) -> AdapterKey | None:
        """The adapter that should be merged now (None: none), given what is merged now and
        the tokens queued requests will bring. Returns `merged` to leave things as they are."""
        s, now = self.settings, self._clock()
        if s.policy == "off" or now - self._changed_at < s.min_interval_s:
            return merged
        self.window.expire(now)
        if not self._enough_seen(now, queued):  # too little seen to judge
            return merged
        shares = self.shares(merged, queued)
        want = merged
        if merged is not None and (
            shares.merged_share < s.unmerge_share
            or (shares.leader != merged and shares.leader_share >= s.merge_share)
        ):
            want = None
        if want is None and shares.leader is not None and shares.leader_share >= s.merge_share:
            want = shares.leader
        if want is not None and not self._pays(self.window.step_tokens()):
            want = None  # the base is faster than a merged copy at these batch sizes
        return want

    def changed(self) -> None:
        """The engine merged or unmerged: start the minimum interval."""
        self._changed_at = self._clock()


@dataclass
class _Pending:
    """A policy's merge being prepared, a slice before each step."""

    key: AdapterKey
    slot: int  # its reference is held, and the slot held, from the start
    steps: Generator[None, None, PreparedMerge]
    spent_s: float = 0.0  # the engine's time spent on it so far
    slices: int = 0


class MergeControl:
    """What is merged into the base, and every change to it (engine thread only)."""

    def __init__(
        self,
        settings: MergeSettings,
        slots: SlotTable,
        runner: Callable[[], ModelRunner],
        load_slot: LoadSlot,
    ) -> None:
        self.policy = MergePolicy(settings, pays=self._pays)
        self._slots = slots
        self._runner = runner
        self._load_slot = load_slot  # writes an adapter into a slot (clears it on failure)
        self.key: AdapterKey | None = None
        self.slot: int | None = None  # the merged adapter's slot (its reference is held)
        self.pinned = False  # by an operator: the policy leaves it alone
        self.merges = 0
        self.unmerges = 0
        self.last_merge_s = 0.0
        self.last_unmerge_s = 0.0
        self._shares = Shares(
            leader=None, leader_share=0.0, merged_share=0.0
        )  # at the policy's last look
        self._next_check = 0.0
        self._considered_at = time.monotonic()  # the last `consider` (once a step)
        self._pending: _Pending | None = None
        # adapters whose dense copies do not fit the budget (which does not change once the
        # base's copies are made): the policy leaves them unmerged, saying so once
        self._over_budget: set[AdapterKey] = set()

    def configure(self, settings: MergeSettings) -> None:
        """A new policy (its window starts empty); what is merged stays until it decides, and
        a merge the old one was preparing is dropped."""
        if self._pending is not None:
            self._abandon()
        self.policy = MergePolicy(settings, pays=self._pays)
        self._next_check = 0.0  # asked at the next step

    def _pays(self, step_tokens: float) -> bool:
        return self._runner().merge_pays(step_tokens)

    def observe(self, step: TokenCounts) -> None:
        self.policy.observe(step)

    def consider(
        self,
        peek: Callable[[int], list[EngineRequest]],
        idle: bool = False,
        wanted: Callable[[], bool] = lambda: False,
    ) -> None:
        """Ask the policy (every MERGE_CHECK_S) and merge or unmerge as it says; unmerge at
        once when a queued request (`peek(n)`: the first n in line) needs the merged slot.
        A merge being prepared gets its slice of work (when the engine is `idle`: until it is
        done or the engine is `wanted`, a request or call waiting) and is installed once
        ready, or abandoned when the policy no longer wants it."""
        now = time.monotonic()
        since, self._considered_at = now - self._considered_at, now
        if self._pending is not None:
            if idle:
                self._advance(None, wanted)
            else:
                share = MERGE_SLICE_SHARE * since
                self._advance(min(MERGE_SLICE_MAX_S, max(MERGE_SLICE_S, share)))
        if self.pinned or now < self._next_check:
            return
        self._next_check = now + MERGE_CHECK_S
        slots = self._slots
        queued: TokenCounts = Counter()
        starved = False
        for request in peek(MERGE_QUEUE_LOOKAHEAD):
            key = request.adapter.key if request.adapter is not None else None
            queued[key] += len(request.prompt_ids) + request.params.max_new_tokens
            starved |= key is not None and slots.lookup(key) is None
        pending = self._pending
        current = pending.key if pending is not None else self.key  # as the policy sees it
        starved = starved and current is not None and not slots.has_room()
        self._shares = self.policy.shares(current, queued)
        want = None if starved else self.policy.decide(current, queued)
        if want is not None and want != current and not self._fits(want):
            want = None  # it leads but stays unmerged, and what is merged no longer leads
        if want == current:
            return
        if pending is not None:
            self._abandon()
        elif self.key is not None:
            self._unmerge()
        slot = slots.lookup(want) if want is not None else None
        # Resident (it leads the traffic, so it normally is), and a slot stays for the rest.
        if want is not None and slot is not None and slots.reserved() < slots.num_slots - 1:
            slots.acquire(want)
            self._prepare(want, slot)
        self.policy.changed()

    def _fits(self, key: AdapterKey) -> bool:
        """Whether the policy may merge `key`: False (said once) where its dense copies
        would pass the budget (a key not resident is not merged now: checked once it is)."""
        if key in self._over_budget:
            return False
        slot = self._slots.lookup(key)
        if slot is None:
            return True
        try:
            self._runner().check_merge(slot)
        except OverMemoryBudget as exc:
            log.warning("adapter %s v%d not merged, served unmerged: %s", *key, exc)
            self._over_budget.add(key)
            return False
        return True

    def _prepare(self, key: AdapterKey, slot: int) -> None:
        """Start preparing the merge of the adapter in `slot` (its reference taken): from
        now on the slot is held for it (never drained, counted as reserved)."""
        runner = self._runner()
        try:
            steps = runner.merge_steps(runner.merge_inputs(slot))
        except Exception:
            log.exception("merging adapter %s v%d failed; serving it unmerged", *key)
            self._slots.release(slot)
            return
        self._slots.held = {slot}
        self._pending = _Pending(key, slot, steps)

    def _advance(self, budget: float | None, stop: Callable[[], bool] = lambda: False) -> None:
        """Prepare the pending merge for up to `budget` seconds (None: to the end, unless
        `stop()` says so between two units; a unit is never split, and on a GPU the time is
        that of queueing its kernels); install it once ready."""
        pending = self._pending
        assert pending is not None
        start = time.perf_counter()
        prepared = None
        try:
            while prepared is None:
                try:
                    next(pending.steps)
                except StopIteration as done:
                    prepared = done.value
                if budget is not None and time.perf_counter() - start >= budget:
                    break
                if prepared is None and stop():
                    break
        except Exception:
            log.exception("merging adapter %s v%d failed; serving it unmerged", *pending.key)
            self._abandon()
            return
        pending.spent_s += time.perf_counter() - start
        pending.slices += 1
        if prepared is None:
            return
        try:
            layers = self._runner().install_merge(pending.slot, prepared)
        except Exception:
            log.exception("merging adapter %s v%d failed; serving it unmerged", *pending.key)
            self._runner().unmerge()
            self._abandon()
            return
        self._pending = None
        self._merged(pending.key, pending.slot, pending.spent_s)
        log.info(
            "adapter %s v%d merged into the base (%d layers, %.0f ms of work in %d slices "
            "between steps)",
            *pending.key,
            layers,
            pending.spent_s * 1e3,
            pending.slices,
        )

    def _abandon(self) -> None:
        """Drop the merge being prepared and give its slot back."""
        pending = self._pending
        assert pending is not None
        self._pending = None
        pending.steps.close()
        self._slots.held = set()
        self._slots.release(pending.slot)

    def merge_pinned(self, adapter: AdapterVersion, weights: AdapterWeights | None = None) -> None:
        """Merge `adapter` into the base and keep it merged until `unmerge_pinned`. What was
        merged before stays merged when no slot can be had, the adapter fails to load or its
        dense copies would pass the budget."""
        key, slots = adapter.key, self._slots
        if self._pending is not None:  # the policy's merge being prepared
            if self._pending.key == key:
                self._advance(None)  # finish it: the same merge
            else:
                self._abandon()
        if self.key == key:
            self.pinned = True
            return
        taken = slots.reserved() - (1 if self.key is not None else 0)
        grant = slots.acquire(key) if taken < slots.num_slots - 1 else None
        if grant is None:
            raise Exhausted(
                "no device slot can hold the adapter to merge: every slot is in use, pinned "
                f"or merged (max_loras={slots.num_slots}, one slot stays for the rest)",
                SLOT_RETRY_S,
            )
        try:
            if grant.needs_load:
                self._load_slot(grant.slot, adapter, weights)
            self._runner().check_merge(grant.slot)  # before what is merged is undone
            if self.key is not None:
                self._unmerge()
            self._merge_slot(key, grant.slot)
        except Exception:
            slots.release(grant.slot)
            if grant.needs_load:
                slots.discard(grant.slot)
            raise
        self.pinned = True
        self.policy.changed()

    def unmerge_pinned(self) -> None:
        """Undo the merge, pinned or not; the policy decides again after its minimum interval."""
        if self._pending is not None:
            self._abandon()
            self.policy.changed()
        if self.key is not None:
            self._unmerge()
            self.policy.changed()

    def state(self) -> MergeState:
        return MergeState(
            adapter=self.key,
            pinned=self.pinned,
            merges=self.merges,
            unmerges=self.unmerges,
            last_merge_s=self.last_merge_s,
            last_unmerge_s=self.last_unmerge_s,
            leader=self._shares.leader,
            leader_share=self._shares.leader_share,
            merged_share=self._shares.merged_share,
        )

    def _merge_slot(self, key: AdapterKey, slot: int) -> None:
        """Fold the adapter in `slot` (the caller took a reference to it) into the base, at
        once."""
        start = time.perf_counter()
        layers = self._runner().merge(slot)
        seconds = time.perf_counter() - start
        self._merged(key, slot, seconds)
        log.info("adapter %s v%d merged into the base (%d layers, %.0f ms)", *key, layers,
                 seconds * 1e3)  # fmt: skip

    def _merged(self, key: AdapterKey, slot: int, seconds: float) -> None:
        self.key, self.slot = key, slot
        self._slots.held = {slot}
        self.merges += 1
        self.last_merge_s = seconds

    def _unmerge(self) -> None:
        assert self.key is not None and self.slot is not None
        start = time.perf_counter()
        self._runner().unmerge()
        self._slots.held = set()
        self._slots.release(self.slot)
        seconds = time.perf_counter() - start
        log.info("adapter %s v%d unmerged (%.1f ms)", *self.key, seconds * 1e3)
        self.key, self.slot, self.pinned = None, None, False
        self.unmerges += 1
        self.last_unmerge_s = seconds
