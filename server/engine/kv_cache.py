"""The KV cache: a pool of rows, one per running sequence, each able to hold `max_len` tokens.

Per layer, keys and values are (rows, H_kv, max_len, D). A sequence keeps its row from
admission to the end, so nothing is ever re-padded or copied when others join. Rows stay
compact (0..n-1): when a sequence leaves, the last row's tokens move into its place (one copy
of one sequence). Decode attention then reads the prefix view [:n, :, :L] of the pool, batched,
with no gather: on a CPU, where no paged-attention kernel exists, gathering pages would copy the
whole cache every step (HF's DynamicCache does as much with torch.cat).

Why rows and not pages: rows make attention a plain batched matmul. Their cost, reserving
max_len per sequence, is not paid in memory: on the CPU the pool is an anonymous mapping, whose
pages the OS backs only once written (a private mapping: a page handed back is freed). A row
whose sequences reserved more than `keep_len` tokens (a fair share: half the budget over the
rows) has its pages handed back when it is vacated (MADV_DONTNEED), and before a shorter
sequence moves into it; a row within its share keeps them, since the next sequence in it
writes the same pages (handing back every vacated row made 60 calls per finished request,
3840 for a burst of 64, about 2% of its time, and the pages were faulted in again at once).
So the resident pool stays within the reserved tokens plus keep_len per row (1.5x the budget
at most). A kept row still holds the previous sequence's keys and values past the new one's
length; attention reads each sequence's own length only (bounded natively, masked with zero
weight in torch), so they are never seen.
What bounds admission is the token budget: every admitted sequence reserves prompt +
max_new_tokens (capped at max_len) of it, so a running sequence never runs out of cache and
nothing is ever preempted. On CUDA the pool is allocated for real, sized to the budget.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class CacheShape:
    num_layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * self.itemsize


class KVCache:
    def __init__(
        self,
        shape: CacheShape,
        num_rows: int,
        max_len: int,
        budget_bytes: int,
        device: torch.device,
    ) -> None:
        self.shape = shape
        self.max_len = max_len
        self.device = device
        self.token_budget = budget_bytes // shape.bytes_per_token
        if self.token_budget < max_len:
            raise ValueError(
                f"the KV cache budget ({budget_bytes} bytes = {self.token_budget} tokens) must "
                f"hold at least one sequence of max_len {max_len} tokens"
            )
        if device.type != "cpu":  # allocated for real: no more rows than the budget holds
            num_rows = max(1, min(num_rows, self.token_budget // max_len))
        self.num_rows = num_rows
        self._maps: list[mmap.mmap] = []
        per_layer = (num_rows, shape.kv_heads, max_len, shape.head_dim)
        self.keys = [self._alloc(per_layer) for _ in range(shape.num_layers)]
        self.values = [self._alloc(per_layer) for _ in range(shape.num_layers)]
        self.num_used_rows = 0
        self.reserved_tokens = 0
        # tokens per row whose pages a vacated row keeps; per row, how many of its tokens'
        # pages may be backed (the largest reservation of its sequences since the last release)
        self.keep_len = min(max_len, self.token_budget // (2 * num_rows))
        self._extent = [0] * num_rows

    @property
    def usage(self) -> float:
        """Share of the token budget reserved by the running sequences."""
        return self.reserved_tokens / self.token_budget if self.token_budget else 0.0

    def _alloc(self, size: tuple[int, ...]) -> torch.Tensor:
        tensor, region = zero_pages(size, self.shape.dtype, self.device)
        if region is not None:
            self._maps.append(region)
        return tensor

    # -- admission ----------------------------------------------------------------------------
    def can_admit(self, tokens: int, rows: int = 1) -> bool:
        """Whether `rows` more sequences of `tokens` each fit."""
        return (
            self.num_used_rows + rows <= self.num_rows
            and self.reserved_tokens + rows * min(tokens, self.max_len) <= self.token_budget
        )

    def holds(self, tokens: int, rows: int) -> bool:
        """Whether `rows` sequences of `tokens` tokens each fit in the empty cache."""
        return rows <= self.num_rows and rows * min(tokens, self.max_len) <= self.token_budget

    def allocate(self, tokens: int) -> int:
        """Reserve `tokens` (capped at max_len) and return a free row."""
        if not self.can_admit(tokens):
            raise RuntimeError("the KV cache is full")
        self.reserved_tokens += min(tokens, self.max_len)
        row = self.num_used_rows
        self.num_used_rows += 1
        self._extent[row] = max(self._extent[row], min(tokens, self.max_len))
        return row

    def free(self, row: int, tokens: int, last_row_length: int) -> int | None:
        """Free `row` and its reservation. The last row moves into it (its first
        `last_row_length` tokens are copied); returns that moved row's old index, or None."""
        self.reserved_tokens -= min(tokens, self.max_len)
        last = self.num_used_rows - 1
        self.num_used_rows -= 1
        moved = None
        extent = self._extent
        if row != last:
            if extent[row] > max(self.keep_len, extent[last]):  # more than its new sequence's
                self._release_pages(row)
                extent[row] = 0
            n = last_row_length
            for cache in (*self.keys, *self.values):
                cache[row, :, :n].copy_(cache[last, :, :n])
            extent[row] = max(extent[row], extent[last])
            moved = last
        if extent[last] > self.keep_len:
            self._release_pages(last)
            extent[last] = 0
        return moved

    def copy_prefix(self, src: int, dst: int, length: int) -> None:
        """Give row `dst` the first `length` tokens of row `src` (the samples of one prompt)."""
        for cache in (*self.keys, *self.values):
            cache[dst, :, :length].copy_(cache[src, :, :length])

    def _release_pages(self, row: int) -> None:
        """Hand a free row's memory back to the OS (it reads as zeros afterwards)."""
        if not self._maps:
            return
        row_bytes = self.shape.kv_heads * self.max_len * self.shape.head_dim * self.shape.itemsize
        start, end = row * row_bytes, (row + 1) * row_bytes
        offset = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages inside the row only
        length = end // mmap.PAGESIZE * mmap.PAGESIZE - offset
        if length > 0:
            for region in self._maps:
                region.madvise(mmap.MADV_DONTNEED, offset, length)

    def token_index(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(N * H_kv,) flat index of each token's (row, head, position) in a layer's
        (rows * H_kv * max_len, D) view; computed once per step, used by every layer."""
        heads = self.shape.kv_heads
        base = (rows * heads).unsqueeze(1) + torch.arange(heads, device=rows.device)  # (N, H_kv)
        return (base * self.max_len + positions.unsqueeze(1)).view(-1)

    def grow(self, rows: Sequence[int], ends: Sequence[int]) -> None:
        """Nothing to do: a row holds max_len tokens from the start (the paged cache takes
        blocks here)."""

    def host_index(self, rows: np.ndarray, positions: np.ndarray) -> np.ndarray:
        """`token_index` on the host (int64 arrays in and out), for a step's one upload."""
        heads = self.shape.kv_heads
        base = (rows * heads)[:, None] + np.arange(heads)  # (N, H_kv)
        return (base * self.max_len + positions[:, None]).reshape(-1)

    def write(self, layer: int, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store N tokens' keys and values, k, v (N, H_kv, D), at `token_index` places."""
        write_layer(self.keys[layer], self.values[layer], index, k, v)

    def write_prefix(self, layer: int, row: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store a row's first n tokens' keys and values k, v (n, H_kv, D) (a prefix cache
        hit): one strided copy each."""
        n = k.shape[0]
        self.keys[layer][row, :, :n].copy_(k.transpose(0, 1))
        self.values[layer][row, :, :n].copy_(v.transpose(0, 1))

    def read(self, layer: int, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values (N, H_kv, D) at `token_index` places (copies)."""
        heads, d = self.shape.kv_heads, self.shape.head_dim
        keys = self.keys[layer].view(-1, d).index_select(0, index).view(-1, heads, d)
        return keys, self.values[layer].view(-1, d).index_select(0, index).view(-1, heads, d)


def zero_pages(
    size: tuple[int, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, mmap.mmap | None]:
    """A zero tensor; on the CPU over an anonymous mapping (returned too: it must outlive the
    tensor) whose pages the OS backs only once written, private so that a page handed back
    (MADV_DONTNEED) is freed (a shared mapping's pages survive it, and only lose their map)."""
    if device.type != "cpu":
        return torch.zeros(size, dtype=dtype, device=device), None
    count = 1
    for n in size:
        count *= n
    nbytes = count * torch.empty((), dtype=dtype).element_size()
    region = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(region, dtype=dtype, count=count).view(size), region


def write_layer(
    keys: torch.Tensor, values: torch.Tensor, index: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> None:
    """One layer's write of `KVCache.write`: keys/values are its (rows, H_kv, max_len, D)
    pool (one index_copy_ each: a two-index put is several times slower)."""
    d = k.shape[-1]
    keys.view(-1, d).index_copy_(0, index, k.reshape(-1, d))
    values.view(-1, d).index_copy_(0, index, v.reshape(-1, d))
