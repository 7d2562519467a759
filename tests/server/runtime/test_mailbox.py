"""The engine thread's outputs reach the event loop's queues in order, one wake-up per batch."""

from __future__ import annotations

import asyncio
import threading

import pytest

from loraplex.server.runtime.mailbox import LoopMailbox


def test_a_batch_posted_from_another_thread_arrives_in_order_with_one_wake_up():
    async def main() -> None:
        loop = asyncio.get_running_loop()
        mailbox = LoopMailbox(loop)
        queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(4)]
        wake_ups = 0
        schedule = loop.call_soon_threadsafe

        def counted(callback, *args):  # type: ignore[no-untyped-def]
            nonlocal wake_ups
            wake_ups += callback == mailbox._deliver  # not the thread pool's own wake-ups
            return schedule(callback, *args)

        loop.call_soon_threadsafe = counted  # type: ignore[method-assign]

        def engine_step() -> None:  # one step's outputs
            for token in range(50):
                for queue in queues:
                    mailbox.post(queue, token)

        # The loop is held (joined, not awaited) while the thread posts: no delivery can run
        # in the middle, whatever the thread scheduling.
        thread = threading.Thread(target=engine_step)
        thread.start()
        thread.join()
        got = [[await asyncio.wait_for(q.get(), 5) for _ in range(50)] for q in queues]
        assert got == [list(range(50))] * 4
        assert wake_ups == 1  # 200 outputs, one delivery
        # The next batch schedules a delivery of its own.
        await asyncio.to_thread(mailbox.post, queues[0], 99)
        assert await asyncio.wait_for(queues[0].get(), 5) == 99 and wake_ups == 2

    asyncio.run(main())


def test_posting_to_a_closed_loop_raises_every_time():
    loop = asyncio.new_event_loop()
    mailbox = LoopMailbox(loop)
    queue: asyncio.Queue[int] = asyncio.Queue()
    mailbox.post(queue, 0)  # a delivery scheduled, never run: the loop closes first
    loop.close()
    for _ in range(2):  # not only the first: each emitter learns nobody listens
        with pytest.raises(RuntimeError):
            mailbox.post(queue, 1)
    assert not mailbox._items  # nothing kept for a loop that is gone


def test_posts_racing_with_deliveries_lose_nothing():
    async def main() -> None:
        mailbox = LoopMailbox(asyncio.get_running_loop())
        queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
        threads = [
            threading.Thread(target=lambda k=k: [mailbox.post(queue, (k, i)) for i in range(2000)])
            for k in range(3)
        ]
        for t in threads:
            t.start()
        got = [await asyncio.wait_for(queue.get(), 5) for _ in range(6000)]
        for t in threads:
            t.join()
        for k in range(3):  # each producer's items, all of them, in the order it posted them
            assert [i for j, i in got if j == k] == list(range(2000))
        assert queue.empty()

    asyncio.run(main())
