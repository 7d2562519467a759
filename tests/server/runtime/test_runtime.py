"""The runtime's wiring: the budgets it sizes from the machine."""

from __future__ import annotations

import logging

from loraplex.adapters.cache import MEMORY_SHARE
from loraplex.server.config import parse_serve_flags
from loraplex.server.runtime import runtime


def test_the_budget_flag_wins_and_auto_follows_the_machine(monkeypatch, caplog):
    monkeypatch.setattr(runtime, "available_memory_bytes", lambda: 16 << 30)
    with caplog.at_level(logging.INFO, logger=runtime.__name__):
        assert runtime.host_cache_budget(64 << 20) == 64 << 20
        assert runtime.host_cache_budget(None) == (16 << 30) // MEMORY_SHARE
    assert "64 MiB (--host-cache-mb)" in caplog.text
    assert f"{(16 << 10) // MEMORY_SHARE} MiB (auto" in caplog.text
    assert parse_serve_flags([], environ={}).server.host_cache_bytes is None  # auto by default
