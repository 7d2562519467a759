"""The Triton paged-attention and rope-and-cache kernels: their cases (triton_attention_cases.py)
in Triton's interpreter on every run, and on CUDA where a GPU is; compiled ahead of time for
sm_80 and sm_90 on every run, so a kernel that would not build fails here.

Each in a process of its own: triton decides at its first import whether it interprets (its own
library functions included), and this process has imported it already (transformers imports
torch._dynamo, which imports triton)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

REPO = Path(__file__).resolve().parents[3]
CASES = "tests/server/engine/triton_attention_cases.py"


def run(args: list[str], interpret: bool, cache_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["TRITON_CACHE_DIR"] = str(cache_dir)  # kernels really built, not read from a cache
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


def run_cases(interpret: bool, cache_dir: Path) -> str:
    done = run(
        ["-m", "pytest", "-q", "-p", "no:cacheprovider", "--noconftest", CASES],
        interpret,
        cache_dir,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    return done.stdout


def test_the_kernel_equals_the_reference_in_the_interpreter(tmp_path):
    out = run_cases(interpret=True, cache_dir=tmp_path)
    assert "15 passed, 1 skipped" in out  # the Llama-shaped case: on a GPU only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_kernel_equals_the_reference_on_cuda(tmp_path):
    out = run_cases(interpret=False, cache_dir=tmp_path)
    assert "16 passed" in out
