"""The paged KV cache: sizing from device memory, the block allocator, admission and growth in
blocks, compact rows, slot mapping and writes, shared prefixes, and a fuzz of
admit/grow/fork/free against the row cache and a model of what each sequence holds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from loraplex.server.engine.kv_cache import CacheShape, KVCache
from loraplex.server.engine.paged_kv import (
    BlockAllocator,
    PagedKVCache,
    block_bytes,
    blocks_for_memory,
)

SHAPE = CacheShape(num_layers=2, kv_heads=2, head_dim=3, dtype=torch.float32)
CPU = torch.device("cpu")
GiB = 2**30


def make(num_blocks: int = 8, max_seqs: int = 4, max_len: int = 32, block_size: int = 4):
    return PagedKVCache(SHAPE, num_blocks, max_seqs, max_len, CPU, block_size=block_size)


def tokens_kv(ids: list[int], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values (n, H_kv, D) that name each token (and the layer) by their value."""
    k = torch.tensor(ids, dtype=torch.float32).view(-1, 1, 1).expand(-1, 2, 3) + 1000 * layer
    return k.contiguous(), -k


# -- sizing -----------------------------------------------------------------------------------
def test_blocks_for_memory_keeps_the_unused_share_and_the_activations_free():
    per_block = block_bytes(SHAPE, 16)
    assert per_block == 16 * 2 * 2 * 2 * 3 * 4
    # 80 GiB device, 60 GiB free after the model: 0.9 keeps 8 GiB free, 2 GiB for activations
    blocks = blocks_for_memory(
        free_bytes=60 * GiB,
        total_bytes=80 * GiB,
        utilization=0.9,
        bytes_per_block=2**20,
        activation_bytes=2 * GiB,
    )
    assert blocks == 50 * 1024
    # a Llama-3-8B-shaped cache (32 layers, 8 KV heads of 128, bf16): 2 MiB per block
    llama = CacheShape(num_layers=32, kv_heads=8, head_dim=128, dtype=torch.bfloat16)
    assert block_bytes(llama) == 2 * 2**20


def test_blocks_for_memory_refuses_a_budget_without_a_block():
    with pytest.raises(ValueError, match="no memory left"):
        blocks_for_memory(
            free_bytes=8 * GiB, total_bytes=80 * GiB, utilization=0.9, bytes_per_block=2**20
        )
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        blocks_for_memory(free_bytes=1, total_bytes=1, utilization=1.5, bytes_per_block=1)


# -- the allocator ----------------------------------------------------------------------------
def test_allocator_hands_out_free_blocks_and_a_shared_block_survives_its_first_release():
    allocator = BlockAllocator(4)
    a = allocator.allocate(3)
    assert sorted(a.tolist()) == [0, 1, 2] and allocator.num_free == 1
    allocator.share(a[:1])
    assert allocator.release(a).tolist() == a[1:].tolist()  # a[0] still has a user
    assert allocator.num_free == 3 and allocator.refcount[a[0]] == 1
    assert allocator.release(a[:1]).tolist() == [a[0]]
    assert allocator.num_free == 4
    with pytest.raises(ValueError, match="free block"):
        allocator.release(a[:1])
    with pytest.raises(RuntimeError, match="5 blocks asked"):
        allocator.allocate(5)


# -- admission and growth ---------------------------------------------------------------------
def test_admission_and_usage_are_in_blocks():
    cache = make(num_blocks=8, block_size=4)
    assert cache.blocks_for(9) == 3
    s = cache.allocate(9)  # commits 3 blocks before taking any
    assert cache.committed_blocks == 3 and cache.usage == 3 / 8
    assert cache.allocator.num_used == 0 and cache.token_budget == 32
    assert cache.can_admit(20) and not cache.can_admit(21)  # 3 + 5 blocks fit, not 3 + 6
    assert cache.can_admit(8, rows=2) and not cache.can_admit(9, rows=2)
    assert cache.holds(16, rows=2) and not cache.holds(17, rows=2)
    cache.extend([s], [5])
    assert cache.allocator.num_used == 2 and cache.committed_blocks == 3  # taken from its share
    assert cache.free(s) is None
    assert cache.committed_blocks == 0 and cache.allocator.num_free == 8


