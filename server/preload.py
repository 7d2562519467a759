"""The memory allocator and OpenMP runtime the server process runs with.

A CPU decode step makes thousands of small tensors and OpenMP parallel regions; tcmalloc
(`libtcmalloc_minimal`) and Intel's OpenMP runtime (`libiomp5`, which also answers GNU OpenMP's
entry points that torch calls) make both cheaper than glibc's malloc and libgomp. vLLM's CPU
backend asks for the same pair. Both must be in the process before anything else loads, so
`loraplex serve` re-executes itself once with LD_PRELOAD naming those that are installed and
not loaded yet (`--no-preload` turns this off). Where they come from: intel-openmp is a
dependency on x86-64 (its library lands in the environment's lib/), tcmalloc is the system's
(Debian/Ubuntu libtcmalloc-minimal4; `make install` unpacks it into the environment when the
system has none). What they are worth is measured in docs/operations.md.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

TCMALLOC = ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
INTEL_OPENMP = ("libiomp5.so",)
# Set in the re-executed process, so that it never re-executes again.
REEXECUTED = "LORAPLEX_PRELOADED"
SYSTEM_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def runtime_libraries() -> list[Path]:
    """The installed tcmalloc and Intel OpenMP libraries, in preload order (either may be
    missing: then the list lacks it)."""
    found = [_find(TCMALLOC), _find(INTEL_OPENMP)]
    return [path for path in found if path is not None]


def _find(names: Sequence[str]) -> Path | None:
    """The first of `names` in this environment's lib/, the system's library directories, or
    the dynamic linker's cache."""
    dirs = [Path(sys.prefix) / "lib", *map(Path, SYSTEM_DIRS)]
    for name in names:
        for directory in dirs:
            if (directory / name).is_file():
                return directory / name
    cache = _linker_cache()
    return next((cache[name] for name in names if name in cache), None)


def _linker_cache() -> dict[str, Path]:
    """soname -> path from `ldconfig -p` (empty where there is no ldconfig)."""
    for ldconfig in ("ldconfig", "/sbin/ldconfig"):
        try:
            listing = subprocess.run(
                [ldconfig, "-p"], capture_output=True, text=True, check=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        found: dict[str, Path] = {}
        for line in listing.splitlines():
            name, _, path = line.strip().partition(" => ")
            if path:
                found.setdefault(name.split(" ", 1)[0], Path(path))
        return found
    return {}


def preload_value(environ: Mapping[str, str], libraries: Sequence[Path]) -> str | None:
    """The LD_PRELOAD to re-execute with: the current one plus each of `libraries` it does not
    name yet; None when nothing is to be added."""
    current = [p for p in environ.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p]
    names = {Path(p).name for p in current}
    missing = [str(lib) for lib in libraries if lib.name not in names]
    return ":".join([*current, *missing]) if missing else None


def reexec_with_runtime_libraries() -> None:
    """Replace this process (same pid, same arguments) by one with tcmalloc and Intel OpenMP
    preloaded, when they are installed and not loaded yet; return otherwise. Call it before
    torch is imported."""
    if os.environ.get(REEXECUTED):
        return
    libraries = runtime_libraries()
    value = preload_value(os.environ, libraries)
    if value is None:
        if not libraries:
            log.info("no tcmalloc or Intel OpenMP installed: the default allocator and OpenMP")
        return
    log.info("re-executing with LD_PRELOAD=%s", value)
    env = {**os.environ, "LD_PRELOAD": value, REEXECUTED: "1"}
    argv = [sys.executable, *sys.orig_argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def loaded_runtime_libraries() -> list[str]:
    """The tcmalloc / Intel OpenMP libraries mapped into this process (for the start-up log)."""
    wanted = (*TCMALLOC, *INTEL_OPENMP)
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    seen = {line.rsplit(" ", 1)[-1] for line in maps.splitlines() if "/" in line}
    return sorted(path for path in seen if Path(path).name in wanted)
