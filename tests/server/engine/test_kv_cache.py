"""The row-pool KV cache: admission by rows and token budget, compaction on free, writes."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.kv_cache import CacheShape, KVCache

SHAPE = CacheShape(num_layers=2, kv_heads=2, head_dim=4, dtype=torch.float32)


def make(rows: int = 3, max_len: int = 16, budget_tokens: int = 40) -> KVCache:
    return KVCache(SHAPE, rows, max_len, budget_tokens * SHAPE.bytes_per_token, torch.device("cpu"))


def test_admission_is_bounded_by_the_token_budget():
    cache = make(rows=3, budget_tokens=40)
    assert cache.token_budget == 40
    assert cache.allocate(16) == 0 and cache.allocate(16) == 1
    assert not cache.can_admit(16)  # 32 + 16 > 40 tokens
    assert cache.can_admit(8)
    assert cache.allocate(8) == 2 and cache.reserved_tokens == 40


def test_a_reservation_is_capped_at_max_len_and_rows_are_bounded():
    cache = make(rows=2, budget_tokens=64)
    cache.allocate(1000)  # capped: a sequence never holds more than max_len tokens
    assert cache.reserved_tokens == 16
    cache.allocate(4)
    assert not cache.can_admit(1)  # no free row
    with pytest.raises(RuntimeError):
        cache.allocate(1)


def test_budget_must_hold_one_full_sequence():
    with pytest.raises(ValueError, match="at least one sequence"):
        make(max_len=16, budget_tokens=15)


def test_free_moves_the_last_row_into_the_hole_and_keeps_its_tokens():
    cache = make(rows=3, budget_tokens=48)
    rows = [cache.allocate(8) for _ in range(3)]
    lengths = [5, 6, 7]
    for layer in range(SHAPE.num_layers):
        for row, n in zip(rows, lengths, strict=True):
            k = torch.full((n, 2, 4), 10.0 * row + layer)
            index = cache.token_index(torch.full((n,), row), torch.arange(n))
            cache.write(layer, index, k, -k)
    moved = cache.free(0, 8, last_row_length=7)
    assert moved == 2 and cache.num_used_rows == 2 and cache.reserved_tokens == 16
    for layer in range(SHAPE.num_layers):
        # Row 0 now holds what row 2 held; row 1 is untouched.
        assert torch.equal(cache.keys[layer][0, :, :7], torch.full((2, 7, 4), 20.0 + layer))
        assert torch.equal(cache.values[layer][0, :, :7], torch.full((2, 7, 4), -20.0 - layer))
        assert torch.equal(cache.keys[layer][1, :, :6], torch.full((2, 6, 4), 10.0 + layer))
    assert cache.free(1, 8, last_row_length=0) is None  # the last row: nothing moves
    assert cache.allocate(8) == 1


def test_write_places_each_token_at_its_row_head_and_position():
    cache = make()
    rows, positions = torch.tensor([2, 0, 2]), torch.tensor([3, 0, 4])
    k = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)
    cache.write(1, cache.token_index(rows, positions), k, k + 100)
    for i in range(3):
        for h in range(2):
            assert torch.equal(cache.keys[1][rows[i], h, positions[i]], k[i, h])
            assert torch.equal(cache.values[1][rows[i], h, positions[i]], k[i, h] + 100)
    assert torch.count_nonzero(cache.keys[0]) == 0  # other layers untouched


def test_a_vacated_row_keeps_its_pages_within_its_share_and_hands_back_the_rest():
    """Rows whose sequences reserved at most keep_len tokens keep their pages (the next
    sequence writes the same ones); a longer row's are handed back when it is vacated, and
    before a shorter sequence moves into it (they read as zeros again)."""
    cache = make(rows=3, max_len=1024, budget_tokens=1536)  # rows of 32 KiB, whole pages
    assert cache.keep_len == 256

    def fill(row: int) -> None:
        for layer in range(SHAPE.num_layers):
            cache.keys[layer][row].fill_(1.0)
            cache.values[layer][row].fill_(1.0)

    def backed(row: int) -> bool:
        return bool(cache.keys[0][row, :, 512:].any())

    for tokens in (100, 1024, 100):
        fill(cache.allocate(tokens))
    cache.free(2, 100, last_row_length=0)  # within its share: kept
    assert backed(2)
    cache.free(1, 1024, last_row_length=0)  # a long row: handed back
    assert not backed(1) and not bool(cache.values[1][1].any())
    assert cache.allocate(1024) == 1 and cache.allocate(50) == 2
    fill(1)
    cache.free(1, 1024, last_row_length=50)  # row 2's short sequence moves into long row 1
    assert not backed(1) and bool(cache.keys[0][1, :, :50].all())
    assert backed(2)  # the vacated short row keeps its pages
