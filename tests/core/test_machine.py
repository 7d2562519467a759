"""Start-up measurements: the compute dtype probe holds its ratio through a burst of other
work on the machine."""

from __future__ import annotations

import platform

import torch

from loraplex.core import machine
from loraplex.core.machine import TuningCache, choose_dtype, interleaved_medians


def test_timed_calls_take_turns_so_a_burst_slows_both_alike():
    """Two calls of 1 and 2 time units on a clock of their own; the first 8 calls made
    (warm-ups included) take 10 units longer, as when another process starts beside the
    server. Taking turns, each has fewer than half its timed calls in the burst: the medians
    are 1 and 2 (one after the other, the first fn would have most of its calls in it)."""
    now = 0.0
    calls = 0

    def clock() -> float:
        return now

    def work(units: float):
        def run() -> None:
            nonlocal now, calls
            calls += 1
            now += units + (10 if calls <= 8 else 0)

        return run

    got = interleaved_medians([work(1), work(2)], torch.device("cpu"), rounds=9, clock=clock)
    assert got == [1.0, 2.0]
    assert calls == 2 + 2 * 9


def test_the_dtype_choice_is_measured_once_per_machine_and_cached(tmp_path, monkeypatch):
    cache = TuningCache(tmp_path)
    first = choose_dtype(torch.device("cpu"), (64, 128), cache)
    assert first.dtype in ("bfloat16", "float32") and "(cached)" not in first.reason

    def no_measuring(*args: object, **kwargs: object) -> list[float]:
        raise AssertionError("measured again")

    monkeypatch.setattr(machine, "interleaved_medians", no_measuring)
    again = choose_dtype(torch.device("cpu"), (64, 128), cache)
    assert again.dtype == first.dtype and again.reason.endswith("(cached)")


def test_a_home_carried_to_another_cpu_model_or_one_with_amx_measures_anew(monkeypatch):
    """Choices cached on one machine are not reused on another kind with the same torch
    capability: its model name and AMX are part of the key."""
    cpu = torch.device("cpu")
    key = machine.machine_key(cpu)
    monkeypatch.setattr(machine, "device_model", lambda device: "Some Other CPU")
    assert machine.machine_key(cpu) != key
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    without = machine.capability(cpu)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert machine.capability(cpu) == without.replace("cpu-AVX512", "cpu-AVX512-amx")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert "amx" not in machine.capability(cpu)  # capped at AVX2, oneDNN leaves AMX unused


def test_a_math_library_held_to_a_lower_instruction_set_measures_anew(monkeypatch):
    """MKL and oneDNN can be capped below the CPU (as the AVX2 emulation does): their speed,
    and so the choices, differ under a cap."""
    cpu = torch.device("cpu")
    for name in machine.ISA_CAPS:
        monkeypatch.delenv(name, raising=False)
    uncapped = machine.machine_key(cpu)
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    mkl_capped = machine.machine_key(cpu)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert len({uncapped, mkl_capped, machine.machine_key(cpu)}) == 3


def test_the_cpu_model_is_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Xeon Thing 9000\n")
    assert machine.cpu_model(info) == "Xeon Thing 9000"
    assert machine.cpu_model(tmp_path / "none") == platform.processor()  # no cpuinfo


def test_a_containers_memory_limit_caps_what_is_available(tmp_path):
    """Inside a container /proc/meminfo shows the host; the cgroup's limit less its usage (the
    reclaimable page cache not counted) is what the budgets may take."""
    none = tmp_path / "no-listing"  # as inside a cgroup namespace: the group is the root
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{4 << 30}\n")
    (v2 / "memory.current").write_text(f"{3 << 30}\n")
    (v2 / "memory.stat").write_text(f"anon 123\ninactive_file {1 << 30}\n")
    assert machine.cgroup_headroom_bytes(v2, none) == 2 << 30
    system = machine.available_memory_bytes(tmp_path / "none", none)
    assert machine.available_memory_bytes(v2, none) == min(2 << 30, system)

    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{8 << 30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{7 << 30}\n")
    (v1 / "memory.stat").write_text(f"total_inactive_file {1 << 29}\n")
    assert machine.cgroup_headroom_bytes(tmp_path / "v1", none) == (1 << 30) + (1 << 29)

    (v2 / "memory.max").write_text("max\n")  # no limit: the system's figure stands
    assert machine.cgroup_headroom_bytes(v2, none) is None
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")
    assert machine.cgroup_headroom_bytes(tmp_path / "v1", none) is None
    assert machine.cgroup_headroom_bytes(tmp_path / "none", none) is None


def test_the_process_own_group_and_those_above_it_bound_the_headroom(tmp_path):
    """A systemd service's group under an unlimited root: its own limit counts, and a tighter
    one above it wins."""
    listing = tmp_path / "cgroup"
    listing.write_text("0::/system.slice/loraplex.service\n")
    root = tmp_path / "fs"
    service = root / "system.slice" / "loraplex.service"
    service.mkdir(parents=True)
    groups = [
        (root, "max", 9 << 30),
        (root / "system.slice", f"{6 << 30}", 5 << 30),
        (service, f"{4 << 30}", 1 << 30),
    ]
    for group, limit, usage in groups:
        (group / "memory.max").write_text(limit)
        (group / "memory.current").write_text(str(usage))
    assert machine.cgroup_headroom_bytes(root, listing) == 1 << 30  # the slice's 6 - 5 GiB
    (root / "system.slice" / "memory.max").write_text("max")
    assert machine.cgroup_headroom_bytes(root, listing) == 3 << 30  # the service's 4 - 1 GiB
