"""Fast mixed-adapter LoRA for one step's flat token batch (N tokens, in = input width):

    tokens [0, n_decode)   one per decoding sequence: the BGMV-like gather path. Tokens are
                           grouped by slot into a padded (U, G, in) block, U = distinct adapters,
                           G = most tokens of one adapter; one bmm shrinks, one bmm per member
                           expands, and only the U adapters present are read.
    tokens [n_decode, N)   prompt chunks, contiguous per sequence: the SGMV-like segment path,
                           one matmul pair per (adapter, run of tokens).

On a CPU with the native kernel (cpu_kernels.py), tokens whose adapter has at most
`run_tokens` of them in the step (decode tokens, prompt chunks up to CpuKernels.lora_run_tokens:
64 on bf16 rows, 256 with BF16 dot products, 512 on float32 rows) instead take one call
per group, whatever the adapters: it reads each adapter's weights once for its tokens and sums in
registers, where the paths above pay torch's per-op cost and a copy or two per adapter (a mixed
64-token decode: about 2x faster; one stream: about 4x). Longer runs of one adapter (prompts)
keep the matmuls, which oneDNN blocks better.

`LoraPlan` is built once per step for each pool of adapters (LoraStacks: pools by rank bucket)
that has tokens in it, over the pool's local slots, and shared by every layer; the rank used is
the largest of the pool's slots present (smaller ranks are zero-padded, which adds nothing).
Both paths equal `lora.lora_delta_reference` (tests/server/engine/test_lora.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from loraplex.server.engine.cpu_kernels import LORA_RUN_TOKENS, CpuKernels
from loraplex.server.engine.lora import (
    NO_ADAPTER,
    LoraGroup,
    LoraPool,
    LoraStacks,
    lora_math_dtype,
)
from loraplex.server.engine.triton_lora import LoraTiles, add_lora_triton


@dataclass(frozen=True)
class DecodeLayout:
    """Where the adapter tokens of the decode part go in the padded (U, G) block.

    Block u holds the tokens of slot slots[u] (or, for a range, of slot first + u). When the
    slots present span a short range, the block covers the whole range, so the stacks are read
    through a view of it instead of being gathered (copied) slot by slot; slots of the range
    with no token get zero rows.
    """

    slots: torch.Tensor | None  # (U,) the slots to gather; None when `first` is used
    first: int  # the range [first, first + U) when slots is None
    num_blocks: int  # U
    group_size: int  # G
    count: int  # M: decode tokens that carry an adapter
    src: torch.Tensor | None  # (M,) decode-token index of each adapter token; None: a range
    start: int  # with src None: the adapter tokens are decode tokens start..start+M-1
    dst: torch.Tensor | None  # (M,) flat index u * G + j in the block; None = 0..M-1


class Segment(NamedTuple):
    """A run of prompt tokens of one adapter: tokens [start, end) of the step use `slot`."""

    slot: int
    start: int
    end: int


@dataclass(frozen=True)
class NativeLora:
    """The native kernel's part of a step: the slot of every token it takes (-1: not its)."""

    library: CpuKernels
    slots: torch.Tensor  # (N,) int64


@dataclass(frozen=True)
class LoraPlan:
    rank: int  # R: the largest rank of the slots present; 0 = nothing to add
    decode: DecodeLayout | None
    segments: list[Segment]  # token ranges of the prompt part
    native: NativeLora | None = None  # the tokens the native kernel takes (the rest: above)
    triton: LoraTiles | None = None  # with the Triton kernels: every token, grouped by slot

    @property
    def empty(self) -> bool:
        return self.rank == 0


class PoolPlan(NamedTuple):
    """One pool's part of a step's LoRA: the plan of its tokens, over its local slots."""

    pool: LoraPool
    plan: LoraPlan


