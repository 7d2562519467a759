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
    assert pacing.run_s(100, 50, batch=1) == 0.0 and pacing.step_s(4) is None
    assert pacing.wait_s(ahead=100, running=4, run_s=0.0) == 0.0


def test_run_time_is_steps_of_the_average_step_at_the_batch_it_runs_in():
    pacing = Pacing(rows=64, prefill_tokens=8)
    pacing.step(0.1, batch=1)
    assert pacing.run_s(prompt_tokens=17, new_tokens=10, batch=1) == pytest.approx(0.1 * 13)
    for _ in range(200):
        pacing.step(0.2, batch=1)
    assert pacing.step_s(1) == pytest.approx(0.2, rel=1e-3)
    # one size measured: every batch is judged by it, until another is measured
    assert pacing.step_s(64) == pytest.approx(0.2, rel=1e-3)
    pacing.step(0.8, batch=64)
    assert pacing.step_s(64) == pytest.approx(0.8)
    assert pacing.step_s(33) == pytest.approx(0.8)  # bucket 64
    # between two sizes measured: interpolated (bucket 16 between 1 and 64)
    assert pacing.step_s(16) == pytest.approx(0.2 + (16 - 1) / (64 - 1) * 0.6, rel=1e-3)
    assert pacing.run_s(8, 1, batch=64) == pytest.approx(0.8 * 2)


def test_requests_that_stop_at_eos_are_expected_to_generate_what_requests_of_late_did():
    pacing = Pacing(rows=4, prefill_tokens=8)
    assert pacing.expected_tokens(2000, ignore_eos=False) == 2000  # nothing measured
    for _ in range(100):
        pacing.generated(50)
    assert pacing.expected_tokens(2000, ignore_eos=False) == 50
    assert pacing.expected_tokens(20, ignore_eos=False) == 20
    assert pacing.expected_tokens(2000, ignore_eos=True) == 2000  # a fixed length


def test_wait_is_zero_with_a_free_row_and_rows_free_as_a_batch_of_such_requests_runs():
    pacing = Pacing(rows=4, prefill_tokens=8)
    assert pacing.wait_s(ahead=0, running=3, run_s=1.0) == 0.0
    # 20 ahead, none free: 21 must leave first; a full batch of 1 s requests frees 4 a second
    assert pacing.wait_s(ahead=20, running=4, run_s=1.0) == pytest.approx(21 / 4)
    assert pacing.wait_s(ahead=7, running=4, run_s=2.0) == pytest.approx(8 * 2.0 / 4)


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
    scheduler.pacing.step(step_s, batch=1)
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
