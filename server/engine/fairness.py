"""Fair sharing of the engine between tenants: a virtual token counter (VTC, from S-LoRA's
"Fairness in Serving Large Language Models", Sheng et al., OSDI 2024).

Each tenant has a counter of the service it received, in weighted tokens (prompt tokens when
prefilled, generated tokens as they come; a generated token costs more, as it does on the
hardware). Admission takes the waiting request of the tenant with the lowest counter, so a
tenant that floods the server only competes with its own requests: one that sends little is
served next whenever it sends.

A tenant that becomes active (its first queued or running request) is lifted to the lowest
counter among the active tenants, so idle time is not banked as credit to flood with later.
"""

from __future__ import annotations

from collections import Counter

PROMPT_WEIGHT = 1.0
OUTPUT_WEIGHT = 2.0


class VirtualTokenCounter:
    """Not thread-safe: the scheduler calls it under its lock."""

    def __init__(
        self, prompt_weight: float = PROMPT_WEIGHT, output_weight: float = OUTPUT_WEIGHT
    ) -> None:
        self.prompt_weight = prompt_weight
        self.output_weight = output_weight
        self._counters: dict[str, float] = {}
        self._active: Counter[str] = Counter()  # tenant -> its requests queued or running

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def arrive(self, tenant: str) -> None:
        """A request of `tenant` is queued."""
        if self._active[tenant] == 0:
            others = [self.counter(t) for t, n in self._active.items() if n > 0 and t != tenant]
            lifted = max(self.counter(tenant), min(others)) if others else self.counter(tenant)
            self._counters[tenant] = lifted
        self._active[tenant] += 1

    def leave(self, tenant: str) -> None:
        """A request of `tenant` left the server (finished, failed or cancelled)."""
        self._active[tenant] -= 1
        if self._active[tenant] <= 0:
            del self._active[tenant]
            if not self._active:  # nobody is active: start everyone afresh (bounded memory)
                self._counters.clear()

    def charge(self, tenant: str, prompt_tokens: int = 0, output_tokens: int = 0) -> None:
        cost = self.prompt_weight * prompt_tokens + self.output_weight * output_tokens
        self._counters[tenant] = self.counter(tenant) + cost
