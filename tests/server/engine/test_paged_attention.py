"""Attention over the paged cache: the query tiles, and the torch reference against plain causal
attention over each sequence's keys laid out contiguously."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from loraplex.server.engine.kv_cache import CacheShape
from loraplex.server.engine.paged_attention import (
    PagedQueries,
    paged_attention_reference,
    plan_tiles,
)
from loraplex.server.engine.paged_kv import PagedKVCache

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("seq_ids", "block_q", "starts", "lengths"),
    [
        ([3, 1, 0], 4, [0, 1, 2], [1, 1, 1]),  # decode tokens: a tile each
        ([2, 2, 2, 2, 2, 2], 4, [0, 4], [4, 2]),  # a chunk over two tiles
        ([5, 0, 0, 0, 7, 7], 2, [0, 1, 3, 4], [1, 2, 1, 2]),  # a tile never spans sequences
        ([], 4, [], []),
    ],
)
def test_query_tiles_split_runs_of_one_sequence(seq_ids, block_q, starts, lengths):
    got_starts, got_lengths = plan_tiles(np.array(seq_ids, dtype=np.int32), block_q)
    assert got_starts.tolist() == starts and got_lengths.tolist() == lengths


def test_tiles_are_wider_for_prompt_chunks_than_for_decode_tokens():
    decode = PagedQueries.build([0, 1, 2], [5, 9, 3], group=4, device=CPU)
    mixed = PagedQueries.build([0, 1, 1, 1], [5, 0, 1, 2], group=4, device=CPU)
    assert decode.block_q == 4 and mixed.block_q == 16  # 16 and 64 rows of 4 heads
    assert PagedQueries.build([0, 0], [0, 1], group=3, device=CPU).block_q == 16  # 3 -> 4
    assert mixed.tile_lengths.tolist() == [1, 3] and mixed.seq_ids.dtype == torch.int32


def filled_step(
    before: list[int],
    step: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device = CPU,
    seed: int = 0,
) -> tuple[PagedKVCache, torch.Tensor, PagedQueries, dict[int, tuple[int, int]]]:
    """A one-layer paged cache whose sequence i holds before[i] + step[i] random tokens, and
    the step's queries (N, H, D) for the step[i] last tokens of each (0 tokens: not in the
    step). Sequences take their blocks interleaved, so none of them is contiguous. Returns the
    cache, q, the queries and, per sequence index, its (first query token, count)."""
    gen = torch.Generator().manual_seed(seed)
    total = [b + s for b, s in zip(before, step, strict=True)]
    max_len = max(total)
    cache = PagedKVCache(
        CacheShape(1, kv_heads, head_dim, dtype),
        num_blocks=sum(-(-t // 16) for t in total) + 2,
        max_seqs=len(before) + 1,
        max_len=max_len,
        device=device,
    )
    seqs = [cache.allocate(t) for t in total]
    for upto in range(16, max_len + 16, 16):  # a block each in turn
        counts = [max(0, min(t, upto) - cache.length(s)) for s, t in zip(seqs, total, strict=True)]
        cache.extend(seqs, counts)
    seq_ids = torch.tensor([s for s, t in zip(seqs, total, strict=True) for _ in range(t)])
    positions = torch.cat([torch.arange(t) for t in total])
    k = torch.randn(len(seq_ids), kv_heads, head_dim, generator=gen).to(dtype)
    v = torch.randn(len(seq_ids), kv_heads, head_dim, generator=gen).to(dtype)
    slots = cache.token_index(seq_ids.to(device), positions.to(device))
    cache.write(0, slots, k.to(device), v.to(device))
    query_seqs, query_pos, spans = [], [], {}
    for s, b, n in zip(seqs, before, step, strict=True):
        spans[s] = (len(query_seqs), n)
        query_seqs += [s] * n
        query_pos += range(b, b + n)
    q = torch.randn(len(query_seqs), heads, head_dim, generator=gen).to(dtype).to(device)
    group = heads // kv_heads
    return cache, q, PagedQueries.build(query_seqs, query_pos, group, device), spans


@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2), (8, 2)])
def test_reference_is_causal_attention_over_each_sequences_keys(heads, kv_heads):
    before, step = [0, 21, 5, 40, 3], [19, 1, 12, 1, 0]  # prefill, decode, mid-block chunk
    cache, q, queries, spans = filled_step(before, step, heads, kv_heads, 16, torch.float32)
    out = paged_attention_reference(
        q, cache.keys[0], cache.values[0], cache.tables(), queries, scale=0.3
    )
    assert out.shape == q.shape
    for s, (first, n) in spans.items():
        if not n:
            continue
        keys, values = cache.gather(0, s)  # (L, H_kv, D), contiguous
        length = keys.shape[0]
        qs = q[first : first + n].transpose(0, 1)  # (H, n, D)
        # query i is at position length - n + i: it sees keys 0..length - n + i
        seen = torch.arange(length) <= torch.arange(length - n, length).unsqueeze(1)
        want = F.scaled_dot_product_attention(
            qs,
            keys.transpose(0, 1).repeat_interleave(heads // kv_heads, 0),
            values.transpose(0, 1).repeat_interleave(heads // kv_heads, 0),
            attn_mask=seen,
            scale=0.3,
        )
        torch.testing.assert_close(out[first : first + n], want.transpose(0, 1))
