"""What enters the engine (a request) and what comes out of it (outputs)."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loraplex.core.errors import InvalidRequest
from loraplex.core.types import AdapterVersion, AdapterWeights
from loraplex.server.engine.structured import CompiledConstraint

GREEDY_BELOW = 1e-5  # temperatures under this decode greedily
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256
MAX_LOGPROBS = 20  # top log-probabilities per token (OpenAI's limit)
MAX_SAMPLES = 16  # `n`
MAX_LOGIT_BIAS = 1024  # entries of logit_bias
MAX_STOP_TOKENS = 64
PENALTY_RANGE = 2.0  # presence and frequency penalties lie in [-2, 2], as OpenAI's
BIAS_RANGE = 100.0  # logit_bias values lie in [-100, 100], as OpenAI's


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no limit
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # generate max_new_tokens whatever comes (benchmarks)
    n: int = 1  # samples of the one prompt (one prefill, then a sequence each)
    logprobs: int | None = None  # each token's log-probability and this many best (None: none)
    prompt_logprobs: int | None = None  # the same for every prompt token after the first
    presence_penalty: float = 0.0  # subtracted once from each token already generated
    frequency_penalty: float = 0.0  # subtracted per time a token was generated
    repetition_penalty: float = 1.0  # HF's: over prompt and output tokens (> 1 discourages)
    min_p: float = 0.0  # keep tokens at least this share of the most likely one's probability
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    stop_token_ids: tuple[int, ...] = ()  # end the sequence like an end-of-sequence token
    min_tokens: int = 0  # no end (EOS, stop token, stop string) before this many tokens
    include_stop_str_in_output: bool = False  # keep the stop string that ended the text

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
        if not 1 <= self.n <= MAX_SAMPLES:
            raise InvalidRequest("n", f"must be in [1, {MAX_SAMPLES}], got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise InvalidRequest(name, f"must be in [0, {MAX_LOGPROBS}], got {value}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value) or abs(value) > PENALTY_RANGE:
                raise InvalidRequest(name, f"must be in [-2, 2], got {value}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidRequest(
                "repetition_penalty", f"must be > 0 (1 = none), got {self.repetition_penalty}"
            )
        if not math.isfinite(self.min_p) or not 0 <= self.min_p <= 1:
            raise InvalidRequest("min_p", f"must be in [0, 1], got {self.min_p}")
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequest("logit_bias", f"at most {MAX_LOGIT_BIAS} entries")
        for token, bias in self.logit_bias:
            if not math.isfinite(bias) or abs(bias) > BIAS_RANGE:
                raise InvalidRequest(f"logit_bias.{token}", f"must be in [-100, 100], got {bias}")
        if len(self.stop_token_ids) > MAX_STOP_TOKENS:
            raise InvalidRequest("stop_token_ids", f"at most {MAX_STOP_TOKENS} token ids")
        if not 0 <= self.min_tokens <= self.max_new_tokens:
            raise InvalidRequest(
                "min_tokens",
                f"must be in [0, max_new_tokens = {self.max_new_tokens}], got {self.min_tokens}",
            )

    @property
    def greedy(self) -> bool:
        # Below this, logits / temperature overflows float32: decoding is greedy in effect.
        return self.temperature < GREEDY_BELOW

    @property
    def penalized(self) -> bool:
        """Whether the logits depend on the tokens seen so far (a penalty)."""
        return bool(self.presence_penalty or self.frequency_penalty) or (
            self.repetition_penalty != 1.0
        )

    def token_ids(self) -> tuple[int, ...]:
        """Every token id the parameters name (checked against the vocabulary)."""
        return tuple(t for t, _ in self.logit_bias) + self.stop_token_ids


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability (log-softmax of the model's float32 logits, after the
    request's adapter, before any penalty or temperature) and the best `top` of its position,
    most likely first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-probability)


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt's, read from the prefix cache


@dataclass(frozen=True)
class RequestOutput:
    """One step's news for one sample of a request: new text (whole UTF-8) and, at the end,
    why it stopped. A request with `n` samples ends once each of them has a finish reason."""

    text: str
    token_ids: list[int]
    finish_reason: str | None = None  # "stop" | "length" | None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    usage: Usage | None = None  # set with finish_reason: the prompt and this sample's tokens
    index: int = 0  # which of the request's `n` samples
    logprobs: tuple[TokenLogprob, ...] | None = None  # one per token of token_ids, if asked
    # On a request's first output (if asked): one per prompt token, None for the first.
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None


@dataclass
class EngineRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterVersion | None  # None = the base model
    # Called on the engine thread (the output thread with --async-output: emitter.py) with
    # each output, or with an exception that ends the request; it must not block (the front
    # end hands it to its event loop).
    emit: Callable[[RequestOutput | BaseException], None]
    # The adapter's weights, held in the host cache while the request lives (None: the engine
    # reads them through its `load_weights`).
    weights: AdapterWeights | None = None
    tenant: str = ""  # whose request it is: admission shares the engine fairly between tenants
    cache_salt: str = ""  # only requests with the same salt share cached prefixes (vLLM's)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrival: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # when its client gives up (time.monotonic), if it said
    # Where its time to first token goes, set by the engine (time.monotonic()): admitted
    # (chosen from the queue), its adapter in a device slot, the first step that carried its
    # prompt began, its first token emitted.
    admitted: float | None = None
    loaded: float | None = None
    prefill_started: float | None = None
    first_emitted: float | None = None
    # What its output must satisfy (structured outputs): each sample gets a matcher of its own.
    constraint: CompiledConstraint | None = None

    def cancel(self) -> None:
        """Thread-safe: the engine drops the request at its next step."""
        self.cancelled.set()
