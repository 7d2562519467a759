"""What this machine computes fastest, measured rather than assumed, and remembered per machine.

The same server is fast or slow depending on the CPU under it: where the CPU has AVX512-BF16 a
bf16 matmul is as fast as float32 and bitsandbytes has a packed 4-bit kernel; where it has only
AVX2, bf16 matmuls are emulated (about 10x slower than float32) and bitsandbytes dequantizes
the whole weight on every call. So the choices that depend on it (the compute dtype here, the
base layers' kernels in server/engine/linear.py) are measured at start and cached under the
loraplex home, keyed by what decides them: the device's capability (with AMX, which makes
oneDNN's bf16 matmuls several times faster than AVX512-BF16 alone), the CPU's model, torch's
version and the thread count, so that a home carried to another kind of machine measures anew.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

TUNING_VERSION = 3  # bump when what is measured (or how) changes: old entries are ignored
DTYPE_ROWS = (8, 128)  # rows the compute dtypes are compared at: decoding, and a prompt chunk
DTYPE_ROUNDS = 9  # timed calls of each dtype, taking turns
BF16_SLOWDOWN_OK = 1.25  # bf16 is kept unless float32 is this much faster (it halves memory)


def capability(device: torch.device) -> str:
    """What decides the fast paths: e.g. "cpu-AVX512-amx-bf16", "cpu-AVX2", "cuda-sm90"."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    isa = torch.backends.cpu.get_cpu_capability()
    name = f"cpu-{isa}"
    if isa == "AVX512" and torch.cpu._is_amx_tile_supported():  # under an AVX2 cap it goes unused
        name += "-amx"
    try:
        from bitsandbytes.functional import has_avx512bf16

        if has_avx512bf16():  # what bitsandbytes' packed CPU kernel needs
            name += "-bf16"
    except ImportError:  # pragma: no cover - bitsandbytes is a dependency
        pass
    return name