def test_rows_stay_compact_the_last_moving_into_a_freed_one():
    cache = make(num_blocks=8, max_seqs=3, block_size=4)
    rows = [cache.allocate(8) for _ in range(3)]
    assert rows == [0, 1, 2] and not cache.can_admit(1)  # every row taken
    cache.grow(rows, [5, 1, 7])
    last_blocks = cache.blocks(2)
    assert cache.free(0) == 2  # the last row's table entries move, not its keys
    assert cache.num_used_rows == 2 and cache.length(0) == 7
    assert cache.blocks(0).tolist() == last_blocks.tolist()
    assert cache.tables()[0, :2].tolist() == last_blocks.tolist()
    assert cache.free(1) is None and cache.allocator.num_used == 2


def test_a_sequence_grows_block_by_block_and_never_past_its_reservation():
    cache = make(num_blocks=8, block_size=4, max_len=16)
    s = cache.allocate(1000)  # capped at max_len: 4 blocks
    assert cache.committed_blocks == 4
    cache.extend([s], [3])  # a prompt chunk: one block
    assert len(cache.blocks(s)) == 1
    cache.grow([s], [4])  # fills it
    assert len(cache.blocks(s)) == 1
    cache.grow([s, s], [5, 3])  # a decode token past a full block takes a new one
    assert len(cache.blocks(s)) == 2 and cache.length(s) == 5
    with pytest.raises(RuntimeError, match="beyond"):
        cache.extend([s], [12])
    with pytest.raises(ValueError, match="twice"):
        cache.extend([s, s], [1, 1])


def test_the_block_table_is_one_fixed_tensor_naming_each_sequences_blocks():
    cache = make(num_blocks=8, max_seqs=3, block_size=4)
    table = cache.tables()
    assert table.shape == (3, 8) and table.dtype == torch.int32
    a, b = cache.allocate(16), cache.allocate(16)
    cache.extend([a, b], [6, 2])  # a: two blocks, b: one
    cache.extend([b, a], [7, 1])  # b: two more; a fits in its second block
    assert cache.tables() is table
    assert table[a, :2].tolist() == cache.blocks(a).tolist()
    assert table[b, :3].tolist() == cache.blocks(b).tolist()
    assert len({*cache.blocks(a).tolist(), *cache.blocks(b).tolist()}) == 5


