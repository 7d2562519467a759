"""When to fold one adapter into the base weights (as dLoRA does), and when to take it out.

Merged, the dominant adapter's requests run at base speed (no LoRA work at all for them) and
every other request subtracts its delta again (model_runner.ModelRunner._plans): the same math
(the merged weights are rounded to the compute dtype once, so outputs move at that rounding's
level), but one more LoRA product for those tokens. So merging pays when one adapter carries most of
the tokens, and costs when traffic is mixed. The policy looks at the share of the last
`window_tokens` tokens the engine processed (prompt and generated), plus the tokens the queued
requests will bring (prompt + max_new_tokens: the queue mix of the near future), and keeps a
gap between its thresholds (hysteresis) and a minimum time between changes, so a share hovering
near a threshold does not flap:

    merge M      when M's share >= merge_share     (and the window holds enough tokens)
    unmerge M    when M's share <  unmerge_share   (or another adapter leads with >= merge_share)

An operator can pin a merge (the MergeAdapter RPC), which the policy leaves alone, or turn the
policy off (`--merge-policy off`).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

AdapterKey = tuple[str, int]  # (adapter id, version)
TokenCounts = Counter[AdapterKey | None]  # None: the base model's tokens
MERGE_POLICIES = ("auto", "off")


@dataclass(frozen=True)
class MergeSettings:
    policy: Literal["auto", "off"] = "auto"
    """auto: merge a dominant adapter and unmerge it when it no longer dominates; off: only
    an operator's MergeAdapter call merges."""
    merge_share: float = 0.9
    """Merge the adapter with at least this share of recent (and queued) tokens."""
    unmerge_share: float = 0.75
    """Unmerge it when its share falls below this (below merge_share: hysteresis)."""
    window_tokens: int = 4096
    """Recent tokens the shares are taken over."""
    min_interval_s: float = 5.0
    """Least time between two changes (a merge costs a pass over the targeted layers)."""

    def __post_init__(self) -> None:
        if self.policy not in MERGE_POLICIES:
            raise ValueError(f"merge policy must be auto or off, got {self.policy!r}")
        if not 0 < self.unmerge_share <= self.merge_share <= 1:
            raise ValueError(
                "need 0 < unmerge_share <= merge_share <= 1, got "
                f"{self.unmerge_share} and {self.merge_share}"
            )
        if self.window_tokens < 1 or self.min_interval_s < 0:
            raise ValueError("window_tokens must be >= 1 and min_interval_s >= 0")


class TokenWindow:
    """Tokens per adapter over the last `size` tokens (whole steps: it may hold a step more)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.counts: TokenCounts = Counter()
        self.total = 0
        self._steps: deque[TokenCounts] = deque()

    def add(self, step: TokenCounts) -> None:
        if not step:
            return
        self._steps.append(step)
        self.counts.update(step)
        self.total += sum(step.values())
        while self._steps and self.total - sum(self._steps[0].values()) >= self.size:
            old = self._steps.popleft()
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
        self, settings: MergeSettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self.window = TokenWindow(settings.window_tokens)
        self._clock = clock
        self._changed_at = -float("inf")

    def observe(self, step: TokenCounts) -> None:
        """The tokens one engine step processed, per adapter."""
        self.window.add(step)

    def shares(self, merged: AdapterKey | None, queued: TokenCounts) -> Shares:
        counts = self.window.counts + queued
        total = sum(counts.values())
        if total == 0:
            return Shares(None, 0.0, 0.0)
        adapters = [(n, key) for key, n in counts.items() if key is not None]
        leader = max(adapters, default=(0, None))
        merged_share = counts[merged] / total if merged is not None else 0.0
        return Shares(leader[1], leader[0] / total, merged_share)

    def decide(self, merged: AdapterKey | None, queued: TokenCounts) -> AdapterKey | None:
        """The adapter that should be merged now (None: none), given what is merged now and
        the tokens queued requests will bring. Returns `merged` to leave things as they are."""
        s = self.settings
        if s.policy == "off" or self._clock() - self._changed_at < s.min_interval_s:
            return merged
        if self.window.total < s.window_tokens // 2:  # too little seen to judge
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
        return want

    def changed(self) -> None:
        """The engine merged or unmerged: start the minimum interval."""
        self._changed_at = self._clock()