def plan_step(
    stacks: LoraStacks,
    decode_slots: list[int],
    segments: list[Segment],
    native: CpuKernels | None = None,
    num_tokens: int = 0,
    tiles: Callable[[LoraPool, int], LoraTiles] | None = None,
    run_tokens: int = LORA_RUN_TOKENS,
) -> tuple[PoolPlan, ...]:
    """The step's LoRA pool by pool (arguments as `plan_lora`'s, in the engine's slots): each
    pool plans the tokens of its adapters, by local slot; to it the others are base tokens.
    With `tiles` (the Triton kernels), `tiles(pool, tokens)` is the pool's tile buffer, which
    takes every token of the step grouped by slot."""
    place = stacks.place
    used = (*decode_slots, *(g.slot for g in segments))
    buckets = sorted({place[s][0] for s in used if s in place})
    plans = []
    for bucket in buckets:
        pool = stacks.pools[bucket]
        local = {s: loc for s, (b, loc) in place.items() if b == bucket}
        decode = [local.get(s, NO_ADAPTER) for s in decode_slots]
        segs = [g._replace(slot=local.get(g.slot, NO_ADAPTER)) for g in segments]
        if tiles is None:
            plan = plan_lora(
                decode, segs, pool.ranks, stacks.device, native, num_tokens, run_tokens
            )
        else:
            plan = _tiled(decode, segs, pool, num_tokens, tiles)
        if not plan.empty:
            plans.append(PoolPlan(pool, plan))
    return tuple(plans)


def _tiled(
    decode_slots: list[int],
    segments: list[Segment],
    pool: LoraPool,
    num_tokens: int,
    tiles: Callable[[LoraPool, int], LoraTiles],
) -> LoraPlan:
    """The plan of one pool's tokens for the Triton kernels: each token's local slot, grouped
    once into the pool's tile buffer for every layer of the step."""
    table = [NO_ADAPTER] * max([num_tokens, len(decode_slots), *(g.end for g in segments)])
    table[: len(decode_slots)] = decode_slots
    for g in segments:
        table[g.start : g.end] = [g.slot] * (g.end - g.start)
    ranks = pool.ranks
    rank = max((ranks[s] for s in table if s != NO_ADAPTER), default=0)
    if not rank:
        return LoraPlan(rank=0, decode=None, segments=[])
    buffer = tiles(pool, len(table))
    buffer.update(table, ranks)
    return LoraPlan(rank=rank, decode=None, segments=[], triton=buffer)


def plan_lora(
    decode_slots: list[int],
    segments: list[Segment],
    ranks: list[int],
    device: torch.device,
    native: CpuKernels | None = None,
    num_tokens: int = 0,
    run_tokens: int = LORA_RUN_TOKENS,
) -> LoraPlan:
    """decode_slots: the slot of each decode token (tokens 0..n_decode-1); segments: (slot,
    start, end) of each prompt chunk (start >= n_decode). Slots of rank 0 and base tokens are
    left out. Decode tokens ordered by slot need no reordering (the engine orders them by its
    slots; a pool's local slots may come in another order, which costs the gather an index).
    With `native` (given for stacks in bf16 or float32 only: its lora_add refuses others), the
    decode tokens (when no adapter has more than `run_tokens` of them) and prompt chunks of at
    most `run_tokens` go to the native kernel; `num_tokens` is the step's size."""
    live = {s for s in decode_slots if s != NO_ADAPTER and ranks[s] > 0}
    segs = [g for g in segments if g.slot != NO_ADAPTER and ranks[g.slot] > 0 and g.end > g.start]
    live.update(s for s, _, _ in segs)
    rank = max((ranks[s] for s in live), default=0)
    table: list[int] | None = None
    if native is not None and rank:
        table = [NO_ADAPTER] * max([num_tokens, len(decode_slots), *(g.end for g in segs)])
        counts: dict[int, int] = {}
        for s in decode_slots:
            if s in live:
                counts[s] = counts.get(s, 0) + 1
        if max(counts.values(), default=0) <= run_tokens:
            for i, s in enumerate(decode_slots):
                table[i] = s if s in live else NO_ADAPTER
            decode_slots = []
        long_segs = []
        for g in segs:
            if g.end - g.start <= run_tokens:
                table[g.start : g.end] = [g.slot] * (g.end - g.start)
            else:
                long_segs.append(g)
        segs = long_segs
        if all(s == NO_ADAPTER for s in table):
            table = None
    nat = None if table is None else NativeLora(native, torch.tensor(table, dtype=torch.long))
    decode = _decode_layout(decode_slots, ranks, device)
    if decode is not None and decode.num_blocks == 1 and decode.src is None and decode.dst is None:
        # One adapter's run of decode tokens (a lone stream, or one tenant's batch) is a
        # segment: plain matmuls, no block, no bmm (and joined with a prompt run after it).
        segs.append(Segment(decode.first, decode.start, decode.start + decode.count))
        decode = None
    return LoraPlan(rank=rank, decode=decode, segments=_join_runs(segs), native=nat)


