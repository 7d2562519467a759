"""Every Triton kernel builds for the GPUs we serve on (sm_80: A100, sm_90: H100/H200), ahead of
time and without a GPU: triton.compile for a CUDA target runs the whole pipeline down to a cubin
with the ptxas in triton's wheel. The interpreter runs the kernels' Python, so it misses what
only the compiler rejects (a global that is not constexpr, a type that differs between
branches, a shape tl.dot refuses): this test fails CI on those.

A kernel module joins by being listed in KERNEL_MODULES with an `aot_specs()` that returns
(kernel, signature, constexprs) for each way its wrappers launch it; every jit function of the
module named `*_kernel` must be among them.

The build runs in a child process without TRITON_INTERPRET: triton decorates its own library
(tl.cdiv, tl.max, ...) by that variable when it is imported, so a process that interprets
cannot compile."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="triton comes with the dev extra (Linux only)")

KERNEL_MODULES = [
    "loraplex.server.engine.triton_lora_kernels",
    "loraplex.server.engine.triton_attention",
]
MAX_SHARED_BYTES = 99 * 1024  # what an sm_80 or sm_90 block may take without opting in
ARCHS = [80, 90]
ROOT = Path(__file__).resolve().parents[3]


def build(modules: list[str], archs: list[int]) -> list[dict[str, object]]:
    """Build every spec of `modules` for `archs` (in this process, which must not interpret):
    one record per module, arch and spec, with the error if it failed."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    records: list[dict[str, object]] = []
    for name in modules:
        module = importlib.import_module(name)
        specs = module.aot_specs()
        kernels = {k for k, v in vars(module).items() if isinstance(v, JITFunction)}
        missing = {k for k in kernels if k.endswith("_kernel")} - {s[0].__name__ for s in specs}
        for arch in archs:
            records.append({"module": name, "arch": arch, "missing": sorted(missing)})
            for kernel, signature, constexprs in specs:
                record: dict[str, object] = {"module": name, "arch": arch}
                record["kernel"] = f"{kernel.__name__} {constexprs}"
                try:
                    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
                    binary = triton.compile(source, target=GPUTarget("cuda", arch, 32))
                    record["cubin_bytes"] = len(binary.asm["cubin"])
                    record["shared_bytes"] = binary.metadata.shared
                    record["ptx_target"] = f".target sm_{arch}" in binary.asm["ptx"]
                except Exception as error:  # reported to the test, which fails on it
                    record["error"] = f"{type(error).__name__}: {error}"
                records.append(record)
    return records


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """The records of one child process that builds every module for every arch."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # build for real
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # triton 3.9's default, said out loud (no warning)
    script = (
        "import json, sys; from tests.server.engine.test_triton_build import build; "
        "print(json.dumps(build(json.loads(sys.argv[1]), json.loads(sys.argv[2]))))"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, json.dumps(KERNEL_MODULES), json.dumps(ARCHS)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", KERNEL_MODULES)
def test_kernels_build_for_cuda(built, name, arch):
    records = [r for r in built if r["module"] == name and r["arch"] == arch]
    assert not records[0]["missing"], f"kernels without an aot spec: {records[0]['missing']}"
    specs = records[1:]
    assert specs, f"{name} lists no kernel to build"
    failed = [f"{r['kernel']}: {r['error']}" for r in specs if "error" in r]
    assert not failed, "\n".join(failed)
    assert all(r["cubin_bytes"] and r["ptx_target"] for r in specs)
    too_big = [
        f"{r['kernel']}: {r['shared_bytes']}" for r in specs if r["shared_bytes"] > MAX_SHARED_BYTES
    ]
    assert not too_big, f"shared memory over {MAX_SHARED_BYTES} bytes: {too_big}"
