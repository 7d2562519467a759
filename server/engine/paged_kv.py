"""The paged KV cache, for CUDA: per layer, pools of fixed-size blocks and a table per sequence
naming the blocks that hold its tokens, in order.

The row cache (kv_cache.py) reserves max_len tokens of memory per sequence, which a CPU's lazily
backed pages make free but a GPU pays for in full: an 8B model's 1 GiB budget is 2 rows. Here a
sequence holds only the blocks its tokens fill (16 tokens each), so the pool serves as many
sequences as their actual lengths allow, and a block can be shared by several sequences (the
prefix cache, a later piece: a block's reference count keeps it alive until its last user frees
it; shared blocks are full, so nobody ever writes into one and no copy-on-write is needed).

Layout, per layer: keys and values (num_blocks, block_size, H_kv, D). A step writes each token's
(H_kv, D) contiguously at its slot (block * block_size + offset: one index_copy_ for the whole
step); the attention kernel reads a block of one KV head as block_size rows of D contiguous
values (strided by H_kv * D), which loads coalesced for D of 64 or 128.

Host state lives in numpy arrays indexed by the sequence's index (its row of the block table),
so a step's bookkeeping is a few vectorised ops whatever the batch; the block table the kernels
read is a fixed-capacity int32 tensor (max_seqs, max_blocks_per_seq) on the device, the same
storage every step, so a CUDA graph can read it.

Admission is in blocks, as the row cache's is in tokens: a sequence admitted for T tokens
(prompt + max_new_tokens, capped at max_len) commits ceil(T / block_size) blocks, minus the
shared ones it starts with; it can then always grow to T tokens, and nothing is preempted.
Committed = blocks in use + blocks sequences may still take; usage is its share of the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch

from loraplex.server.engine.kv_cache import CacheShape

log = logging.getLogger(__name__)

BLOCK_SIZE = 16  # tokens per block: one tl.dot tile of keys in the attention kernel


def block_bytes(shape: CacheShape, block_size: int = BLOCK_SIZE) -> int:
    """Device bytes of one block across every layer, keys and values."""
    return block_size * shape.bytes_per_token


def blocks_for_memory(
    *,
    free_bytes: int,
    total_bytes: int,
    utilization: float,
    bytes_per_block: int,
    activation_bytes: int = 0,
) -> int:
    """How many blocks the KV pools may take, as vLLM's `--gpu-memory-utilization` means it: the
    process may use `utilization` of the device's `total_bytes`. `free_bytes` is what the device
    has free once the model and the LoRA stacks are loaded (cudaMemGetInfo: other processes'
    memory counts as used, so it is never handed out), and `activation_bytes` the peak a
    profiling step needed beyond what stays allocated."""
    if not 0.0 < utilization <= 1.0:
        raise ValueError(f"gpu_memory_utilization must be in (0, 1], not {utilization}")
    if bytes_per_block <= 0:
        raise ValueError(f"a block must take some bytes, not {bytes_per_block}")
    kept_free = int((1.0 - utilization) * total_bytes)
    budget = free_bytes - kept_free - activation_bytes
    blocks = max(budget, 0) // bytes_per_block
    if blocks < 1:
        raise ValueError(
            f"no memory left for the KV cache: {free_bytes} bytes free of {total_bytes}, "
            f"{kept_free} kept free (gpu_memory_utilization {utilization}), "
            f"{activation_bytes} for activations, {bytes_per_block} per block"
        )
    return int(blocks)


class BlockAllocator:
    """Physical blocks: a free list (a stack, so alloc and free are O(1) per block) and a
    reference count per block (0: free)."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"a pool needs at least one block, not {num_blocks}")
        self.num_blocks = num_blocks
        self.refcount = np.zeros(num_blocks, dtype=np.int32)  # (num_blocks,)
        # free[:top] are the free blocks; the low ids on top, so a fresh pool hands out 0, 1, ...
        self._free = np.arange(num_blocks - 1, -1, -1, dtype=np.int32)
        self._top = num_blocks

    @property
    def num_free(self) -> int:
        return self._top

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._top

    def allocate(self, count: int) -> np.ndarray:
        """`count` free blocks (int32), each with one reference."""
        if count > self._top:
            raise RuntimeError(f"{count} blocks asked, {self._top} free")
        self._top -= count
        blocks = self._free[self._top : self._top + count][::-1].copy()
        self.refcount[blocks] = 1
        return blocks

    def share(self, blocks: np.ndarray) -> None:
        """One more reference to each of `blocks` (distinct, in use)."""
        if (self.refcount[blocks] < 1).any() or len(np.unique(blocks)) != len(blocks):
            raise ValueError("only distinct blocks in use can be shared")
        self.refcount[blocks] += 1

    def release(self, blocks: np.ndarray) -> np.ndarray:
        """Drop one reference to each of `blocks` (distinct); returns those now free."""
        if (self.refcount[blocks] < 1).any():
            raise ValueError("a free block was released")
        self.refcount[blocks] -= 1
        freed = blocks[self.refcount[blocks] == 0]
        self._free[self._top : self._top + len(freed)] = freed
        self._top += len(freed)
        return freed


