"""How fast the engine serves, measured as it runs: for admission to refuse at once a request
that cannot finish before its client's deadline, instead of queueing work the client will have
given up on before it is done.

Three figures, all from the engine's recent history: the time of a step (a running request
gains one token a step), the rate at which requests finish (a waiting request starts once
enough running ones have left) and the tokens requests that may stop early generate. From them,
a request that finds `ahead` requests waiting before it and the batch full starts in about
(ahead + 1 - free rows) / finish rate seconds and then runs about (its prompt's chunks + its
new tokens) steps: its max_new_tokens where it ignores EOS (a fixed length), otherwise no more
than requests of late have generated on average (a chat request asks for 2000 tokens and
stops at 50). The finish rate taken is the larger of the one measured (low while the server
was not full) and the one of a full batch of requests as long as this one (all there is before
requests finish, in a burst that arrives at once): a refusal must be sure, and a request that
turns out late is still taken out of the queue while its client listens. Nothing is refused
before a step was measured.
"""

from __future__ import annotations

import math
import threading
from collections import deque

STEP_WEIGHT = 0.1  # the exponential average of the step time: the weight of the newest step
TOKENS_WEIGHT = 0.1  # ... of the tokens a request generates: the newest one's weight
FINISH_WINDOW = 64  # the finish rate: over the last this many finishes
FINISH_MAX_AGE_S = 120.0  # ... that happened within this many seconds


class Pacing:
    """Thread-safe: the engine thread records, admission (any thread) estimates."""

    def __init__(self, rows: int, prefill_tokens: int) -> None:
        self.rows = rows  # requests that run at once
        self.prefill_tokens = prefill_tokens  # prompt tokens a step takes
        self._lock = threading.Lock()
        self._step_s: float | None = None
        self._tokens: float | None = None  # tokens a request generates, on average of late
        self._finishes: deque[float] = deque(maxlen=FINISH_WINDOW)

    def step(self, seconds: float) -> None:
        """A step that decoded took `seconds`."""
        with self._lock:
            last = self._step_s
            self._step_s = seconds if last is None else last + STEP_WEIGHT * (seconds - last)

    def generated(self, tokens: int) -> None:
        """A request that could stop early (at EOS or a stop string) finished with `tokens`."""
        with self._lock:
            last = self._tokens
            self._tokens = tokens if last is None else last + TOKENS_WEIGHT * (tokens - last)

    def expected_tokens(self, max_new_tokens: int, ignore_eos: bool) -> int:
        """The tokens a request will likely generate: all it asks for where it ignores EOS (or
        before any request finished), else at most the average of late."""
        with self._lock:
            typical = self._tokens
        if ignore_eos or typical is None:
            return max_new_tokens
        return min(max_new_tokens, math.ceil(typical))

    def finished(self, now: float) -> None:
        """A running request left the batch at `now` (time.monotonic)."""
        with self._lock:
            self._finishes.append(now)

    def finish_rate(self, now: float) -> float | None:
        """Requests finished per second lately (None: too few to say)."""
        with self._lock:
            recent = [t for t in self._finishes if now - t <= FINISH_MAX_AGE_S]
        if len(recent) < 2:
            return None
        span = max(now - recent[0], 1e-3)
        return (len(recent) - 1) / span

    def wait_s(self, now: float, ahead: int, running: int, run_s: float) -> float:
        """About how long a request that `ahead` waiting ones precede, and that runs `run_s`
        once admitted, waits for a row (0 when one is free for it, or nothing has been
        measured yet)."""
        must_leave = ahead + 1 - max(0, self.rows - running)
        if must_leave <= 0:
            return 0.0
        rates = [self.finish_rate(now), self.rows / run_s if run_s > 0 else None]
        known = [r for r in rates if r is not None]
        return must_leave / max(known) if known else 0.0

    def run_s(self, prompt_tokens: int, new_tokens: int) -> float:
        """About how long a request runs once admitted: its prompt's chunks and one step per
        new token (0 when no step has been measured yet)."""
        with self._lock:
            step = self._step_s
        if step is None:
            return 0.0
        return step * (math.ceil(prompt_tokens / max(1, self.prefill_tokens)) + new_tokens)
