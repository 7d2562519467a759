"""Start-up measurements: the compute dtype probe holds its ratio through a burst of other
work on the machine."""

from __future__ import annotations

import time

import torch

from loraplex.core import machine
from loraplex.core.machine import TuningCache, choose_dtype, interleaved_medians


def test_timed_calls_take_turns_so_a_burst_slows_both_alike():
    """Two calls of 1 and 2 ms; the first 8 calls made (warm-ups included) run 10 ms longer,
    as when another process starts beside the server. Taking turns, each has fewer than half
    its timed calls in the burst: the ratio stays 2 (one after the other, the first fn would
    have most of its calls in it)."""
    calls = 0

    def sleeper(ms: float):
        def run() -> None:
            nonlocal calls
            calls += 1
            time.sleep((ms + (10 if calls <= 8 else 0)) / 1000)

        return run

    fast, slow = interleaved_medians([sleeper(1), sleeper(2)], torch.device("cpu"), rounds=9)
    assert 1.5 < slow / fast < 2.8, (fast, slow)


def test_the_dtype_choice_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    cache = TuningCache(tmp_path)
    first = choose_dtype(torch.device("cpu"), (64, 128), cache)
    assert first.dtype in ("bfloat16", "float32") and "(cached)" not in first.reason

    def no_measuring(*args: object, **kwargs: object) -> list[float]:
        raise AssertionError("measured again")

    monkeypatch.setattr(machine, "interleaved_medians", no_measuring)
    again = choose_dtype(torch.device("cpu"), (64, 128), cache)
    assert again.dtype == first.dtype and again.reason.endswith("(cached)")
