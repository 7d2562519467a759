"""The model runner: owns the base model, the KV cache and the LoRA stacks, and turns one step's
work (decode tokens and prompt chunks of running sequences) into a forward pass.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from loraplex.core.machine import TuningCache, free_memory_bytes
from loraplex.core.model import LoadedModel, lora_target_shapes
from loraplex.core.types import AdapterWeights
from loraplex.server.config import EngineConfig
from loraplex.server.engine import cpu_kernels
from loraplex.server.engine.cpu_kernels import DTYPES
from loraplex.server.engine.decode_graphs import DecodeGraphs, cuda_capture
from loraplex.server.engine.forward import (
    DecoderForward,
    MergeInputs,
    PreparedMerge,
    PromptChunk,
    StepBatch,
    cache_shape,
    check_supported,
    fused_groups,
    lora_layout,
)
from loraplex.server.engine.kv_cache import KVCache
from loraplex.server.engine.linear import BaseLinears
from loraplex.server.engine.lora import (
    MIN_POOL_RANK,
    NO_ADAPTER,
    LoraPool,
    LoraStacks,
    slot_bytes,
)
from loraplex.server.engine.lora_ops import PoolPlan, Segment, plan_step
from loraplex.server.engine.paged_attention import PagedQueries
from loraplex.server.engine.paged_kv import KVStore, PagedKVCache, block_bytes, blocks_for_memory
from loraplex.server.engine.prefix_cache import BLOCK_TOKENS, PrefixCache
from loraplex.server.engine.triton_lora import LoraTiles, resolve_kernels
from loraplex.server.engine.uploads import Uploader

log = logging.getLogger(__name__)

SLOT_MEMORY_SHARE = 4  # --max-loras auto: slots fill at most 1/4 of the memory available
DENSE_MEMORY_SHARE = (2, 4)  # --dense-cache-mb default: 1/2 of free memory on a CPU, 1/4 on CUDA
MIN_AUTO_SLOTS = 2  # one for the traffic, one to load into (or hold a merge)


def resolve_kv_layout(choice: str, device: torch.device, kernels: str) -> str:
    """The KV cache `--kv-layout` asks for: auto is paged on CUDA (a row there is max_len
    tokens of real memory) and with the Triton kernels (whose attention reads blocks), rows
    on a CPU (the native kernels read rows; an unwritten row costs no memory there)."""
    if choice == "auto":
        return "paged" if device.type == "cuda" or kernels == "triton" else "rows"
    if choice not in ("rows", "paged"):
        raise ValueError(f"kv_layout must be auto, rows or paged, got {choice!r}")
    return choice


def profile_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Device memory `fn` needs at its peak beyond what was allocated before it (0 off
    CUDA: a CPU's KV cache is sized by --kv-cache-mb)."""
    if device.type != "cuda":
        fn()
        return 0
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    torch.cuda.empty_cache()  # what the step cached is free again for cudaMemGetInfo
    return int(peak)


def device_memory(device: torch.device) -> tuple[int, int]:
    """(free, total) bytes of a GPU (cudaMemGetInfo: other processes' use counts as used)."""
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)


@dataclass(frozen=True)
class DecodeWork:
    row: int
    slot: int
    token: int  # the last sampled token, fed now
    position: int


@dataclass(frozen=True)
class PrefillWork:
    row: int
    slot: int
    tokens: list[int]  # the chunk
    start: int  # position of its first token
    wants_logits: bool  # the chunk ends the prompt: sample the first new token from it
    all_logits: bool = False  # every position's logits (the prompt's log-probabilities)


