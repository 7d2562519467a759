"""CUDA graphs of decode steps (`--cuda-graphs`, the Triton path over the paged KV cache): a
decode step of n tokens runs as the replay of a graph captured for the smallest bucket of at
least n tokens, so the host pays one launch where eager mode pays every op of every layer.

A graph replays the kernels it captured on the buffers it captured, so everything a step
reads lives in buffers whose addresses never change: per bucket, one int64 and one int32
buffer of the step's inputs (token ids, positions, cache slots; the attention's per-token
sequences, positions and tiles), filled by a copy before each replay; the block tables, the
LoRA tile tables and shrink buffers, the rotary table and the weights are fixed already. The
pad tokens of a bucket are harmless by construction: token 0 at position 0, no adapter (in
no LoRA tile), its keys written into a scratch block no sequence owns, its attention tile
empty, its logits dropped.

What a graph captured is also keyed by what a step could change: the LoRA pools the step's
adapters live in and their tile buffers, and the stacks' generation (re-allocated pools). Steps
with a merged adapter, prompt chunks, or more tokens than the largest bucket run eagerly.

Capture itself (`capture`) is injected: torch.cuda.graph on a GPU; the tests replace it with
an eager replay on the same static buffers, which checks everything above but the capture.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from loraplex.server.engine.forward import StepBatch
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.paged_attention import DECODE_TILE_ROWS, PagedQueries, next_power_of_2
from loraplex.server.engine.paged_kv import PagedKVCache
from loraplex.server.engine.uploads import Uploader

if TYPE_CHECKING:
    from loraplex.server.engine.model_runner import DecodeWork, ModelRunner

log = logging.getLogger(__name__)

BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MAX_GRAPHS = 64  # captured graphs kept; past it the oldest go (their memory with them)

Replay = Callable[[], torch.Tensor]
Capture = Callable[[Callable[[], torch.Tensor]], Replay]


def cuda_capture(pool: Any) -> Capture:
    """Capture on CUDA into one shared memory pool (graphs replay one at a time)."""

    def capture(step: Callable[[], torch.Tensor]) -> Replay:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            out = step()

        def replay() -> torch.Tensor:
            graph.replay()
            return out

        return replay

    return capture


class _Bucket:
    """One bucket's static inputs and the step batch that reads them."""

    def __init__(self, size: int, runner: ModelRunner) -> None:
        device = runner.device
        self.size = size
        self.longs = torch.zeros(3 * size, dtype=torch.long, device=device)
        self.ints = torch.zeros(4 * size, dtype=torch.int32, device=device)
        ids, positions, slots = self.longs.split(size)
        seq_ids, positions32, starts, lengths = self.ints.split(size)
        group = runner.forward.group
        queries = PagedQueries(
            seq_ids,
            positions32,
            starts,
            lengths,
            max(1, DECODE_TILE_ROWS // next_power_of_2(group)),
        )
        cache = runner.cache
        assert isinstance(cache, PagedKVCache)
        self.batch = StepBatch(
            ids=ids,
            positions=positions,
            rows=positions,  # not read on this path
            cache_index=slots,
            n_decode=size,
            decode_lengths=positions,  # not read on this path
            max_decode_length=0,
            num_rows=0,
            chunks=[],
            logits_index=torch.arange(size, device=device),
            lora=(),
            block_tables=cache.tables(),
            paged=queries,
        )


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, capture: Capture, max_tokens: int) -> None:
        cache = runner.cache
        if not isinstance(cache, PagedKVCache) or runner.kernels != "triton":
            raise ValueError("decode graphs run the Triton kernels over the paged KV cache")
        if runner.forward.rope_table is None:
            raise ValueError("decode graphs need the model's rotary table")
        self.runner = runner
        self.capture = capture
        self.buckets = [b for b in BUCKETS if b < max_tokens] + [max_tokens]
        self.scratch = cache.scratch_slot  # where pad tokens write their keys and values
        self.uploads = runner.uploads or Uploader(runner.device)  # the inputs' one copy
        self._inputs: dict[int, _Bucket] = {}
        self._graphs: dict[tuple[object, ...], Replay] = {}
        self._failed: set[tuple[object, ...]] = set()  # keys whose capture failed: eager
        self.replays = 0  # steps served by a graph (for tests and logs)

    def run(self, decodes: Sequence[DecodeWork]) -> torch.Tensor | None:
        """The step's logits (n, V) from a graph, or None where the step runs eagerly."""
        runner = self.runner
        n = len(decodes)
        size = next((b for b in self.buckets if b >= n), None)
        if size is None or not n or runner.merged_slot is not None or runner.forward.merged:
            return None
        slots = [d.slot for d in decodes] + [NO_ADAPTER] * (size - n)
        lora, _ = runner.lora_plans(slots, [])  # the pools' tile tables: static, updated in place
        bucket = self._inputs.get(size)
        if bucket is None:
            bucket = self._inputs[size] = _Bucket(size, runner)
        self._fill(bucket, decodes)
        key = (
            size,
            runner.lora.generation,
            tuple((id(p.pool), id(p.plan.triton)) for p in lora),
        )
        if key in self._failed:
            return None
        replay = self._graphs.get(key)
        if replay is None:
            generation = runner.lora.generation  # older graphs read re-allocated pools: gone
            self._graphs = {k: g for k, g in self._graphs.items() if k[1] == generation}
            batch = dataclasses.replace(bucket.batch, lora=lora)
            forward = runner.forward
            forward(batch)  # once eagerly first: kernels compiled, buffers allocated
            try:
                replay = self.capture(lambda: forward(batch))
            except Exception:  # what cannot be captured runs eagerly, as it did
                log.warning("a decode step of %d tokens could not be captured; eager", size,
                            exc_info=True)  # fmt: skip
                self._failed.add(key)
                return None
            if len(self._graphs) >= MAX_GRAPHS:
                self._graphs.pop(next(iter(self._graphs)))
            self._graphs[key] = replay
            log.debug("decode graph captured: %d tokens, %d LoRA pools", size, len(lora))
        self.replays += 1
        return replay()[:n]

    def _fill(self, bucket: _Bucket, decodes: Sequence[DecodeWork]) -> None:
        """The step's inputs into the bucket's buffers (pads as the module says), in one
        upload per dtype; the cache takes the blocks the tokens need first."""
        runner, size, n = self.runner, bucket.size, len(decodes)
        cache = runner.cache
        assert isinstance(cache, PagedKVCache)
        rows = np.array([d.row for d in decodes], dtype=np.int64)
        positions = np.array([d.position for d in decodes], dtype=np.int64)
        cache.grow(rows.tolist(), (positions + 1).tolist())
        pad = size - n
        ids = np.array([d.token for d in decodes] + [0] * pad, dtype=np.int64)
        slots = np.concatenate([cache.host_index(rows, positions), [self.scratch] * pad])
        all_positions = np.concatenate([positions, np.zeros(pad, dtype=np.int64)])
        longs = np.concatenate([ids, all_positions, slots]).astype(np.int64)
        ints = np.concatenate(
            [
                np.concatenate([rows, np.zeros(pad, dtype=np.int64)]),
                all_positions,
                np.arange(size),  # one tile per token
                np.array([1] * n + [0] * pad),  # pads: empty tiles
            ]
        ).astype(np.int32)
        cache.tables()  # the block tables up to date (the same tensor)
        (long_view,) = self.uploads.put(torch.long, [longs])
        (int_view,) = self.uploads.put(torch.int32, [ints])
        bucket.longs.copy_(long_view)
        bucket.ints.copy_(int_view)