def test_slot_mapping_places_a_chunk_that_starts_mid_block():
    cache = make(num_blocks=8, block_size=4)
    s = cache.allocate(16)
    cache.extend([s], [3])
    cache.extend([s], [6])  # positions 3..8: the rest of block 0, block 1, one slot of block 2
    blocks = cache.blocks(s).tolist()
    slots = cache.token_index(torch.full((6,), s), torch.arange(3, 9)).tolist()
    want = [blocks[p // 4] * 4 + p % 4 for p in range(3, 9)]
    assert slots == want
    k, v = tokens_kv(list(range(3, 9)), 0)
    cache.write(0, torch.tensor(slots), k, v)
    keys, values = cache.gather(0, s)
    assert torch.equal(keys[3:], k) and torch.equal(values[3:], v)
    read_k, read_v = cache.read(0, torch.tensor(slots))
    assert torch.equal(read_k, k) and torch.equal(read_v, v)


def test_a_shared_prefix_is_read_by_both_and_outlives_its_first_owner():
    cache = make(num_blocks=6, block_size=4, max_len=16)
    a = cache.allocate(12)
    cache.extend([a], [10])
    k, v = tokens_kv(list(range(10)), 0)
    cache.write(0, cache.token_index(torch.full((10,), a), torch.arange(10)), k, v)
    prefix = cache.blocks(a)[:2]  # its two full blocks
    b = cache.allocate(12, shared_blocks=prefix)
    assert cache.length(b) == 8 and cache.committed_blocks == 3 + 1  # b takes one new block
    assert cache.free(a) == b  # its prefix blocks stay: b, now in row a, still reads them
    assert cache.allocator.num_used == 2
    keys, _ = cache.gather(0, a)
    assert torch.equal(keys, k[:8])
    cache.free(a)
    assert cache.allocator.num_free == 6 and cache.committed_blocks == 0


def test_samples_share_the_prompts_full_blocks_and_copy_its_last():
    cache = make(num_blocks=8, block_size=4, max_len=16)
    a, b = cache.allocate(12), cache.allocate(12)
    assert cache.committed_blocks == 6
    cache.grow([a], [10])
    k, v = tokens_kv(list(range(10)), 1)
    cache.write(1, cache.token_index(torch.full((10,), a), torch.arange(10)), k, v)
    cache.copy_prefix(a, b, 10)
    assert cache.blocks(b)[:2].tolist() == cache.blocks(a)[:2].tolist()
    assert cache.blocks(b)[2] != cache.blocks(a)[2]  # the partial block: its own copy
    assert cache.allocator.num_used == 4 and cache.committed_blocks == 4
    keys, values = cache.gather(1, b)
    assert torch.equal(keys, k) and torch.equal(values, v)
    with pytest.raises(ValueError, match="empty row"):
        cache.copy_prefix(a, b, 4)


# -- the fuzz ---------------------------------------------------------------------------------
class PagedCacheMachine(RuleBasedStateMachine):
    """Random admissions (some starting with another sequence's full blocks), steps that grow
    several sequences at once (decode tokens and prompt chunks), samples' prefix copies and
    frees (the last row moving into the freed one), on the paged cache and the row cache side
    by side, against a model: per row, the ids of the tokens it holds and the tokens it was
    admitted for. Both caches must read back every row's tokens, and move the same rows."""

    BLOCK = 4
    ROWS = 5

    def __init__(self) -> None:
        super().__init__()
        self.cache = make(num_blocks=12, max_seqs=self.ROWS, max_len=24, block_size=self.BLOCK)
        # the row cache, with room for every row at max_len: it admits whatever blocks do
        self.rows = KVCache(SHAPE, self.ROWS, 24, self.ROWS * 24 * SHAPE.bytes_per_token, CPU)
        self.tokens: list[list[int]] = []  # per row, the ids of its tokens, in order
        self.capacity: list[int] = []
        self.next_id = 0

    @rule(tokens=st.integers(1, 40), source=st.integers(0, 4), share=st.integers(0, 6))
    def admit(self, tokens: int, source: int, share: int) -> None:
        capacity = min(tokens, self.cache.max_len)
        prefix: list[int] = []
        blocks = np.zeros(0, dtype=np.int32)
        if self.tokens and share:  # the first full blocks of a live sequence
            owner = source % len(self.tokens)
            share = min(share, len(self.tokens[owner]) // self.BLOCK, capacity // self.BLOCK)
            blocks = self.cache.blocks(owner)[:share]
            prefix = self.tokens[owner][: share * self.BLOCK]
        need = -(-capacity // self.BLOCK) - len(blocks)
        fits = len(self.tokens) < self.ROWS and self.committed() + need <= 12
        assert self.cache.can_admit(tokens, 1, len(blocks)) == fits
        if not fits:
            with pytest.raises(RuntimeError, match="full"):
                self.cache.allocate(tokens, blocks)
            return
        row = self.cache.allocate(tokens, blocks)
        assert row == len(self.tokens) == self.rows.allocate(tokens)
        if prefix:  # the row cache copies what the paged one shares
            self.rows.copy_prefix(source % len(self.tokens), row, len(prefix))
        self.tokens.append(list(prefix))
        self.capacity.append(capacity)

    @precondition(lambda self: bool(self.tokens))
    @rule(data=st.data())
    def step(self, data: st.DataObject) -> None:
        live = range(len(self.tokens))
        rows = data.draw(st.lists(st.sampled_from(live), min_size=1, unique=True))
        room = [self.capacity[r] - len(self.tokens[r]) for r in rows]
        counts = [data.draw(st.integers(0, n)) for n in room]  # 1: decode, more: a chunk
        ids, token_rows, positions = [], [], []
        for r, n in zip(rows, counts, strict=True):
            new = list(range(self.next_id, self.next_id + n))
            self.next_id += n
            positions += range(len(self.tokens[r]), len(self.tokens[r]) + n)
            self.tokens[r] += new
            ids += new
            token_rows += [r] * n
        for cache in (self.cache, self.rows):  # as the runner's step does
            cache.grow(token_rows, [p + 1 for p in positions])
            index = cache.token_index(
                torch.tensor(token_rows, dtype=torch.long),
                torch.tensor(positions, dtype=torch.long),
            )
            for layer in range(SHAPE.num_layers):
                cache.write(layer, index, *tokens_kv(ids, layer))

    @precondition(lambda self: bool(self.tokens))
    @rule(pick=st.integers(0, 4), data=st.data())
    def fork(self, pick: int, data: st.DataObject) -> None:
        """A prompt's samples: a new row takes a copy of a live row's first tokens."""
        src = pick % len(self.tokens)
        length = data.draw(st.integers(0, len(self.tokens[src])))
        if not self.cache.can_admit(self.capacity[src]) or length > self.capacity[src]:
            return
        dst = self.cache.allocate(self.capacity[src])
        assert dst == self.rows.allocate(self.capacity[src])
        self.cache.copy_prefix(src, dst, length)
        self.rows.copy_prefix(src, dst, length)
        self.tokens.append(self.tokens[src][:length])
        self.capacity.append(self.capacity[src])

    @precondition(lambda self: bool(self.tokens))
    @rule(pick=st.integers(0, 4))
    def free(self, pick: int) -> None:
        row = pick % len(self.tokens)
        last = len(self.tokens) - 1
        moved = self.cache.free(row)
        assert moved == self.rows.free(row, self.capacity[row], len(self.tokens[last]))
        assert moved == (last if row != last else None)
        self.tokens[row], self.capacity[row] = self.tokens[last], self.capacity[last]
        self.tokens.pop()
        self.capacity.pop()

    def committed(self) -> int:
        live = range(len(self.tokens))
        held = {b for s in live for b in self.cache.blocks(s).tolist()}
        left = sum(-(-self.capacity[s] // self.BLOCK) - len(self.cache.blocks(s)) for s in live)
        return len(held) + left

    @invariant()
    def blocks_are_owned_once_unless_shared_and_none_is_lost(self) -> None:
        users = np.zeros(12, dtype=np.int32)
        for s, ids in enumerate(self.tokens):
            blocks = self.cache.blocks(s)
            assert len(blocks) == -(-len(ids) // self.BLOCK)
            users[blocks] += 1
        assert users.tolist() == self.cache.allocator.refcount.tolist()
        assert self.cache.allocator.num_free == int((users == 0).sum())

    @invariant()
    def usage_is_the_committed_share_of_blocks(self) -> None:
        assert self.cache.committed_blocks == self.committed() <= 12
        assert self.cache.usage == self.committed() / 12
        assert self.cache.num_used_rows == self.rows.num_used_rows == len(self.tokens)

    @invariant()
    def both_caches_read_back_what_was_written(self) -> None:
        for s, ids in enumerate(self.tokens):
            assert self.cache.length(s) == len(ids)
            positions = torch.arange(len(ids))
            rows = torch.full_like(positions, s)
            for layer in range(SHAPE.num_layers):
                want_k, want_v = tokens_kv(ids, layer)
                keys, values = self.cache.gather(layer, s)
                assert torch.equal(keys, want_k) and torch.equal(values, want_v)
                keys, values = self.rows.read(layer, self.rows.token_index(rows, positions))
                assert torch.equal(keys, want_k) and torch.equal(values, want_v)


PagedCacheMachine.TestCase.settings = settings(
    max_examples=60,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_paged_cache_against_the_row_cache = PagedCacheMachine.TestCase