def auto_lora_dtype(loaded: LoadedModel, widens: bool) -> torch.dtype:
    """`--lora-dtype auto`: the compute dtype, except on a CPU where `--dtype auto` measured
    float32 faster (no fast bf16 matmuls there) and the LoRA runs in loraplex's native kernel
    (`widens`), which reads bf16 weights into float32 sums: the adapters' weights are then
    kept in bf16, float32 math as before (`lora_math_dtype`), which halves the bytes a LoRA
    step reads and bounds it (bf16 rounding of the weights is far inside a 4-bit base's
    noise). An explicit `--dtype float32` keeps float32 weights too, as do the torch ops and
    the Triton kernels (which would convert the weights, or round the rows, at every step)."""
    on_cpu = loaded.device.type == "cpu"
    if on_cpu and widens and loaded.dtype == torch.float32 and loaded.dtype_measured:
        return torch.bfloat16
    return loaded.dtype


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        num_slots: int | None,
        max_rank: int,
        max_rows: int = 32,
        max_model_len: int = 4096,
        kv_cache_bytes: int = 1 << 30,
        lora_dtype: torch.dtype | None = None,
        base_kernel: str = "auto",
        dense_cache_bytes: int | None = None,
        tuning: TuningCache | None = None,
        compile: bool = True,
        kernels: str = "auto",
        prefix_cache_bytes: int = 0,
        kv_layout: str = "auto",
        gpu_memory_utilization: float = 0.9,
        max_prefill_tokens: int = 512,
        cuda_graphs: bool = False,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        check_supported(self.model)
        self.target_shapes = lora_target_shapes(self.model)
        model_len = int(getattr(self.model.config, "max_position_embeddings", max_model_len))
        self.max_context = min(model_len, max_model_len)
        shape = cache_shape(self.model, loaded.dtype)
        # The prefix cache's blocks come out of the KV budget, leaving the rows at least one
        # sequence of the whole context.
        prefix_bytes = max(
            0, min(prefix_cache_bytes, kv_cache_bytes - self.max_context * shape.bytes_per_token)
        )
        self.kernels = resolve_kernels(kernels, self.device)
        self.kv_layout = resolve_kv_layout(kv_layout, self.device, self.kernels)
        self.cache: KVStore
        if self.kv_layout == "paged":
            # on CUDA a pool for one sequence first: sized to the device after the model, the
            # adapters' memory and a profiling step (fit_paged_cache)
            on_cuda = self.device.type == "cuda"
            budget = (kv_cache_bytes - prefix_bytes) // block_bytes(shape)
            self.cache = PagedKVCache(
                shape,
                num_blocks=-(-self.max_context // BLOCK_TOKENS) if on_cuda else budget,
                max_seqs=max_rows,
                max_len=self.max_context,
                device=self.device,
            )
        else:
            self.cache = KVCache(
                shape,
                num_rows=max_rows,
                max_len=self.max_context,
                budget_bytes=kv_cache_bytes - prefix_bytes,
                device=self.device,
            )
        blocks = prefix_bytes // (shape.bytes_per_token * BLOCK_TOKENS)
        self.prefix: PrefixCache | None = None
        if blocks:
            self.prefix = PrefixCache(shape, blocks, self.device)
            log.info("prefix cache: %d blocks of %d tokens", blocks, BLOCK_TOKENS)
        layout = lora_layout(self.model)
        # the native kernels (built once per machine: BaseLinears gets the same library)
        native = None
        if self.device.type == "cpu" and loaded.dtype in DTYPES:
            native = cpu_kernels.load(tuning.build_dir if tuning is not None else None)
        widens = native is not None and self.kernels == "torch"
        lora_dtype = lora_dtype or auto_lora_dtype(loaded, widens)
        log.info("LoRA weights in %s", str(lora_dtype).removeprefix("torch."))
        # --max-loras auto: the slots share this budget at the rank the adapters loaded need.
        self.max_rows = max_rows
        self.slot_budget: int | None = None
        # The stacks in the native kernel's layout where it runs (the torch ops and the Triton
        # kernels read (S, R, out) rows).
        blocked = native is not None and self.kernels != "triton"
        self.rank_bytes = slot_bytes(layout, 1, lora_dtype, blocked)  # a slot at rank 1
        if num_slots is None:
            self.slot_budget = free_memory_bytes(self.device) // SLOT_MEMORY_SHARE
        self.lora = LoraStacks(
            layout,
            num_slots or max(max_rows, MIN_AUTO_SLOTS),
            max_rank,
            lora_dtype,
            self.device,
            blocked=blocked,
            native=native,
        )
        if dense_cache_bytes is None:  # half the free memory (a quarter of a GPU's)
            dense_cache_bytes = (
                free_memory_bytes(self.device) // DENSE_MEMORY_SHARE[self.device.type == "cuda"]
            )
        self.linears = BaseLinears(
            self.model,
            loaded.dtype,
            self.device,
            base_kernel,
            dense_cache_bytes,
            tuning,
            fuse=fused_groups(self.model),
        )
        # The native LoRA kernel takes stacks in bf16 or float32 (an explicit --lora-dtype
        # float16 keeps the torch paths), runs of one adapter up to lora_run_tokens long.
        native = self.linears.native if self.lora.dtype in DTYPES else None
        self._lora_native = native
        self._lora_run = native.lora_run_tokens(self.lora.dtype, loaded.dtype) if native else 0
        # The Triton LoRA's tile buffers, per pool and per plan (0: the step's, 1: taking a
        # merged adapter back out), grown to the largest step seen.
        self._tiles: dict[tuple[int, int], LoraTiles] = {}
        self.forward = DecoderForward(
            self.model,
            self.cache,
            self.lora,
            self.linears,
            # a captured step replays the native LoRA kernel's calls, not Triton's
            compile=compile and self.kernels == "torch",
        )
        log.info("base kernels: %s", self.linears.describe())
        log.info("LoRA kernels: %s (--kernels %s)", self.kernels, kernels)
        self.merged_slot: int | None = None  # the slot whose adapter is folded into the base
        # a GPU's step inputs in one asynchronous copy per dtype (None: made in place)
        self.uploads = Uploader(self.device) if self.device.type == "cuda" else None
        if self.kv_layout == "paged" and self.device.type == "cuda":
            self.fit_paged_cache(gpu_memory_utilization, max_prefill_tokens)
        # decode steps replayed as CUDA graphs (--cuda-graphs: the Triton path on CUDA)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs and self.device.type == "cuda" and self.kernels == "triton":
            pool = torch.cuda.graph_pool_handle()
            self.graphs = DecodeGraphs(self, cuda_capture(pool), max_rows)

    def fit_paged_cache(self, utilization: float, profile_tokens: int) -> int:
        """Size the paged cache's pools to the device, as vLLM's --gpu-memory-utilization
        does: the process may use `utilization` of the device's memory; the KV blocks get
        what the model, the adapter stacks and the prefix cache leave, less the peak of a
        profiling step (a prompt chunk of `profile_tokens` beside a token per row, every
        position's logits), the adapter slots --max-loras auto may still allocate and the
        dense budget merges may still fill. Returns the number of blocks. (Captured decode
        graphs, --cuda-graphs, take theirs from what is left.)"""
        cache = self.cache
        assert isinstance(cache, PagedKVCache)
        # the largest step: a prompt chunk beside a decode token per row, with every
        # position's logits (prompt log-probabilities)
        tokens = max(1, min(profile_tokens + self.max_rows, self.max_context))

        def largest_step() -> None:
            row = cache.allocate(tokens)
            try:
                self.step([], [PrefillWork(row, NO_ADAPTER, [0] * tokens, 0, True, True)])
            finally:
                cache.free(row)

        peak = profile_peak_bytes(largest_step, self.device)
        free, total = device_memory(self.device)
        per_block = block_bytes(cache.shape, cache.block_size)
        free += (cache.num_blocks + 1) * per_block  # the first pool, freed by the resize
        later = max(0, self.linears.merge_room())
        if self.slot_budget is not None:
            held = self.rank_bytes * sum(b * p.num_slots for b, p in self.lora.pools.items())
            later += max(0, self.slot_budget - held)
        blocks = blocks_for_memory(
            free_bytes=free,
            total_bytes=total,
            utilization=utilization,
            bytes_per_block=per_block,
            activation_bytes=peak + later,
        )
        blocks -= 1  # the pools hold a scratch block beside the allocator's (paged_kv.py)
        self.forward.release_cache()
        cache.resize(blocks)
        self.forward.rebind_cache()
        log.info(
            "KV cache sized for --gpu-memory-utilization %.2f: %d blocks; a profiling step of "
            "%d tokens peaked at %.1f MiB, %.1f MiB kept for adapters and merges",
            utilization,
            blocks,
            tokens,
            peak / 2**20,
            later / 2**20,
        )
        return blocks

    @classmethod
    def from_config(
        cls, loaded: LoadedModel, config: EngineConfig, tuning: TuningCache | None = None
    ) -> ModelRunner:
        lora_dtype = None if config.lora_dtype == "auto" else getattr(torch, config.lora_dtype)
        return cls(
            loaded,
            num_slots=config.max_loras,
            max_rank=config.max_lora_rank,
            max_rows=config.max_batch_size,
            max_model_len=config.max_model_len,
            kv_cache_bytes=config.kv_cache_bytes,
            lora_dtype=lora_dtype,
            base_kernel=config.base_kernel,
            dense_cache_bytes=config.dense_cache_bytes,
            tuning=tuning,
            compile=config.compile,
            kernels=config.kernels,
            kv_layout=config.kv_layout,
            gpu_memory_utilization=config.gpu_memory_utilization,
            max_prefill_tokens=config.max_prefill_tokens,
            cuda_graphs=config.cuda_graphs,
            prefix_cache_bytes=(
                (config.prefix_cache_bytes or config.kv_cache_bytes // 4)
                if config.prefix_cache
                else 0
            ),
        )

    def merge_pays(self, step_tokens: float) -> bool:
        """Whether merged layers (dense copies) run as fast as the base's at steps of this
        many tokens: not where the base reads its 4-bit codes faster than a copy."""
        return self.linears.copies_serve(max(1, round(step_tokens)))

    def load_adapter(self, slot: int, weights: AdapterWeights) -> None:
        """Write an adapter into `slot`; layers it does not target get rank 0 there."""
        self.lora.load(slot, weights.modules)

    def slot_limit(self) -> tuple[int, str]:
        """How many adapter slots there are now, and why: --max-loras as given, or (auto) the
        adapters loaded plus as many more as the rest of the slot budget (after the pools'
        allocations, each adapter at its own pool's rank) holds at the largest pool rank loaded
        (MIN_POOL_RANK before any), at most one per batch row (one step never uses more), at
        least MIN_AUTO_SLOTS."""
        lora = self.lora
        if self.slot_budget is None:
            return lora.max_slots, f"--max-loras {lora.max_slots}"
        buckets = [bucket for bucket, _ in lora.place.values()]
        used = self.rank_bytes * sum(b * pool.num_slots for b, pool in lora.pools.items())
        rank = max([MIN_POOL_RANK, *buckets])
        per_slot = self.rank_bytes * rank
        fit = len(buckets) + (self.slot_budget - used) // per_slot  # over budget: fewer
        slots = max(MIN_AUTO_SLOTS, min(self.max_rows, fit))
        bound = "one per batch row" if fit >= self.max_rows else f"1/{SLOT_MEMORY_SHARE} of memory"
        return slots, (
            f"auto: {bound}; {len(buckets)} loaded in {used / 2**20:.1f} MiB, "
            f"{per_slot / 2**20:.1f} MiB per slot more at rank {rank}"
        )

    def fit_lora(self, resident: Iterable[int]) -> None:
        """Give back adapter memory no resident adapter needs (LoraStacks.fit)."""
        generation = self.lora.generation
        self.lora.fit(resident)
        if self.lora.generation != generation:
            log.debug("adapter stacks: %s", self.lora.describe())

    def clear_slot(self, slot: int) -> None:
        self.lora.clear(slot)

    def merge(self, slot: int) -> int:
        """Fold the adapter in `slot` into the base, at once (the slot must stay loaded and
        unchanged while merged: the caller holds a reference to it). Returns the layers
        merged."""
        self.unmerge()
        layers = self.forward.merge(slot)
        self.merged_slot = slot
        return layers

    def merge_inputs(self, slot: int) -> MergeInputs:
        """What a merge needs of the adapter in `slot`, copied (the stacks may be compacted
        while a merge is prepared step by step)."""
        return self.forward.merge_inputs(slot)

    def check_merge(self, slot: int) -> None:
        """OverMemoryBudget where merging the adapter in `slot` would pass the dense budget
        (nothing else is checked; nothing changes)."""
        self.forward.check_merge(self.forward.merge_targets(slot))

    def merge_steps(self, inputs: MergeInputs) -> Generator[None, None, PreparedMerge]:
        """The merged layers, one unit per step, for the engine to run between its own
        (DecoderForward.merge_steps)."""
        return self.forward.merge_steps(inputs)

    def install_merge(self, slot: int, prepared: PreparedMerge) -> int:
        """Serve with `prepared`, the adapter in `slot` merged (engine thread, between steps).
        Returns the layers merged."""
        self.unmerge()
        layers = self.forward.install_merge(prepared)
        self.merged_slot = slot
        return layers

    def unmerge(self) -> None:
        self.forward.unmerge()
        self.merged_slot = None

    def lora_plans(
        self, decode_slots: list[int], segments: list[Segment]
    ) -> tuple[tuple[PoolPlan, ...], tuple[PoolPlan, ...]]:
        """The step's LoRA plan, and with a merged adapter M the plan that takes M's delta
        back out: M's tokens need nothing on top of the merged base, every other token
        (base requests included) needs its own delta minus M's. The engine puts M's decode
        tokens first, so the others are one run: M's delta comes out of them as one matmul
        pair per run (segments), with no gather."""
        stacks, m = self.lora, self.merged_slot
        native, run = self._lora_native, self._lora_run
        n = max([len(decode_slots), *(g.end for g in segments)])
        tiles = (
            [None, None] if self.kernels == "torch" else [self._tiles_for(0), self._tiles_for(1)]
        )
        if m is None:
            return plan_step(stacks, decode_slots, segments, native, n, tiles[0], run), ()
        own = [NO_ADAPTER if s == m else s for s in decode_slots]
        own_segments = [g._replace(slot=NO_ADAPTER) if g.slot == m else g for g in segments]
        lora = plan_step(stacks, own, own_segments, native, n, tiles[0], run)
        runs: list[Segment] = []
        for i, slot in enumerate(decode_slots):
            if slot == m:
                continue
            if runs and runs[-1].end == i:
                runs[-1] = runs[-1]._replace(end=i + 1)
            else:
                runs.append(Segment(slot=m, start=i, end=i + 1))
        runs += [g._replace(slot=m) for g in segments if g.slot != m]
        return lora, plan_step(stacks, [], runs, native, n, tiles[1], run)

    def _tiles_for(self, which: int) -> Callable[[LoraPool, int], LoraTiles]:
        """The tile buffer of a pool for `which` plan, holding at least `tokens` tokens."""

        def tiles(pool: LoraPool, tokens: int) -> LoraTiles:
            key = (id(pool), which)
            found = self._tiles.get(key)
            if found is None or found.max_tokens < tokens or found.max_slots < len(pool.ranks):
                size = max(tokens, self.max_rows, found.max_tokens if found else 0)
                found = LoraTiles(size, max(1, len(pool.ranks)), self.device)
                self._tiles[key] = found
            return found

        return tiles

    def step(self, decodes: list[DecodeWork], prefills: list[PrefillWork]) -> torch.Tensor:
        """One forward over every decode token and prompt chunk (written into the cache).
        Returns float32 logits (M, V): one row per decode, then per prefill one row for each of
        its tokens if it wants all logits, else one if it wants logits, in the order given."""
        if self.graphs is not None and not prefills:
            logits = self.graphs.run(decodes)
            if logits is not None:
                return logits
        ids: list[int] = [d.token for d in decodes]
        positions: list[int] = [d.position for d in decodes]
        rows: list[int] = [d.row for d in decodes]
        chunks: list[PromptChunk] = []
        segments: list[Segment] = []
        logits_index: list[int] = list(range(len(decodes)))
        for p in prefills:
            offset, n = len(ids), len(p.tokens)
            chunks.append(PromptChunk(row=p.row, start=p.start, offset=offset, length=n))
            segments.append(Segment(slot=p.slot, start=offset, end=offset + n))
            ids.extend(p.tokens)
            positions.extend(range(p.start, p.start + n))
            rows.extend([p.row] * n)
            if p.all_logits:
                logits_index.extend(range(offset, offset + n))
            elif p.wants_logits:
                logits_index.append(offset + n - 1)
        dev = self.device
        lora, unmerge = self.lora_plans([d.slot for d in decodes], segments)
        decode_lengths = [d.position + 1 for d in decodes]
        cache = self.cache
        tables, queries = None, None
        upload = self.uploads.put if self.uploads is not None else None
        if isinstance(cache, PagedKVCache):
            cache.grow(rows, [p + 1 for p in positions])  # blocks for the step's tokens
            tables = cache.tables()
            if self.kernels == "triton":
                queries = PagedQueries.build(rows, positions, self.forward.group, dev, upload)
        if upload is not None:  # one copy for every int64 input of the step
            rows_a, positions_a = np.asarray(rows, np.int64), np.asarray(positions, np.int64)
            index = cache.host_index(rows_a, positions_a)
            inputs = [ids, positions_a, rows_a, index, decode_lengths, logits_index]
            id_t, position_t, row_t, index_t, length_t, logits_t = upload(torch.long, inputs)
        else:  # a CPU's tensors are made in place: no copy to save
            id_t = torch.tensor(ids, dtype=torch.long, device=dev)
            row_t = torch.tensor(rows, dtype=torch.long, device=dev)
            position_t = torch.tensor(positions, dtype=torch.long, device=dev)
            index_t = cache.token_index(row_t, position_t)
            length_t = torch.tensor(decode_lengths, dtype=torch.long, device=dev)
            logits_t = torch.tensor(logits_index, dtype=torch.long, device=dev)
        batch = StepBatch(
            ids=id_t,
            positions=position_t,
            rows=row_t,
            cache_index=index_t,
            n_decode=len(decodes),
            decode_lengths=length_t,
            max_decode_length=max(decode_lengths, default=0),
            num_rows=self.cache.num_used_rows,
            chunks=chunks,
            logits_index=logits_t,
            lora=lora,
            unmerge=unmerge,
            rows_in_order=(
                len(decodes) == self.cache.num_used_rows
                and all(d.row == i for i, d in enumerate(decodes))
            ),
            block_tables=tables,
            paged=queries,
        )
        return self.forward(batch)

    def prefill(self, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
        """Whole prompts in one step, each in a fresh cache row freed afterwards; returns their
        last-position logits (B, V). For tests and tools; serving goes through `step`."""
        cache = self.cache
        work = []
        for prompt, slot in zip(prompts, slots, strict=True):
            row = cache.allocate(len(prompt))
            work.append(
                PrefillWork(
                    row=row,
                    slot=slot if slot is not None else NO_ADAPTER,
                    tokens=prompt,
                    start=0,
                    wants_logits=True,
                )
            )
        try:
            return self.step([], work)
        finally:
            for w in reversed(work):
                cache.free(w.row, len(w.tokens), 0)
