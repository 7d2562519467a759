"""PEFT's `target_modules` / `exclude_modules` regexes, matched against the base model's module
names without letting a pattern hold the server.

PEFT matches a string with Python's `re.fullmatch`, a backtracking engine: a pattern such as
`(a|aa)+$` takes exponential time, and `re` holds the GIL throughout, so on a server thread it
would stall the event loop, the engine and the health checks for as long as it runs. Engines
without backtracking (RE2) refuse lookarounds, which real PEFT configs use (`^(?!.*vision).*`).

So the pattern is compiled and matched by PEFT's own engine, in a child interpreter that holds
no lock of ours: against the base's module names only (a finite list, a few hundred), within a
time and a memory limit, and killed when it runs over. The pattern's length is bounded too. A
result is cached per (patterns, names), so a stored adapter loaded again costs no child.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections import OrderedDict

from loraplex.core.errors import InvalidAdapter, shown

MAX_PATTERN_CHARS = 1024
MATCH_TIMEOUT_S = 2.0  # a child's whole run: start, compile and every match
MATCH_MEMORY_BYTES = 512 << 20  # the child's address space
_CACHED = 256

# The child: compile each pattern with `re` (PEFT's engine), fullmatch it against every name;
# one JSON line out: per pattern, the indices of the names it matches or why it does not compile.
_CHILD = """
import json, re, sys
job = json.loads(sys.stdin.read())
try:
    import resource
    resource.setrlimit(resource.RLIMIT_AS, (job["memory"], job["memory"]))
except (ImportError, ValueError, OSError):
    pass
out = []
for pattern in job["patterns"]:
    try:
        compiled = re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError, MemoryError) as exc:
        out.append({"error": str(exc)[:200]})
        continue
    out.append({"matched": [i for i, name in enumerate(job["names"]) if compiled.fullmatch(name)]})
sys.stdout.write(json.dumps(out))
"""

_cache: OrderedDict[tuple[tuple[str, ...], tuple[str, ...]], list[frozenset[str] | str]] = (
    OrderedDict()
)
_cache_lock = threading.Lock()


def fullmatches(
    patterns: dict[str, str], names: tuple[str, ...], timeout_s: float | None = None
) -> dict[str, frozenset[str]]:
    """For each `key: pattern`, the `names` that `re.fullmatch(pattern, name)` matches, as PEFT
    would compute it; InvalidAdapter naming the key when a pattern is too long, does not compile,
    or takes longer than `timeout_s` (all patterns together; default MATCH_TIMEOUT_S) or too
    much memory."""
    for key, pattern in patterns.items():
        if len(pattern) > MAX_PATTERN_CHARS:
            raise InvalidAdapter(
                f"{key} is a regex of {len(pattern)} characters, over the limit of "
                f"{MAX_PATTERN_CHARS}"
            )
    cache_key = (tuple(patterns.values()), names)
    with _cache_lock:
        results = _cache.get(cache_key)
        if results is not None:
            _cache.move_to_end(cache_key)
    if results is None:
        results = _run_child(list(patterns.items()), names, timeout_s or MATCH_TIMEOUT_S)
        with _cache_lock:
            _cache[cache_key] = results
            while len(_cache) > _CACHED:
                _cache.popitem(last=False)
    found = {}
    for (key, _), result in zip(patterns.items(), results, strict=True):
        if isinstance(result, str):
            raise InvalidAdapter(f"{key} is not a valid regex: {result}")
        found[key] = result
    return found


def _run_child(
    patterns: list[tuple[str, str]], names: tuple[str, ...], timeout_s: float
) -> list[frozenset[str] | str]:
    job = json.dumps(
        {"patterns": [p for _, p in patterns], "names": list(names), "memory": MATCH_MEMORY_BYTES}
    )
    keys = " and ".join(key for key, _ in patterns)
    try:
        # -I -S: no user site, no environment, no site-packages; only the standard library.
        done = subprocess.run(
            [sys.executable, "-I", "-S", "-c", _CHILD],
            input=job,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired:  # run() killed the child
        raise InvalidAdapter(
            f"{keys}: the regex took over {timeout_s:g} s to match the base model's "
            f"{len(names)} module names; use a simpler pattern or a list of names"
        ) from None
    if done.returncode != 0:  # over the memory limit (MemoryError), or killed
        raise InvalidAdapter(
            f"{keys}: the regex could not be matched against the base model's module names "
            f"within the limits (exit status {done.returncode}); use a simpler pattern or a list "
            "of names"
        )
    try:
        out = json.loads(done.stdout)
    except ValueError:
        raise RuntimeError(f"the pattern matcher wrote {shown(done.stdout)}") from None
    return [
        str(r["error"]) if "error" in r else frozenset(names[i] for i in r["matched"]) for r in out
    ]