# Variables that hold a math library below the CPU's instruction set (oneDNN for torch's bf16
# matmuls, MKL for its float32 ones): what was measured under one does not hold without it.
ISA_CAPS = ("ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine_key(device: torch.device) -> str:
    """The capability, the device's model, torch's version, the threads a measurement ran
    with, and the math libraries' instruction caps where any is set."""
    model = hashlib.sha256(device_model(device).encode()).hexdigest()[:8]
    key = f"{capability(device)}-{model}-torch{torch.__version__}-t{torch.get_num_threads()}"
    caps = [os.environ[name].lower() for name in ISA_CAPS if os.environ.get(name)]
    return "-".join([key, *caps])


def device_model(device: torch.device) -> str:
    """The GPU's name, or the CPU's model: two CPUs of one capability (a Zen 4 and a Sapphire
    Rapids both report AVX512) time kernels apart."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name (Linux's cpuinfo; else what `platform` says, maybe "")."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("model name"):
                    return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor()


class TuningCache:
    """Measured choices as small JSON files under `<home>/tuning/`, one per machine key and
    subject; a missing, stale or unreadable file just means measuring again."""

    def __init__(self, directory: Path | None) -> None:
        self.directory = directory

    @property
    def build_dir(self) -> Path | None:
        """Where code compiled for this machine lives (native kernels), beside the tuning."""
        return None if self.directory is None else self.directory.parent / "kernels"

    def _path(self, subject: str, key: dict[str, Any]) -> Path | None:
        if self.directory is None:
            return None
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.directory / f"{subject}-{digest}.json"

    def get(self, subject: str, key: dict[str, Any]) -> Any | None:
        path = self._path(subject, key)
        if path is None or not path.exists():
            return None
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if saved.get("key") != json.loads(json.dumps({**key, "version": TUNING_VERSION})):
            return None
        return saved.get("value")

    def put(self, subject: str, key: dict[str, Any], value: Any) -> None:
        path = self._path(subject, key)
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            staging = path.with_suffix(f".{os.getpid()}.tmp")
            body = {"key": {**key, "version": TUNING_VERSION}, "value": value}
            staging.write_text(json.dumps(body, indent=1, sort_keys=True))
            os.replace(staging, path)  # atomic: two servers starting at once both read whole files
        except OSError as exc:  # a read-only home still serves, measuring at each start
            log.warning("could not cache the measurements in %s: %s", path.parent, exc)


def median_seconds(
    fn: Callable[[], object],
    device: torch.device,
    budget_s: float = 0.05,
    most: int = 7,
) -> float:
    """The median time of `fn()` after one warm-up call: at least 3 runs, then more while the
    budget lasts (up to `most`)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times: list[float] = []
    spent = 0.0
    while len(times) < 3 or (len(times) < most and spent < budget_s):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
        spent += times[-1]
    return statistics.median(times)


def interleaved_medians(
    fns: Sequence[Callable[[], object]],
    device: torch.device,
    rounds: int = DTYPE_ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Each fn's median time over `rounds` calls, after a warm-up call each, the fns taking
    turns: a burst of other work on the machine (a process starting beside the server) slows
    them alike instead of one of them, so their ratio holds."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for fn in fns:
        fn()
    sync()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, spent in zip(fns, times, strict=True):
            start = clock()
            fn()
            sync()
            spent.append(clock() - start)
    return [statistics.median(spent) for spent in times]


def last_level_cache_bytes() -> int:
    """The largest CPU cache's size (Linux sysfs; 32 MiB where it cannot be read)."""
    sizes = []
    for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = entry.read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str  # "bfloat16", "float16" or "float32"
    reason: str  # why, for the log and ModelInfo


def model_widths(model_config: Any) -> tuple[int, int]:
    """A transformers config's (hidden, intermediate) widths: the shapes choose_dtype times."""
    hidden = int(model_config.hidden_size)
    return hidden, int(getattr(model_config, "intermediate_size", 4 * hidden))


def choose_dtype(
    device: torch.device, widths: tuple[int, int], cache: TuningCache | None = None
) -> DtypeChoice:
    """The compute dtype for `--dtype auto`: on CUDA bf16 (fp16 where the GPU lacks bf16); on
    a CPU bf16 unless float32 matmuls of the model's widths (hidden, intermediate) run more
    than BF16_SLOWDOWN_OK times faster, as they do where bf16 is emulated."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return DtypeChoice("bfloat16", "CUDA with bf16")
        return DtypeChoice("float16", "CUDA without bf16")
    key = {"machine": machine_key(device), "widths": list(widths)}
    saved = (cache or TuningCache(None)).get("dtype", key)
    if saved is not None:
        return DtypeChoice(saved["dtype"], saved["reason"] + " (cached)")
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(widths[1], widths[0], generator=generator)
    bf16_s = f32_s = 0.0
    for rows in DTYPE_ROWS:
        x = torch.randn(rows, widths[0], generator=generator)
        bf16, f32 = interleaved_medians(
            [
                functools.partial(F.linear, x.bfloat16(), weight.bfloat16()),
                functools.partial(F.linear, x, weight),
            ],
            device,
        )
        bf16_s, f32_s = bf16_s + bf16, f32_s + f32
    ratio = bf16_s / f32_s
    name = "float32" if ratio > BF16_SLOWDOWN_OK else "bfloat16"
    reason = f"bf16 matmuls take {ratio:.2f}x float32's on {capability(device)}"
    if cache is not None:
        cache.put("dtype", key, {"dtype": name, "reason": reason})
    return DtypeChoice(name, reason)


def free_memory_bytes(device: torch.device) -> int:
    """What the device can still give: a GPU's free memory, or the system's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return available_memory_bytes()


CGROUP_ROOT = Path("/sys/fs/cgroup")
OWN_CGROUPS = Path("/proc/self/cgroup")  # this process's group in each hierarchy


def available_memory_bytes(cgroup_root: Path = CGROUP_ROOT, listing: Path = OWN_CGROUPS) -> int:
    """Memory the system can still give (MemAvailable on Linux), no more than the container's
    memory limit leaves (cgroup v2 or v1), or 0 where it cannot say."""
    available = 0
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if not available:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            available = 0
    headroom = cgroup_headroom_bytes(cgroup_root, listing)
    if headroom is None:
        return available
    return min(available, headroom) if available else headroom


# (controller directory, limit, usage, the memory.stat key of reclaimable page cache): cgroup v2,
# then v1
_CGROUP_FILES = (
    ("", "memory.max", "memory.current", "inactive_file"),
    ("memory", "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file"),
)
_NO_LIMIT = 1 << 60  # v1 writes "no limit" as a number near 2**63


def _own_cgroups(listing: Path) -> dict[str, str]:
    """This process's cgroup paths from /proc/self/cgroup: "" for v2's unified hierarchy,
    "memory" for v1's memory controller."""
    paths = {}
    try:
        for line in listing.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if controllers == "":
                paths[""] = path
            elif "memory" in controllers.split(","):
                paths["memory"] = path
    except (OSError, ValueError):
        pass
    return paths


def cgroup_headroom_bytes(root: Path = CGROUP_ROOT, listing: Path = OWN_CGROUPS) -> int | None:
    """What this process's memory cgroups (a container's limit, as Kubernetes sets it, or a
    systemd unit's MemoryMax) still allow: the least, over its group and the groups above it,
    of a limit less its usage (page cache the kernel would reclaim first not counted as used);
    None where no limit is set or none can be read. /proc/meminfo shows the whole host's memory
    inside a container, so budgets sized from it alone would overrun the limit. (Inside a
    container with its own cgroup namespace, its group is the hierarchy's root.)"""
    own = _own_cgroups(listing)
    for controller, limit_name, usage_name, cache_key in _CGROUP_FILES:
        mount = root / controller
        group = mount / own.get(controller, "/").lstrip("/")
        if not (group / usage_name).exists():
            group = mount  # the listing names a group this view of the hierarchy lacks
        if not (group / usage_name).exists():
            continue
        headrooms = []
        for level in [group, *group.parents]:
            headroom = _group_headroom(level, limit_name, usage_name, cache_key)
            if headroom is not None:
                headrooms.append(headroom)
            if level == mount:
                break
        return min(headrooms) if headrooms else None
    return None


def _group_headroom(group: Path, limit_name: str, usage_name: str, cache_key: str) -> int | None:
    """One cgroup's limit less its usage (reclaimable page cache aside); None without a limit."""
    try:
        limit_text = (group / limit_name).read_text().strip()
        usage = int((group / usage_name).read_text())
    except (OSError, ValueError):
        return None
    if not limit_text.isdigit() or int(limit_text) >= _NO_LIMIT:  # "max" or v1's no limit
        return None
    try:
        for line in (group / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == cache_key:
                usage -= min(int(value), usage)
                break
    except (OSError, ValueError):
        pass
    return max(0, int(limit_text) - usage)