def _decode_layout(
    decode_slots: list[int], ranks: list[int], device: torch.device
) -> DecodeLayout | None:
    by_slot: dict[int, list[int]] = {}
    for i, s in enumerate(decode_slots):
        if s != NO_ADAPTER and ranks[s] > 0:
            by_slot.setdefault(s, []).append(i)
    if not by_slot:
        return None
    present = sorted(by_slot)
    g = max(len(v) for v in by_slot.values())
    first, span = present[0], present[-1] - present[0] + 1
    as_range = span <= 2 * len(present)  # a view of at most twice the slots needed
    blocks = list(range(first, first + span)) if as_range else present
    src = [i for s in present for i in by_slot[s]]
    place = {s: u for u, s in enumerate(blocks)}
    dst = [place[s] * g + j for s in present for j in range(len(by_slot[s]))]

    def index(values: list[int], first: int = 0) -> torch.Tensor | None:
        if values == list(range(first, first + len(values))):
            return None
        return torch.tensor(values, dtype=torch.long, device=device)

    start = src[0]  # a run of consecutive tokens (e.g. after a merged adapter's) needs no index

    return DecodeLayout(
        slots=None if as_range else torch.tensor(present, dtype=torch.long, device=device),
        first=first,
        num_blocks=len(blocks),
        group_size=g,
        count=len(src),
        src=index(src, start),
        start=start,
        dst=(
            torch.tensor(dst, dtype=torch.long, device=device)
            if len(dst) < len(blocks) * g  # padded: some block rows stay empty
            else None
        ),
    )


def _join_runs(segments: list[Segment]) -> list[Segment]:
    """Join adjacent ranges of one slot, so each becomes one matmul pair."""
    out: list[Segment] = []
    for seg in sorted(segments, key=lambda g: g.start):
        if out and out[-1].slot == seg.slot and out[-1].end == seg.start:
            out[-1] = out[-1]._replace(end=seg.end)
        else:
            out.append(seg)
    return out


def add_step_lora(
    outputs: list[torch.Tensor],
    x: torch.Tensor,
    plans: tuple[PoolPlan, ...],
    layer: int,
    group: str,
    scale: float = 1.0,
) -> None:
    """outputs[j] += scale * the LoRA delta of member j of `group` in `layer`, every pool's."""
    for pool, plan in plans:
        add_lora(outputs, x, pool.groups[layer][group], plan, scale)


def add_lora(
    outputs: list[torch.Tensor],
    x: torch.Tensor,
    group: LoraGroup,
    plan: LoraPlan,
    scale: float = 1.0,
) -> None:
    """outputs[j] (N, out_j) += scale * LoRA delta of member j, in place. x: (N, in).
    (scale -1 takes an adapter merged into the base back out for the tokens of others.)"""
    if plan.empty:
        return
    if plan.triton is not None:
        add_lora_triton(outputs, x, group, plan.triton, scale)
        return
    if plan.native is not None:
        plan.native.library.lora_add(outputs, x, group, plan.rank, plan.native.slots, scale)
    if plan.decode is not None:
        _add_decode(outputs, x, group, plan.rank, plan.decode, scale)
    for slot, start, end in plan.segments:
        _add_segment(outputs, x, group, plan.rank, slot, start, end, scale)


