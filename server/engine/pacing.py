"""How fast the engine serves, measured as it runs: for admission to refuse at once a request
that cannot finish before its client's deadline, instead of queueing work the client will have
given up on before it is done.

Two figures from the engine's recent history: the time of a step at each batch size (a
running request gains one token a step; on a CPU a step of 64 rows costs several of one row's)
and the tokens requests that may stop early generate. A request runs about (its prompt's
chunks + its new tokens) steps at the batch it will run in: its max_new_tokens where it ignores
EOS (a fixed length), otherwise no more than requests of late have generated on average (a chat
request asks for 2000 tokens and stops at 50). One that finds `ahead` requests waiting before
it and the batch full waits while (ahead + 1 - free rows) requests leave, and a full batch of
requests like it frees rows / (its run time) a second. (The rate at which requests did finish
lately is no better a guide: they leave in bursts, and not at all while the server was idle.)
Step times are kept per power-of-two batch size and interpolated between the sizes measured;
the engine times a full batch once at start, so the first burst is not judged by one row's
steps. The estimate leans early rather than late: a refusal must be sure, and a request that
turns out late is still taken out of the queue while its client listens. Nothing is refused
before a step was measured.
"""

from __future__ import annotations

import math
import threading

STEP_WEIGHT = 0.1  # the exponential average of the step time: the weight of the newest step
TOKENS_WEIGHT = 0.1  # ... of the tokens a request generates: the newest one's weight


class Pacing:
    """Thread-safe: the engine thread records, admission (any thread) estimates."""

    def __init__(self, rows: int, prefill_tokens: int) -> None:
        self.rows = rows  # requests that run at once
        self.prefill_tokens = prefill_tokens  # prompt tokens a step takes
        self._lock = threading.Lock()
        self._steps: dict[int, float] = {}  # batch size bucket -> average step seconds
        self._tokens: float | None = None  # tokens a request generates, on average of late

    def _bucket(self, batch: int) -> int:
        return min(self.rows, 1 << max(0, batch - 1).bit_length())

    def step(self, seconds: float, batch: int) -> None:
        """A step that decoded `batch` sequences took `seconds`."""
        key = self._bucket(batch)
        with self._lock:
            last = self._steps.get(key)
            self._steps[key] = seconds if last is None else last + STEP_WEIGHT * (seconds - last)

    def step_s(self, batch: int) -> float | None:
        """About how long a step of `batch` sequences takes: measured at its size, else
        interpolated between the sizes measured around it (the nearest one where there is
        only one side); None before any step."""
        key = self._bucket(batch)
        with self._lock:
            steps = dict(self._steps)
        if not steps:
            return None
        if key in steps:
            return steps[key]
        below = max((k for k in steps if k < key), default=None)
        above = min((k for k in steps if k > key), default=None)
        if below is None or above is None:
            return steps[below if above is None else above]  # type: ignore[index]
        share = (key - below) / (above - below)
        return steps[below] + share * (steps[above] - steps[below])

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

    def wait_s(self, ahead: int, running: int, run_s: float) -> float:
        """About how long a request that `ahead` waiting ones precede, and that runs `run_s`
        once admitted, waits for a row (0 when one is free for it, or nothing has been
        measured yet)."""
        must_leave = ahead + 1 - max(0, self.rows - running)
        if must_leave <= 0:
            return 0.0
        return must_leave * run_s / self.rows

    def run_s(self, prompt_tokens: int, new_tokens: int, batch: int) -> float:
        """About how long a request runs once admitted in a batch of `batch` sequences: its
        prompt's chunks and one step per new token (0 when no step has been measured yet)."""
        step = self.step_s(batch)
        if step is None:
            return 0.0
        return step * (math.ceil(prompt_tokens / max(1, self.prefill_tokens)) + new_tokens)
