"""The Triton paged-attention kernel against the torch reference, case by case: on tiny shapes
in Triton's interpreter (CPU tensors), or compiled on CUDA where triton runs natively.

Not collected by the suite's own run (triton decides at its first import whether it
interprets, and the suite imports it early, through transformers): test_triton_attention.py
runs this file with pytest in a process of its own, with or without TRITON_INTERPRET."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.paged_attention import PagedQueries, paged_attention_reference
from loraplex.server.engine.triton_attention import interpreting, paged_attention_triton
from tests.server.engine.test_paged_attention import filled_step


@pytest.fixture(scope="module")
def device() -> torch.device:
    return torch.device("cpu" if interpreting() else "cuda")


def check(before, step, heads, kv_heads, head_dim, dtype, device, pad_tiles=0, seed=0, sharp=1.0):
    cache, q, queries, _ = filled_step(before, step, heads, kv_heads, head_dim, dtype, device, seed)
    if pad_tiles:  # a fixed-size grid, as a CUDA graph launches it: unused tiles do nothing
        zeros = torch.zeros(pad_tiles, dtype=torch.int32, device=device)
        queries = PagedQueries(
            queries.seq_ids,
            queries.positions,
            torch.cat([queries.tile_starts, zeros]),
            torch.cat([queries.tile_lengths, zeros]),
            queries.block_q,
        )
    scale = sharp * head_dim**-0.5  # sharp > 1: a few keys dominate, as in a trained model
    args = (q, cache.keys[0], cache.values[0], cache.tables(), queries, scale)
    out = paged_attention_triton(*args)
    want = paged_attention_reference(*args)
    assert out.dtype == dtype and out.shape == q.shape
    if dtype == torch.float32:
        torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    else:  # the kernel's probabilities meet V in bf16 (on a GPU), the reference's in float32
        torch.testing.assert_close(out.float(), want.float(), atol=2e-2, rtol=2e-2)


# decode tokens past partial and full blocks; a prompt from 0; chunks starting mid-block, one
# over two query tiles (of 16 tokens where 2 or 4 query heads share a KV head); a sequence not
# in the step
BEFORE, STEP = [0, 21, 5, 31, 16, 3], [19, 1, 12, 1, 1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(2, 2), (6, 2), (8, 2)])
def test_decode_and_prompt_chunks_in_one_launch_equal_the_reference(heads, kv_heads, dtype, device):
    check(BEFORE, STEP, heads, kv_heads, 16, dtype, device)


def test_decode_only_steps_and_unused_tiles(device):
    check([40, 1, 15, 16], [1, 1, 1, 1], 8, 2, 16, torch.float32, device, pad_tiles=3)


def test_a_step_without_queries_launches_nothing(device):
    check([5, 9], [0, 0], 4, 2, 16, torch.float32, device)


def test_a_head_dim_that_is_not_a_power_of_2(device):
    check([7, 30], [9, 1], 4, 1, 24, torch.float32, device, seed=1)


@pytest.mark.gpu
@pytest.mark.skipif(interpreting(), reason="a realistic shape: hours in the interpreter")
def test_llama_shaped_step_equals_the_reference(device):
    """Llama-3-8B's heads (32 query, 8 KV, 128 dims) in bf16: 24 decode tokens over up to 2000
    cached tokens and a 300-token prompt chunk starting mid-block after 700. Sharp attention:
    a block read from the wrong place would move the output by about 1, not by the 0.03 of an
    average over a thousand random values."""
    before = [700] + [37 + 83 * i for i in range(24)]
    step = [300] + [1] * 24
    check(before, step, 32, 8, 128, torch.bfloat16, device, sharp=4.0)
