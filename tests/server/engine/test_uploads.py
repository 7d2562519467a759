"""A step's inputs in one upload per dtype (uploads.py, the runner's path on CUDA; here with
the CPU standing in for the device): the tensors equal what the per-tensor path makes, and the
runner's logits are the same either way."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.model_runner import DecodeWork, ModelRunner, PrefillWork
from loraplex.server.engine.uploads import Uploader

CPU = torch.device("cpu")


def test_arrays_arrive_as_views_of_one_copy_and_the_buffer_grows():
    uploads = Uploader(CPU)
    ids, positions = [5, 6, 7], np.arange(4, dtype=np.int64)
    got = uploads.put(torch.long, [ids, positions, []])
    assert [t.tolist() for t in got] == [ids, positions.tolist(), []]
    assert got[0].dtype == torch.long and uploads.copies == 1
    assert got[1].data_ptr() == got[0].data_ptr() + 3 * 8  # side by side in one buffer
    small = uploads.put(torch.int32, [[1, 2]])
    assert small[0].dtype == torch.int32 and small[0].tolist() == [1, 2]
    big = list(range(1000))  # past the first buffer: it grows
    assert uploads.put(torch.long, [big, [3]])[0].tolist() == big
    assert uploads.copies == 3


@pytest.mark.parametrize(
    ("kv_layout", "kernels"), [("rows", "torch"), ("paged", "torch"), ("paged", "triton")]
)
def test_a_runner_uploading_its_inputs_computes_the_same_logits(load_tiny, kv_layout, kernels):
    if kernels == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("triton comes with the dev extra (Linux)")
    logits = []
    for uploads in (None, Uploader(CPU)):
        runner = ModelRunner(
            load_tiny(), num_slots=2, max_rank=8, kv_layout=kv_layout, kernels=kernels
        )
        runner.uploads = uploads
        prompts = [[5, 17, 300, 42, 7] * 4, [9, 8, 7]]
        rows = [runner.cache.allocate(len(p) + 3) for p in prompts]
        work = [PrefillWork(r, NO_ADAPTER, p, 0, True, all_logits=i == 1)
                for i, (r, p) in enumerate(zip(rows, prompts, strict=True))]  # fmt: skip
        out = [runner.step([], work)]
        for n in range(2):
            step = [DecodeWork(r, NO_ADAPTER, 11 + n, len(p) + n)
                    for r, p in zip(rows, prompts, strict=True)]  # fmt: skip
            out.append(runner.step(step, []))
        logits.append(torch.cat(out))
        if uploads is not None:
            assert uploads.copies == 3 * (2 if kernels == "triton" else 1)
    assert torch.equal(logits[0], logits[1])


def test_host_places_equal_the_device_computed_ones():
    from loraplex.server.engine.kv_cache import CacheShape, KVCache
    from loraplex.server.engine.paged_kv import PagedKVCache

    shape = CacheShape(num_layers=1, kv_heads=3, head_dim=4, dtype=torch.float32)
    rows_cache = KVCache(shape, 4, 40, 4 * 40 * shape.bytes_per_token, CPU)
    paged = PagedKVCache(shape, num_blocks=16, max_seqs=4, max_len=40, device=CPU, block_size=8)
    for cache in (rows_cache, paged):
        rows = [cache.allocate(40) for _ in range(3)]
        cache.grow(rows, [33, 9, 17])
        row_a = np.array([0, 0, 1, 2, 2, 2], dtype=np.int64)
        pos_a = np.array([0, 32, 8, 3, 16, 9], dtype=np.int64)
        want = cache.token_index(torch.from_numpy(row_a), torch.from_numpy(pos_a))
        assert cache.host_index(row_a, pos_a).tolist() == want.tolist()
