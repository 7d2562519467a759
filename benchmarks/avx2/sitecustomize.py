"""Speed as on a CPU without AVX-512 (for the AVX2 columns of the benchmarks; emulated, not
exact). With this folder on PYTHONPATH and ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2,
torch and oneDNN use their AVX2 code (bf16 matmuls become slow, as there), MKL, which torch's
float32 matmuls call, is held to AVX2 as well (MKL_ENABLE_INSTRUCTIONS, set here: MKL asks the
CPU itself and otherwise runs its AVX-512 code, about 1.8x AVX2's rate on 2 cores), and
bitsandbytes is told that the CPU lacks AVX512-BF16, so it neither repacks its weights nor uses
its packed kernel. Its own native code still uses whatever the CPU has: that part is not
reproduced.

    PYTHONPATH=benchmarks/avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python ...
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType

# read by MKL when it first runs, and inherited by the processes this one starts (the server)
os.environ.setdefault("MKL_ENABLE_INSTRUCTIONS", "AVX2")

TARGET = "bitsandbytes.cextension"


class _NoBf16Lib:
    """The native library, less its AVX512-BF16 probe."""

    def __init__(self, lib: object) -> None:
        self._lib = lib

    def __getattr__(self, name: str) -> object:
        if name == "has_avx512bf16_cpu":
            raise AttributeError(name)
        return getattr(self._lib, name)


class _Patch(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != TARGET:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        original = spec.loader

        class Loader(importlib.abc.Loader):
            def create_module(self, spec):  # type: ignore[no-untyped-def]
                return original.create_module(spec)

            def exec_module(self, module: ModuleType) -> None:
                original.exec_module(module)
                module.lib = _NoBf16Lib(module.lib)  # type: ignore[attr-defined]

        spec.loader = Loader()
        return spec


sys.meta_path.insert(0, _Patch())
