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

The engine holds it as it holds the row cache (PagedKVCache has its interface): a sequence's
row is its row of the block table, rows stay compact (the last moves into a freed one: a host
copy of its table entries, no keys move), and `grow` takes the blocks a step's tokens need
before their keys are written. Host state lives in numpy arrays indexed by row, so a step's
bookkeeping is a few vectorised ops whatever the batch; the block table the kernels read is a
fixed-capacity int32 tensor (max_seqs, max_blocks_per_seq) on the device, the same storage
every step, so a CUDA graph can read it.

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

from loraplex.server.engine.kv_cache import CacheShape, KVCache, zero_pages

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
    """The row cache's interface (kv_cache.py: rows kept compact, admission per request, the
    last row moved into a freed one) over blocks: a row is a block-table row, so moving one
    is a host copy of its table entries, never of keys or values."""

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
        self.num_rows = max_seqs
        self.device = device
        self.max_blocks_per_seq = -(-max_len // block_size)
        # per row (max_seqs,): tokens held, blocks held, tokens it may grow to, blocks it may
        # still take; the table's host copy (max_seqs, max_blocks_per_seq)
        self._lengths = np.zeros(max_seqs, dtype=np.int64)
        self._num_blocks = np.zeros(max_seqs, dtype=np.int64)
        self._capacity = np.zeros(max_seqs, dtype=np.int64)
        self._reserved = np.zeros(max_seqs, dtype=np.int64)
        self._table = np.zeros((max_seqs, self.max_blocks_per_seq), dtype=np.int32)
        # on the CPU the kernels read the host table itself; elsewhere a device copy
        host = torch.from_numpy(self._table)
        self.block_tables = host if device.type == "cpu" else host.to(device)
        # elsewhere the tables reach the device through a pinned copy of the host's, without
        # blocking; `_uploaded` says when that copy has been read
        on_gpu = device.type == "cuda"
        self._staging = torch.empty_like(host, pin_memory=True) if on_gpu else host
        self._uploaded = torch.cuda.Event() if on_gpu else None
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.num_used_rows = 0
        self.resize(num_blocks)

    def resize(self, num_blocks: int) -> None:
        """(Re)allocate the pools with `num_blocks` blocks, while no row is in use (CUDA
        sizes them after a profiling step run on a small first pool)."""
        if num_blocks < self.max_blocks_per_seq:
            raise ValueError(
                f"{num_blocks} blocks of {self.block_size} tokens cannot hold one sequence of "
                f"max_len {self.max_len}"
            )
        if self.keys and self.num_used_rows:
            raise RuntimeError("the KV cache is resized only while empty")
        # the old pools go before the new ones are allocated (whoever else holds them, the
        # forward, lets go first: DecoderForward.release_cache)
        self.keys = self.values = []
        self._maps = []
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.allocator = BlockAllocator(num_blocks)
        self.num_used_rows = 0
        self._reserved_total = 0
        self._tables_dirty = False
        # one block more than the allocator hands out: the scratch block, owned by no
        # sequence, where the pad tokens of a captured decode step write (decode_graphs.py)
        self.scratch_slot = num_blocks * self.block_size
        per_layer = (num_blocks + 1, self.block_size, self.shape.kv_heads, self.shape.head_dim)
        # zeros, not empty: a block's unwritten slots are read (with zero weight) by attention,
        # and 0 * NaN from uninitialized memory would be NaN
        # (on a CPU, pages the OS backs only as blocks are written, as the row cache's)
        pools = [
            zero_pages(per_layer, self.shape.dtype, self.device)
            for _ in range(2 * self.shape.num_layers)
        ]
        self._maps = [region for _, region in pools if region is not None]
        self.keys = [tensor for tensor, _ in pools[: self.shape.num_layers]]
        self.values = [tensor for tensor, _ in pools[self.shape.num_layers :]]
        log.info(
            "paged KV cache: %d blocks of %d tokens (%d tokens, %.1f MiB), up to %d sequences",
            num_blocks,
            self.block_size,
            num_blocks * self.block_size,
            num_blocks * block_bytes(self.shape, self.block_size) / 2**20,
            self.num_rows,
        )

    # -- admission ----------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def token_budget(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def committed_blocks(self) -> int:
        """Blocks in use plus blocks the running sequences may still take."""
        return self.allocator.num_used + self._reserved_total

    @property
    def usage(self) -> float:
        """Share of the pool's blocks committed to the running sequences (the usage metric)."""
        return self.committed_blocks / self.num_blocks

    def blocks_for(self, tokens: int) -> int:
        return -(-min(tokens, self.max_len) // self.block_size)

    def can_admit(self, tokens: int, rows: int = 1, num_shared: int = 0) -> bool:
        """Whether `rows` more sequences of up to `tokens` tokens each fit now, the first
        starting with `num_shared` shared blocks."""
        need = rows * self.blocks_for(tokens) - num_shared
        return (
            self.num_used_rows + rows <= self.num_rows
            and self.committed_blocks + need <= self.num_blocks
        )

    def holds(self, tokens: int, rows: int) -> bool:
        """Whether `rows` sequences of `tokens` tokens each fit in the empty cache."""
        return rows <= self.num_rows and rows * self.blocks_for(tokens) <= self.num_blocks

    def allocate(self, tokens: int, shared_blocks: Sequence[int] = ()) -> int:
        """A new row for a sequence that may grow to `tokens` tokens (capped at max_len). It
        starts with `shared_blocks` (full blocks of other sequences, in order: its first
        len * block_size tokens), one more reference each."""
        shared = np.asarray(shared_blocks, dtype=np.int32)
        num_shared = len(shared)
        capacity = min(tokens, self.max_len)
        if num_shared * self.block_size > capacity:
            raise ValueError(f"{num_shared} shared blocks exceed a sequence of {capacity} tokens")
        if not self.can_admit(tokens, 1, num_shared):
            raise RuntimeError("the KV cache is full")
        row = self.num_used_rows
        self.num_used_rows += 1
        self._capacity[row] = capacity
        self._reserved[row] = self.blocks_for(tokens)
        self._reserved_total += int(self._reserved[row])
        if num_shared:
            self._share(row, shared)
        return row

    def _share(self, row: int, shared: np.ndarray) -> None:
        """An empty row starts with `shared`, full blocks: taken from its reservation."""
        self.allocator.share(shared)
        n = len(shared)
        self._table[row, :n] = shared
        self._tables_dirty = True
        self._lengths[row] = n * self.block_size
        self._num_blocks[row] = n
        self._reserved[row] -= n
        self._reserved_total -= n

    def free(self, row: int, tokens: int = 0, last_row_length: int = 0) -> int | None:
        """The sequence in `row` ends: its reservation is dropped and its blocks released (a
        shared one stays in use until its last sequence frees it). The last row moves into
        it; returns that moved row's old index, or None. (`tokens` and `last_row_length`:
        the row cache's arguments; blocks know both.)"""
        self.allocator.release(self._table[row, : self._num_blocks[row]])
        self._reserved_total -= int(self._reserved[row])
        last = self.num_used_rows - 1
        moved = None
        if row != last:
            for column in (self._lengths, self._num_blocks, self._capacity, self._reserved):
                column[row] = column[last]
            self._table[row] = self._table[last]
            self._tables_dirty = True
            moved = last
        self._lengths[last] = self._num_blocks[last] = 0
        self._capacity[last] = self._reserved[last] = 0
        self.num_used_rows -= 1
        return moved

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Give the empty row `dst` the first `length` tokens of row `src` (the samples of one
        prompt): its full blocks shared, the rest copied into a block of its own."""
        if self._lengths[dst]:
            raise ValueError("a prefix is copied into an empty row only")
        full = length // self.block_size
        self._share(dst, self._table[src, :full].copy())
        if length > full * self.block_size:
            self.grow([dst], [length])
            positions = torch.arange(full * self.block_size, length, device=self.device)
            taken = self.token_index(torch.full_like(positions, src), positions)
            given = self.token_index(torch.full_like(positions, dst), positions)
            for layer in range(self.shape.num_layers):
                self.write(layer, given, *self.read(layer, taken))

    # -- growth -------------------------------------------------------------------------------
    def length(self, row: int) -> int:
        return int(self._lengths[row])

    def blocks(self, row: int) -> np.ndarray:
        """The blocks of a row, in token order (a copy)."""
        return self._table[row, : self._num_blocks[row]].copy()

    def grow(self, rows: Sequence[int], ends: Sequence[int]) -> None:
        """Rows rows[i] will hold at least ends[i] tokens (a step's tokens, before their
        keys and values are written): blocks are taken where a row's last fills up. A row
        may appear more than once; vectorised over the step."""
        rows_a = np.asarray(rows, dtype=np.int64)
        target = self._lengths.copy()
        np.maximum.at(target, rows_a, np.asarray(ends, dtype=np.int64))
        touched = np.flatnonzero(target != self._lengths)
        self.extend(touched, target[touched] - self._lengths[touched])

    def extend(self, rows: Sequence[int] | np.ndarray, counts: Sequence[int] | np.ndarray) -> None:
        """A step adds counts[i] tokens to row rows[i] (each row at most once)."""
        seqs = np.asarray(rows, dtype=np.int64)
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
            # row s's new blocks go to table columns num_blocks[s], num_blocks[s] + 1, ...
            where = np.repeat(seqs, need)
            first = np.repeat(self._num_blocks[seqs] - (np.cumsum(need) - need), need)
            self._table[where, first + np.arange(total)] = new
            self._num_blocks[seqs] += need
            self._reserved[seqs] -= need
            self._reserved_total -= total
            self._tables_dirty = True
        self._lengths[seqs] = new_len

    def tables(self) -> torch.Tensor:
        """The block tables (max_seqs, max_blocks_per_seq) int32 on the device, up to date
        (the same tensor every step). Off the CPU, through a pinned staging copy and a copy
        that does not block: the host's table may change as soon as this returns."""
        if self._tables_dirty and self._uploaded is not None:
            self._uploaded.synchronize()  # the last upload has read the staging copy
            self._staging.copy_(torch.from_numpy(self._table))
            self.block_tables.copy_(self._staging, non_blocking=True)
            self._uploaded.record()
        self._tables_dirty = False
        return self.block_tables

    # -- device side --------------------------------------------------------------------------
    def token_index(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(N,) int64 slot (block * block_size + offset) of each token, from its row (N,) and
        position (N,), within the row's length (`grow` first)."""
        tables = self.tables()
        blocks = tables[rows, torch.div(positions, self.block_size, rounding_mode="floor")]
        return blocks.long() * self.block_size + positions % self.block_size

    def host_index(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """`token_index` on the host (int64 arrays in and out), for a step's one upload."""
        blocks = self._table[rows, positions // self.block_size].astype(np.int64)
        return blocks * self.block_size + positions % self.block_size

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store N tokens' keys and values k, v (N, H_kv, D) at their slots (N,)."""
        write_blocks(self.keys[layer], self.values[layer], slots, k, v)

    def write_prefix(self, layer: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a row's first n tokens' keys and values k, v (n, H_kv, D) (a prefix cache
        hit), taking the blocks they need."""
        n = k.shape[0]
        self.grow([row], [n])
        positions = torch.arange(n, device=self.device)
        self.write(layer, self.token_index(torch.full_like(positions, row), positions), k, v)

    def read(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (N, H_kv, D) at `slots` (N,) (copies)."""
        heads, d = self.shape.kv_heads, self.shape.head_dim
        keys = self.keys[layer].view(-1, heads, d).index_select(0, slots)
        return keys, self.values[layer].view(-1, heads, d).index_select(0, slots)

    def gather(self, layer: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A row's keys and values (length, H_kv, D), copied out of its blocks."""
        blocks = torch.from_numpy(self.blocks(row)).to(self.device).long()
        n = self.length(row)
        keys = self.keys[layer][blocks].flatten(0, 1)[:n]
        return keys, self.values[layer][blocks].flatten(0, 1)[:n]


KVStore = KVCache | PagedKVCache  # what the engine and the forward hold: rows or blocks


def write_blocks(
    keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """One layer's write: keys/values are its (num_blocks, block_size, H_kv, D) pools, k and v
    (N, H_kv, D), slots (N,) int64; one index_copy_ each."""
    heads, d = k.shape[1], k.shape[2]
    keys.view(-1, heads, d).index_copy_(0, slots, k)
    values.view(-1, heads, d).index_copy_(0, slots, v)
