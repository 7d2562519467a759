"""Attention over the paged KV cache (paged_kv.py): what a step's query tokens are, and the
torch reference every faster path (triton_attention.py) is tested equal to.

A step's N query tokens mix decode tokens (one per sequence) and prompt chunks (consecutive
tokens of one sequence, possibly starting mid-block). Token i belongs to sequence seq_ids[i]
(its row of the block tables) at position positions[i], and sees its sequence's keys at
positions 0..positions[i]: causal within a chunk, everything before it in the cache. Its keys
and values are already in the pools (written before attention, as forward.py does).

Kernels work on query tiles: up to `block_q` consecutive tokens of one sequence, so a prompt
chunk reads each key block once per tile rather than once per token, and a decode token is a
tile of its own. The tiles are planned on the host, where the scheduler's metadata is.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# uploads.Uploader.put: int arrays to the device in one copy
Upload = Callable[[torch.dtype, Sequence[Sequence[int] | np.ndarray]], list[torch.Tensor]]

TILE_ROWS = 64  # query rows (tokens x query heads of a KV head) per tile with prompt chunks
DECODE_TILE_ROWS = 16  # ... with decode tokens only (the smallest tl.dot tile)


def next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def plan_tiles(seq_ids: np.ndarray, block_q: int) -> tuple[np.ndarray, np.ndarray]:
    """The query tiles of a step's tokens: starts (T,) and lengths (T,), int32. A tile is up
    to `block_q` consecutive tokens of one sequence; a new one begins where the sequence
    changes or the last is full."""
    n = len(seq_ids)
    index = np.arange(n)
    new_run = np.ones(n, dtype=bool)
    new_run[1:] = seq_ids[1:] != seq_ids[:-1]
    run_start = np.maximum.accumulate(np.where(new_run, index, 0))
    starts = np.flatnonzero((index - run_start) % block_q == 0)
    lengths = np.diff(starts, append=n)  # tiles partition the tokens, in order
    return starts.astype(np.int32), lengths.astype(np.int32)


@dataclass(frozen=True)
class PagedQueries:
    """Where a step's query tokens are, for attention over the paged cache."""

    seq_ids: torch.Tensor  # (N,) int32 sequence (block table row) of each query token
    positions: torch.Tensor  # (N,) int32 its position: it sees keys 0..position
    tile_starts: torch.Tensor  # (T,) int32 first token of each query tile
    tile_lengths: torch.Tensor  # (T,) int32 its tokens (0: an unused tile, skipped)
    block_q: int  # tokens per tile at most

    @classmethod
    def build(
        cls,
        seq_ids: Sequence[int] | np.ndarray,
        positions: Sequence[int] | np.ndarray,
        group: int,
        device: torch.device,
        upload: Upload | None = None,
    ) -> PagedQueries:
        """From the host's per-token sequence indices and positions; `group` query heads
        share a KV head. A tile holds block_q tokens x the group's heads (padded to a power
        of 2) as rows: 64 rows where a prompt chunk is, 16 for decode tokens alone. `upload`
        (uploads.Uploader.put) moves the four arrays in one copy; else one copy each."""
        seqs = np.asarray(seq_ids, dtype=np.int32)
        pos = np.asarray(positions, dtype=np.int32)
        decode_only = len(np.unique(seqs)) == len(seqs)
        rows = DECODE_TILE_ROWS if decode_only else TILE_ROWS
        block_q = max(1, rows // next_power_of_2(group))
        starts, lengths = plan_tiles(seqs, block_q)
        arrays = [seqs, pos, starts, lengths]
        if upload is not None:
            seq_t, pos_t, starts_t, lengths_t = upload(torch.int32, arrays)
        else:
            seq_t, pos_t, starts_t, lengths_t = (torch.from_numpy(a).to(device) for a in arrays)
        return cls(seq_t, pos_t, starts_t, lengths_t, block_q)


def paged_attention_reference(
    q: torch.Tensor,
    key_pool: torch.Tensor,
    value_pool: torch.Tensor,
    block_tables: torch.Tensor,
    queries: PagedQueries,
    scale: float,
) -> torch.Tensor:
    """softmax(q K.T * scale) V of each query token against its sequence's keys up to its
    position, in float32: the spec. q (N, H, D); pools (num_blocks, block_size, H_kv, D);
    block_tables (max_seqs, max_blocks) int32. Returns (N, H, D) in q's dtype. Every token
    gathers keys up to the step's longest position: O(N * L) memory, for tests and a few
    tokens."""
    n, heads, d = q.shape
    block_size, kv_heads = key_pool.shape[1], key_pool.shape[2]
    group = heads // kv_heads
    if not n:
        return q.clone()
    positions = queries.positions.long()
    length = int(positions.max()) + 1
    num_blocks = -(-length // block_size)
    blocks = block_tables[queries.seq_ids.long(), :num_blocks].long()  # (N, nb)
    keys = key_pool[blocks].flatten(1, 2)[:, :length].float()  # (N, L, H_kv, D)
    values = value_pool[blocks].flatten(1, 2)[:, :length].float()
    qg = q.float().view(n, kv_heads, group, d)
    scores = torch.einsum("nhgd,nlhd->nhgl", qg, keys) * scale  # (N, H_kv, g, L)
    future = torch.arange(length, device=q.device) > positions.unsqueeze(1)  # (N, L)
    scores = scores.masked_fill(future[:, None, None, :], -torch.inf)
    out = torch.einsum("nhgl,nlhd->nhgd", scores.softmax(dim=-1), values)  # (N, H_kv, g, D)
    return out.reshape(n, heads, d).to(q.dtype)
