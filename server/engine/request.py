"""What enters the engine (a request) and what comes out of it (outputs)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.core.errors import InvalidRequest
from loraplex.core.types import AdapterVersion, AdapterWeights

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (benchmarks)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise InvalidRequest("temperature", f"must be >= 0, got {self.temperature}")
        if not math.isfinite(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest("top_k", f"must be >= 0 (0 = no limit), got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequest("seed", f"must be in [0, 2^63), got {self.seed}")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise InvalidRequest("stop", f"at most {MAX_STOP_STRINGS} stop strings")
        for s in self.stop:
            if not s or len(s) > MAX_STOP_LENGTH:
                raise InvalidRequest("stop", f"stop strings must be 1-{MAX_STOP_LENGTH} characters")

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows float32: decoding is greedy in effect.
        return self.temperature < GREEDY_BELOW


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class RequestOutput:
    """One step's news for a request: new text (whole UTF-8) and, at the end, why it stopped."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | None while running
    stop_reason: str | None = None  # the stop string that matched, if any
    usage: Usage | None = None  # set with finish_reason


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterVersion | None  # None = the base model
    # Called on the engine thread with each output, or with an exception that ends the
    # request; it must not block (the front end hands it to its event loop).
    emit: Callable[[RequestOutput | BaseException], None]
    # The adapter's weights, held in the host cache while the request lives (None: the engine
    # reads them through its `load_weights`).
    weights: AdapterWeights | None = None
    tenant: str = ""  # whose request it is: admission shares the engine fairly between tenants
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # when its client gives up (time.monotonic), if it said
    admitted: float | None = None  # when it joined the running batch (set by the engine)

    def cancel(self) -> None:
        """Thread-safe: the engine drops the request at its next step."""
        self.cancelled.set()