def _add_decode(
    outputs: list[torch.Tensor],
    x: torch.Tensor,
    group: LoraGroup,
    r: int,
    lay: DecodeLayout,
    scale: float,
) -> None:
    u, g, cap = lay.num_blocks, lay.group_size, group.rank_capacity
    dtype = lora_math_dtype(x.dtype, group.at.dtype)
    first = lay.start
    xs = x.index_select(0, lay.src) if lay.src is not None else x[first : first + lay.count]
    xs = _as(xs, dtype)  # (M, in)
    if lay.dst is not None:  # pad each adapter's tokens to G rows
        padded = xs.new_zeros(u * g, x.shape[1])
        padded.index_copy_(0, lay.dst, xs)
        xs = padded
    # All k members at the full rank capacity C (a column slice of the rank would make the
    # bmm copy its operand); columns beyond a slot's rank are zeros.
    at = _as(_stack(group.at, lay).flatten(2), dtype)  # (U, in, k*C): a view for a range of slots
    shrunk = torch.bmm(xs.view(u, g, -1), at)  # (U, G, k*C)
    for j, out in enumerate(outputs):
        bt = _as(group.bt(j, _slots(lay))[:, :r], dtype)  # (U, R, out_j)
        s_j = shrunk[:, :, j * cap : j * cap + r]  # (U, G, R)
        if lay.src is None and lay.dst is None and out.dtype == dtype:
            # Tokens already in block order: accumulate in place, no temporary.
            out[first : first + u * g].view(u, g, -1).baddbmm_(s_j, bt, alpha=scale)
            continue
        delta = torch.bmm(s_j, bt).view(u * g, -1)  # (U*G, out_j)
        if scale != 1.0:
            delta = delta.mul_(scale)
        if lay.dst is not None:
            delta = delta.index_select(0, lay.dst)
        if lay.src is None:  # (a float32 delta on bf16 activations is rounded once, here)
            out[first : first + delta.shape[0]].add_(delta)
        else:
            out.index_add_(0, lay.src, delta.to(out.dtype))


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`: itself where it is (no op issued: this runs per group and layer, every
    step), else a converted copy (bf16 weights widened for float32 math)."""
    return t if t.dtype == dtype else t.to(dtype)


def _slots(lay: DecodeLayout) -> slice | torch.Tensor:
    """The slots of the block: a range, or an index."""
    return slice(lay.first, lay.first + lay.num_blocks) if lay.slots is None else lay.slots


def _stack(stack: torch.Tensor, lay: DecodeLayout) -> torch.Tensor:
    """The slots of the block: a view of a range, or a gather."""
    slots = _slots(lay)
    return stack.index_select(0, slots) if isinstance(slots, torch.Tensor) else stack[slots]


def _add_segment(
    outputs: list[torch.Tensor],
    x: torch.Tensor,
    group: LoraGroup,
    r: int,
    slot: int,
    start: int,
    end: int,
    scale: float,
) -> None:
    dtype = lora_math_dtype(x.dtype, group.at.dtype)
    xs = _as(x[start:end], dtype)  # (n, in)
    cap = group.rank_capacity
    shrunk = xs @ _as(group.at[slot].flatten(1), dtype)  # (n, k*C), as in _add_decode
    for j, out in enumerate(outputs):
        s_j = shrunk[:, j * cap : j * cap + r]  # (n, R)
        bt = _as(group.bt(j, slot)[:r], dtype)  # (R, out_j)
        if out.dtype == shrunk.dtype:
            out[start:end].addmm_(s_j, bt, alpha=scale)  # in place, no temporary
        else:  # float32 LoRA on bf16 activations: rounded once, as it is added
            out[start:end].add_(s_j @ bt, alpha=scale)
