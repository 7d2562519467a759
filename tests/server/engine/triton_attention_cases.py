"""The Triton paged-attention kernel against the torch reference, case by case: on tiny shapes
in Triton's interpreter (CPU tensors), or compiled on CUDA where triton runs natively.

Not collected by the suite's own run (triton decides at its first import whether it
interprets, and the suite imports it early, through transformers): test_triton_attention.py
runs this file with pytest in a process of its own, with or without TRITON_INTERPRET."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.forward import _rope
from loraplex.server.engine.paged_attention import PagedQueries, paged_attention_reference
from loraplex.server.engine.paged_kv import write_blocks
from loraplex.server.engine.triton_attention import (
    interpreting,
    paged_attention_triton,
    rope_and_cache,
)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(4, 2, 16), (9, 3, 64), (6, 6, 24)])
def test_rope_and_cache_equal_the_torch_rope_and_block_write(
    heads, kv_heads, head_dim, dtype, device
):
    """The rotary embedding of q in place and of k, with k and v at their slots, in one
    launch: as forward.py's _rope and write_blocks do it, on column views of one q/k/v output
    (the layout the forward hands over)."""
    gen = torch.Generator().manual_seed(head_dim)
    n, max_len, blocks, block = 7, 64, 6, 16
    widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    qkv = torch.randn(n, sum(widths), generator=gen).to(dtype).to(device)
    q, k, v = (x.view(n, -1, head_dim) for x in qkv.split(widths, dim=1))
    angles = torch.arange(max_len)[:, None] * 0.1 / (1 + torch.arange(head_dim // 2))[None, :]
    angles = torch.cat([angles, angles], dim=1)
    cos, sin = angles.cos().to(dtype).to(device), angles.sin().to(dtype).to(device)
    positions = torch.tensor([0, 5, 17, 18, 33, 63, 40], device=device)
    slots = torch.randperm(blocks * block, generator=gen)[:n].to(device)
    pools = [torch.zeros(blocks, block, kv_heads, head_dim, dtype=dtype, device=device)
             for _ in range(4)]  # fmt: skip
    want_q = _rope(q, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    want_k = _rope(k, cos[positions].unsqueeze(1), sin[positions].unsqueeze(1))
    write_blocks(pools[2], pools[3], slots, want_k, v)
    rope_and_cache(q, k, v, cos, sin, positions, slots, pools[0], pools[1])
    tolerance = (
        {"atol": 1e-5, "rtol": 1e-5} if dtype == torch.float32 else {"atol": 2e-2, "rtol": 2e-2}
    )
    torch.testing.assert_close(q.float(), want_q.float(), **tolerance)  # in place
    torch.testing.assert_close(pools[0].float(), pools[2].float(), **tolerance)
    assert torch.equal(pools[1], pools[3])  # v copied as it is
    assert pools[0].abs().sum() > 0
