"""Outputs from the engine thread to the event loop, one wake-up per batch of them.

Each engine step advances every running request by one token, and each of those outputs must
reach an asyncio queue on the event loop. Handing them over one by one
(`loop.call_soon_threadsafe` per output) writes the loop's wake-up pipe and schedules a
callback per token: at 64 requests, 64 system calls and callbacks per step, on the two cores
the step itself needs. A mailbox collects what the engine thread posts and wakes the loop
once for all that has arrived since it last delivered: usually a whole step's outputs.
Order is kept, per queue and overall.
"""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from typing import Any


class LoopMailbox:
    """Posts (queue, item) pairs from any thread into asyncio queues on one event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._items: deque[tuple[asyncio.Queue[Any], Any]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False  # a delivery is on its way to the loop

    def post(self, queue: asyncio.Queue[Any], item: Any) -> None:
        """Put `item` into `queue` on the loop, soon. Raises RuntimeError when the loop is
        closed (nobody is listening any more), every time: a delivery scheduled before it
        closed never runs, and what waits for it is dropped."""
        if self.loop.is_closed():
            with self._lock:
                self._items.clear()
            raise RuntimeError("the event loop is closed")
        with self._lock:
            self._items.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except BaseException:
            with self._lock:
                self._scheduled = False
                self._items.clear()
            raise

    def _deliver(self) -> None:
        """On the loop: everything posted so far, in order."""
        with self._lock:
            items, self._items = self._items, deque()
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)