class PagedKVCache:
    def __init__(
        self,
        shape: CacheShape,
        num_blocks: int,
        max_seqs: int,
        max_len: int,
        device: torch.device,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        self.shape = shape
        self.block_size = block_size
        self.max_len = max_len
        self.max_seqs = max_seqs
        self.device = device
        self.max_blocks_per_seq = -(-max_len // block_size)
        if num_blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"{num_blocks} blocks of {block_size} tokens cannot hold one sequence of "
                f"max_len {max_len}"
            )
        self.allocator = BlockAllocator(num_blocks)
        per_layer = (num_blocks, block_size, shape.kv_heads, shape.head_dim)
        # zeros, not empty: a block's unwritten slots are read (with zero weight) by attention,
        # and 0 * NaN from uninitialized memory would be NaN
        self.keys = [
            torch.zeros(per_layer, dtype=shape.dtype, device=device)
            for _ in range(shape.num_layers)
        ]
        self.values = [
            torch.zeros(per_layer, dtype=shape.dtype, device=device)
            for _ in range(shape.num_layers)
        ]
        # per sequence index (max_seqs,): tokens held, blocks held, tokens it may grow to,
        # blocks it may still take; the table's host copy (max_seqs, max_blocks_per_seq)
        self._lengths = np.zeros(max_seqs, dtype=np.int64)
        self._num_blocks = np.zeros(max_seqs, dtype=np.int64)
        self._capacity = np.zeros(max_seqs, dtype=np.int64)
        self._reserved = np.zeros(max_seqs, dtype=np.int64)
        self._reserved_total = 0
        self._table = np.zeros((max_seqs, self.max_blocks_per_seq), dtype=np.int32)
        self._free_seqs = list(range(max_seqs - 1, -1, -1))
        # on the CPU the kernels read the host table itself; elsewhere a device copy
        host = torch.from_numpy(self._table)
        self.block_tables = host if device.type == "cpu" else host.to(device)
        self._tables_dirty = False
        log.info(
            "paged KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB), up to %d sequences",
            num_blocks,
            block_size,
            num_blocks * block_size,
            num_blocks * block_bytes(shape, block_size) / 2**20,
            max_seqs,
        )

    # -- admission ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def committed_blocks(self) -> int:
        """Blocks in use plus blocks the running sequences may still take."""
        return self.allocator.num_used + self._reserved_total

    @property
    def usage(self) -> float:
        """Share of the pool's blocks committed to the running sequences (the usage metric)."""
        return self.committed_blocks / self.num_blocks

    @property
    def num_seqs(self) -> int:
        return self.max_seqs - len(self._free_seqs)

    def blocks_for(self, tokens: int) -> int:
        return -(-min(tokens, self.max_len) // self.block_size)

    def can_admit(self, tokens: int, num_shared: int = 0) -> bool:
        """Whether a sequence of up to `tokens` tokens, starting with `num_shared` shared
        blocks, fits now."""
        need = self.blocks_for(tokens) - num_shared
        return bool(self._free_seqs) and self.committed_blocks + need <= self.num_blocks

    def admit(self, tokens: int, shared_blocks: Sequence[int] = ()) -> int:
        """A new sequence that may grow to `tokens` tokens (capped at max_len); returns its
        index. It starts with `shared_blocks` (full blocks of other sequences, in order: its
        first len * block_size tokens), one more reference each."""
        shared = np.asarray(shared_blocks, dtype=np.int32)
        num_shared = len(shared)
        capacity = min(tokens, self.max_len)
        if num_shared * self.block_size > capacity:
            raise ValueError(f"{num_shared} shared blocks exceed a sequence of {capacity} tokens")
        if not self.can_admit(tokens, num_shared):
            raise RuntimeError("the KV cache is full")
        if num_shared:
            self.allocator.share(shared)
        seq = self._free_seqs.pop()
        self._table[seq, :num_shared] = shared
        self._tables_dirty = True
        self._lengths[seq] = num_shared * self.block_size
        self._num_blocks[seq] = num_shared
        self._capacity[seq] = capacity
        self._reserved[seq] = self.blocks_for(tokens) - num_shared
        self._reserved_total += int(self._reserved[seq])
        return seq

    def free(self, seq: int) -> np.ndarray:
        """The sequence ends: its reservation is dropped and its blocks released; returns the
        blocks now free (a shared one stays in use until its last sequence frees it)."""
        freed = self.allocator.release(self._table[seq, : self._num_blocks[seq]])
        self._reserved_total -= int(self._reserved[seq])
        self._lengths[seq] = self._num_blocks[seq] = self._capacity[seq] = 0
        self._reserved[seq] = 0
        self._free_seqs.append(seq)
        return freed

    # -- growth -------------------------------------------------------------------------------
    def length(self, seq: int) -> int:
        return int(self._lengths[seq])

    def blocks(self, seq: int) -> np.ndarray:
        """The blocks of a sequence, in token order (a copy)."""
        return self._table[seq, : self._num_blocks[seq]].copy()

    def extend(self, seqs: Sequence[int] | np.ndarray, counts: Sequence[int] | np.ndarray) -> None:
        """A step adds counts[i] tokens to sequence seqs[i] (each sequence at most once):
        blocks are taken where their last fills up. Vectorised over the step's sequences."""
        seqs = np.asarray(seqs, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        if len(np.unique(seqs)) != len(seqs):
            raise ValueError("a sequence appears twice in one step")
        new_len = self._lengths[seqs] + counts
        if (new_len > self._capacity[seqs]).any():
            raise RuntimeError("a sequence grew beyond the tokens it was admitted for")
        need = -(-new_len // self.block_size) - self._num_blocks[seqs]  # (S,) new blocks each
        total = int(need.sum())
        if total:
            new = self.allocator.allocate(total)
            # sequence s's new blocks go to table columns num_blocks[s], num_blocks[s] + 1, ...
            rows = np.repeat(seqs, need)
            first = np.repeat(self._num_blocks[seqs] - (np.cumsum(need) - need), need)
            self._table[rows, first + np.arange(total)] = new
            self._num_blocks[seqs] += need
            self._reserved[seqs] -= need
            self._reserved_total -= total
            self._tables_dirty = True
        self._lengths[seqs] = new_len

    def tables(self) -> torch.Tensor:
        """The block tables (max_seqs, max_blocks_per_seq) int32 on the device, up to date
        (the same tensor every step). A synchronous copy from pageable memory: the host copy
        may change as soon as this returns."""
        if self._tables_dirty and self.device.type != "cpu":
            self.block_tables.copy_(torch.from_numpy(self._table))
        self._tables_dirty = False
        return self.block_tables

    # -- device side --------------------------------------------------------------------------
    def slot_mapping(self, seq_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(N,) int64 slot (block * block_size + offset) of each token, from its sequence
        seq_ids (N,) and position (N,) (within the sequence's length: extend first)."""
        tables = self.tables()
        blocks = tables[seq_ids, torch.div(positions, self.block_size, rounding_mode="floor")]
        return blocks.long() * self.block_size + positions % self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store N tokens' keys and values k, v (N, H_kv, D) at their slots (N,)."""
        write_blocks(self.keys[layer], self.values[layer], slots, k, v)

    def gather(self, layer: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A sequence's keys and values (length, H_kv, D), copied out of its blocks."""
        blocks = torch.from_numpy(self.blocks(seq)).to(self.device).long()
        n = self.length(seq)
        keys = self.keys[layer][blocks].flatten(0, 1)[:n]
        return keys, self.values[layer][blocks].flatten(0, 1)[:n]


def write_blocks(
    keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """One layer's write: keys/values are its (num_blocks, block_size, H_kv, D) pools, k and v
    (N, H_kv, D), slots (N,) int64; one index_copy_ each."""
    heads, d = k.shape[1], k.shape[2]
    keys.view(-1, heads, d).index_copy_(0, slots, k)
    values.view(-1, heads, d).index_copy_(0, slots, v)
