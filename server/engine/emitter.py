"""Outputs emitted off the engine thread (`--async-output`): detokenizing and handing each
request its news run on a thread of their own while the engine runs its next step.

Every emit of a request adopted here goes through one queue (QueuedEmit), so a request sees
its outputs and its end (an error, a cancel) in the order the engine produced them. A token's
text is rendered on this thread too where nothing the engine decides depends on it: a request
without stop strings, whose end is decided by tokens alone (end-of-sequence, stop tokens,
max_new_tokens, the context, its constraint). A request with stop strings has its text
rendered on the engine thread, which must see the stop to end it, and only its emits queued.

No torch work runs here (the engine's one-thread rule is about torch's OpenMP pools): a
tokenizer's decode and the front ends' callbacks.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from loraplex.server.engine.request import EngineRequest, RequestOutput

log = logging.getLogger(__name__)

Emit = Callable[[RequestOutput | BaseException], None]


class QueuedEmit:
    """A request's emit through the output thread: `direct` (the front end's callback) is
    called there, in queue order."""

    def __init__(self, outputs: OutputThread, direct: Emit) -> None:
        self.outputs = outputs
        self.direct = direct

    def __call__(self, item: RequestOutput | BaseException) -> None:
        self.outputs.put(lambda: self.direct(item))

    def later(self, make: Callable[[], RequestOutput]) -> None:
        """Emit what `make` returns, made on the output thread (a token's text)."""
        self.outputs.put(lambda: self.direct(make()))

    def delivered(self, request: EngineRequest) -> None:
        """Stamp the request's first output when the front end gets it, not when queued."""

        def stamp() -> None:
            if request.first_emitted is None:
                request.first_emitted = time.monotonic()

        self.outputs.put(stamp)


class OutputThread:
    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="loraplex-output", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def adopt(self, request: EngineRequest) -> None:
        """Route the request's emits through this thread (before the engine sees it)."""
        if not isinstance(request.emit, QueuedEmit):
            request.emit = QueuedEmit(self, request.emit)

    def put(self, work: Callable[[], None]) -> None:
        self._queue.put(work)

    def stop(self, timeout: float = 30.0) -> None:
        """Emit everything queued, then end the thread."""
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while (work := self._queue.get()) is not None:
            try:
                work()
            except Exception:  # one request's failure never stops the others' outputs
                log.exception("emitting an output failed")
