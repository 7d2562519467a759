"""The engine's measured pace, and admission that refuses at once what cannot finish before its
client's deadline (and takes out of the queue what no longer can)."""

from __future__ import annotations

import time

import pytest

from loraplex.core.errors import Unmeetable
from loraplex.server.config import EngineConfig
from loraplex.server.engine.pacing import Pacing
from loraplex.server.engine.request import EngineRequest, SamplingParams
from loraplex.server.engine.scheduler import Scheduler
from loraplex.server.engine.slots import SlotTable


def test_nothing_measured_estimates_nothing():
    pacing = Pacing(rows=4, prefill_tokens=8)
    assert pacing.run_s(100, 50) == 0.0
    assert pacing.wait_s(time.monotonic(), ahead=100, running=4, run_s=0.0) == 0.0
    assert pacing.finish_rate(time.monotonic()) is None


def test_run_time_is_steps_of_the_average_step():
    pacing = Pacing(rows=4, prefill_tokens=8)
    pacing.step(0.1)
    assert pacing.run_s(prompt_tokens=17, new_tokens=10) == pytest.approx(0.1 * (3 + 10))
    for _ in range(200):
        pacing.step(0.2)
    assert pacing.run_s(8, 1) == pytest.approx(0.2 * 2, rel=1e-3)


def test_requests_that_stop_at_eos_are_expected_to_generate_what_requests_of_late_did():
    pacing = Pacing(rows=4, prefill_tokens=8)
    assert pacing.expected_tokens(2000, ignore_eos=False) == 2000  # nothing measured
    for _ in range(100):
        pacing.generated(50)
    assert pacing.expected_tokens(2000, ignore_eos=False) == 50
    assert pacing.expected_tokens(20, ignore_eos=False) == 20
    assert pacing.expected_tokens(2000, ignore_eos=True) == 2000  # a fixed length


def test_wait_is_zero_with_a_free_row_and_follows_the_finish_rate_otherwise():
    pacing = Pacing(rows=4, prefill_tokens=8)
    now = time.monotonic()
    for i in range(11):  # 10 finishes a second over the last second
        pacing.finished(now - 1.0 + i / 10)
    assert pacing.finish_rate(now) == pytest.approx(10.0)
    assert pacing.wait_s(now, ahead=0, running=3, run_s=1.0) == 0.0
    # 20 ahead, none free: 21 must leave first, at 10 a second (a full batch of 1 s requests
    # would free only 4 a second: the larger rate is taken)
    assert pacing.wait_s(now, ahead=20, running=4, run_s=1.0) == pytest.approx(2.1)
    # before any finish: rows free as a full batch of requests like this one would
    fresh = Pacing(rows=4, prefill_tokens=8)
    assert fresh.wait_s(now, ahead=7, running=4, run_s=2.0) == pytest.approx(8 / 2.0)


def request(
    name: str, new_tokens: int, deadline_s: float | None, tenant: str = ""
) -> EngineRequest:
    deadline = None if deadline_s is None else time.monotonic() + deadline_s
    return EngineRequest(
        name,
        [1, 2, 3],
        SamplingParams(new_tokens),
        None,
        lambda item: None,
        tenant=tenant,
        deadline=deadline,
    )


def busy_scheduler(step_s: float, rows: int = 2) -> Scheduler:
    config = EngineConfig(max_batch_size=rows, max_prefill_tokens=512)
    scheduler = Scheduler(config, SlotTable(2))
    scheduler.pacing.step(step_s)
    return scheduler


def test_a_request_that_cannot_finish_before_its_deadline_is_refused_at_once():
    scheduler = busy_scheduler(step_s=0.1)
    # 100 new tokens at 0.1 s a step: 10.1 s; the client waits 5
    with pytest.raises(Unmeetable, match="deadline") as refused:
        scheduler.add(request("slow", 100, deadline_s=5.0))
    assert refused.value.retry_after_s >= 1.0
    assert scheduler.num_waiting() == 0
    scheduler.add(request("fits", 10, deadline_s=5.0))  # 1.1 s: queued
    scheduler.add(request("no-deadline", 100, deadline_s=None))
    assert scheduler.num_waiting() == 2


def test_the_queue_ahead_counts_against_the_deadline():
    scheduler = busy_scheduler(step_s=0.1, rows=1)
    for i in range(5):  # 1.1 s each; a batch of one row: they run one after another
        scheduler.add(request(f"r{i}", 10, deadline_s=None))
    with pytest.raises(Unmeetable):
        scheduler.add(request("late", 10, deadline_s=3.0))  # 5 ahead: about 6 s to wait
    scheduler.add(request("patient", 10, deadline_s=30.0))
    # another tenant's request waits behind about as many of each tenant's as of its own
    scheduler.add(request("other", 10, deadline_s=3.0, tenant="other"))


def test_queued_requests_that_can_no_longer_finish_are_taken_out():
    scheduler = busy_scheduler(step_s=0.1)
    doomed = request("doomed", 10, deadline_s=5.0)
    scheduler.add(doomed)
    scheduler.add(request("fine", 10, deadline_s=60.0))
    scheduler.add(request("no-deadline", 10, deadline_s=None))
    assert scheduler.remove_unmeetable() == []
    assert doomed.deadline is not None
    doomed.deadline = time.monotonic() + 0.5  # time passed while it waited: 1.1 s > 0.5 s
    assert scheduler.remove_unmeetable() == [doomed]
    assert scheduler.num_waiting() == 2
