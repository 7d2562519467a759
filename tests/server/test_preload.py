"""The process preload (server/preload.py): what `loraplex serve` re-executes with."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from loraplex.server import preload


def test_preload_adds_only_the_libraries_not_named_yet():
    tc, iomp = Path("/x/libtcmalloc_minimal.so.4"), Path("/y/libiomp5.so")
    assert preload.preload_value({}, [tc, iomp]) == f"{tc}:{iomp}"
    assert preload.preload_value({"LD_PRELOAD": "/a/libfoo.so"}, [tc]) == f"/a/libfoo.so:{tc}"
    named = {"LD_PRELOAD": "/other/libtcmalloc_minimal.so.4 /other/libiomp5.so"}
    assert preload.preload_value(named, [tc, iomp]) is None
    assert preload.preload_value({}, []) is None


def test_libraries_are_found_in_the_environment_before_the_system(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    monkeypatch.setattr(preload, "SYSTEM_DIRS", ())
    monkeypatch.setattr(preload, "_linker_cache", lambda: {})
    assert preload.runtime_libraries() == [tmp_path / "lib" / "libiomp5.so"]
    cached = {"libtcmalloc_minimal.so.4": Path("/usr/lib/libtcmalloc_minimal.so.4")}
    monkeypatch.setattr(preload, "_linker_cache", lambda: cached)
    assert preload.runtime_libraries()[0] == Path("/usr/lib/libtcmalloc_minimal.so.4")


def test_the_process_re_executes_once_with_the_libraries_loaded(tmp_path):
    """A real exec: a stand-in library (a copy of glibc's empty libdl stub, under the name
    looked for) is found in the environment's lib/, preloaded, and seen mapped by the new
    process, which does not re-execute again."""
    stub = next(
        Path(d) / "libdl.so.2"
        for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64")
        if (Path(d) / "libdl.so.2").is_file()
    )
    (tmp_path / "lib").mkdir()
    shutil.copy(stub, tmp_path / "lib" / "libiomp5.so")
    script = (
        "import os, sys\n"
        f"sys.prefix = {str(tmp_path)!r}\n"
        "from loraplex.server import preload\n"
        "preload.SYSTEM_DIRS = ()\n"
        "preload._linker_cache = dict\n"
        "print('run', os.environ.get('LORAPLEX_PRELOADED'), flush=True)\n"
        "preload.reexec_with_runtime_libraries()\n"
        "print('loaded', [os.path.basename(p) for p in preload.loaded_runtime_libraries()])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", preload.REEXECUTED)}
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == ["run None", "run 1", "loaded ['libiomp5.so']"]
