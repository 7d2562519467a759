"""What one generate request did, recorded by the request path as it runs and handed, once it
ended, to observers (Prometheus metrics, the request log). Timestamps are time.monotonic()."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from loraplex.core.errors import CANCELLED, INTERNAL, OK, status_code

request_log = logging.getLogger("loraplex.requests")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # fullmatched: no trailing newline


def request_id(given: object = None) -> str:
    """The id a caller gave its request (e.g. x-request-id) when it is a sensible one, else a
    new one: it goes into logs and back to the caller."""
    return given if isinstance(given, str) and _REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


@dataclass
class RequestRecord:
    request_id: str
    tenant: str
    arrival: float
    # The adapter asked for, once valid (see registry.loggable_id); the one served once
    # resolved, with its version (0: none was, and metrics count it under no adapter).
    adapter_id: str = ""
    adapter_version: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    queued: float | None = None  # when it entered the engine's queue
    admitted: float | None = None  # when the engine admitted it (None: it never ran)
    loaded: float | None = None  # its adapter in a device slot
    prefill_started: float | None = None  # the first step with its prompt began
    first_emitted: float | None = None  # the engine emitted its first token
    first_token: float | None = None
    last_token: float | None = None
    token_gaps: list[float] = field(default_factory=list)  # between consecutive outputs
    finished: float | None = None
    finish_reason: str = ""  # "stop" | "length" | "" (it did not finish)
    code: str = OK  # the canonical status code it ended with (core/errors.py)
    protocol: str = "grpc"  # the front end it came by: "grpc" or "http"
    prompt: str = ""  # only when prompts are logged
    text: str = ""  # only when outputs are logged

    def output(self, now: float, tokens: int) -> None:
        """An output with `tokens` new tokens arrived at `now`."""
        if tokens <= 0:
            return
        if self.first_token is None:
            self.first_token = now
        elif self.last_token is not None:
            self.token_gaps.append((now - self.last_token) / tokens)
        self.last_token = now
        self.completion_tokens += tokens

    def fail(self, exc: BaseException) -> None:
        self.code = code_name(exc)


def code_name(exc: BaseException) -> str:
    """The status a request ending with `exc` gets (a client gone away is CANCELLED)."""
    if isinstance(exc, GeneratorExit | asyncio.CancelledError):
        return CANCELLED
    return status_code(exc) or INTERNAL


class RequestObserver(Protocol):
    def finished(self, record: RequestRecord) -> None: ...


class Observers:
    """Several observers as one; an observer that fails is logged, never the request's fault."""

    def __init__(self, observers: Sequence[RequestObserver] = ()) -> None:
        self.observers = list(observers)

    def finished(self, record: RequestRecord) -> None:
        for observer in self.observers:
            try:
                observer.finished(record)
            except Exception:
                logging.getLogger(__name__).exception("request observer failed")


class RequestLog:
    """One log line per request: ids, tenant, adapter and version, token counts and timings
    (prompts and outputs only when asked for)."""

    def __init__(self, log_text: bool = False) -> None:
        self.log_text = log_text

    def finished(self, record: RequestRecord) -> None:
        end = record.finished or record.arrival
        fields: dict[str, object] = {
            "request_id": record.request_id,
            "protocol": record.protocol,
            "tenant": record.tenant,
            "adapter_id": record.adapter_id,
            "adapter_version": record.adapter_version,
            "code": record.code,
            "finish_reason": record.finish_reason,
            "prompt_tokens": record.prompt_tokens,
            "completion_tokens": record.completion_tokens,
            "queue_s": _seconds(record.admitted, record.queued or record.arrival),
            "ttft_s": _seconds(record.first_token, record.arrival),
            "e2e_s": round(end - record.arrival, 6),
            "ttft_breakdown": ttft_breakdown(record),
        }
        if self.log_text:
            fields.update(prompt=record.prompt, output=record.text)
        request_log.info(
            "request %s %s: %d prompt + %d completion tokens",
            record.request_id,
            record.code,
            record.prompt_tokens,
            record.completion_tokens,
            extra={"fields": fields},
        )


def ttft_breakdown(record: RequestRecord) -> dict[str, float | None]:
    """Where a request's time to first token went, in seconds (None: it did not get there):
    prepare (resolve, tokenize, compile its constraint, admit under quotas), queue (waiting
    for admission), load (its adapter into a device slot), wait (for the engine's next step
    after that: the step in flight), prefill (the steps that carried its prompt, beside the
    running decodes, up to its first token), deliver (from the engine thread to the event
    loop)."""
    marks = [
        record.arrival,
        record.queued,
        record.admitted,
        record.loaded,
        record.prefill_started,
        record.first_emitted,
        record.first_token,
    ]
    names = ("prepare_s", "queue_s", "load_s", "wait_s", "prefill_s", "deliver_s")
    return {
        name: None if start is None or end is None else round(end - start, 6)
        for name, start, end in zip(names, marks, marks[1:], strict=False)
    }


def _seconds(at: float | None, since: float) -> float | None:
    return None if at is None else round(at - since, 6)
