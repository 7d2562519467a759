"""Mixed-adapter LoRA: the math, and where the adapters' weights live on the device.

For one linear layer with base weight W and the adapter in slot s:

    y = x @ W.T + (x @ A[s].T) @ B[s].T          A[s]: (r, in)   B[s]: (out, r)

with PEFT's alpha/r (or alpha/sqrt(r) for rsLoRA) folded into B[s] at load time. Slot -1 means
"no adapter" (the base model). Ranks may differ per slot: adapters live in pools by rank bucket
(LoraStacks), each slot zero-padded to its pool's rank capacity; zero rows/columns add nothing,
so the tokens of one pool run at the largest rank present among them.

`lora_delta_reference` is the spec; the fast paths (lora_ops.py) are tested equal to it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from loraplex.server.engine.cpu_kernels import DTYPES as NATIVE_DTYPES

if TYPE_CHECKING:
    from loraplex.server.engine.cpu_kernels import CpuKernels

NO_ADAPTER = -1


def lora_delta_reference(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: list[int],
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """The spec: per-token LoRA delta, one token at a time, in the wider of x's and the
    adapter weights' dtypes (`lora_math_dtype`).

    x: (N, in); lora_a: (S, R, in); lora_b: (S, out, R), scaled; ranks: S ints;
    token_slots: (N,) with -1 for base tokens. Returns (N, out) in that dtype.
    """
    math = lora_math_dtype(x.dtype, lora_a.dtype)
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=math, device=x.device)
    for i, slot in enumerate(token_slots.tolist()):
        if slot == NO_ADAPTER or ranks[slot] == 0:
            continue
        r = ranks[slot]
        xi = x[i : i + 1].to(math)
        out[i] = ((xi @ lora_a[slot, :r].T.to(math)) @ lora_b[slot, :, :r].T.to(math))[0]
    return out


def lora_math_dtype(rows: torch.dtype, weights: torch.dtype) -> torch.dtype:
    """The dtype LoRA computes in: the weights' own, or float32 where either side is float32
    (float32 LoRA on bf16 activations computes as PEFT does; bf16 weights on float32
    activations, `--lora-dtype auto` where the compute dtype is float32 on a CPU, are read as
    stored and widened, not the activations rounded down to them)."""
    return torch.float32 if torch.float32 in (rows, weights) else weights


CPU_BLOCK = 64  # columns of B.T to a block in a CPU stack (the native kernel's widest pass)


def stored_width(out_features: int, blocked: bool) -> int:
    """The columns one member's B.T takes in a stack: whole blocks of CPU_BLOCK in a blocked
    (CPU) stack, zeros past out_features."""
    return -(-out_features // CPU_BLOCK) * CPU_BLOCK if blocked else out_features


class LoraGroup:
    """The LoRA stacks of k linear layers that read the same input (q/k/v, or gate/up), so that
    one shrink serves all k of them:

        at: (S, in, k, R)     A.T of every slot and member, columns beyond a slot's rank are
                              0; transposed so that a slot's shrink is one (in, k*R) matrix
                              with unit stride along it (the CPU bmm then runs ~1.5x faster
                              than on A's transposed view)
        B.T of member j       (R, out_j) a slot, scaled; read with `bt(j, slots)`

    On a GPU B.T of member j is its own stack (S, R, out_j) (`blocks[j]`), so that slicing the
    rank is a view of whole rows. Blocked (the default on a CPU, where the native kernel reads
    the stacks), a slot's weights are one run of memory, read in the
    order the native kernel reads them: A.T, then each member's B.T in blocks of CPU_BLOCK
    columns, (out_j / CPU_BLOCK, R, CPU_BLOCK), each block whole; `at` and `blocks[j]` are
    views of `storage` (S, slot elements), one slot after another. A decode step reads every
    present adapter's weights once, and read as one stream they cost a quarter to a third less
    than as (S, R, out_j) rows (benchmarks/README.md, "The adapters' weights as one stream").

    One group per fused projection per decoder layer; a member an adapter does not target has
    zeros in its slot (it adds nothing).
    """

    def __init__(
        self,
        in_features: int,
        out_features: list[int],
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        blocked: bool | None = None,
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        self.device = torch.device(device)
        self.blocked = self.device.type == "cpu" if blocked is None else blocked
        self._allocate(num_slots, max_rank, dtype)

    def _allocate(self, num_slots: int, rank: int, dtype: torch.dtype) -> None:
        k, fan_in = len(self.out_features), self.in_features
        self.storage: torch.Tensor | None = None
        if not self.blocked:
            self.at = torch.zeros(num_slots, fan_in, k, rank, dtype=dtype, device=self.device)
            self.blocks = [
                torch.zeros(num_slots, rank, out, dtype=dtype, device=self.device)
                for out in self.out_features
            ]
            return
        widths = [stored_width(out, True) for out in self.out_features]
        size_a = fan_in * k * rank
        storage = self.storage = torch.zeros(
            num_slots, size_a + rank * sum(widths), dtype=dtype, device=self.device
        )
        self.at = storage[:, :size_a].view(num_slots, fan_in, k, rank)
        self.blocks = []
        start = size_a
        for width in widths:
            part = storage[:, start : start + rank * width]
            self.blocks.append(part.view(num_slots, width // CPU_BLOCK, rank, CPU_BLOCK))
            start += rank * width

    @property
    def rank_capacity(self) -> int:
        return self.at.shape[3]

    @property
    def slot_stride(self) -> int:
        """Elements from one slot's weights to the next's, in `at` and in every `blocks[j]`
        (a CPU stack's, for the native kernel)."""
        return self.at.stride(0)

    def a(self, slot: int, member: int) -> torch.Tensor:
        """A (R, in) of one slot and member, a view."""
        return self.at[slot, :, member].T

    def bt(self, member: int, slots: int | slice | torch.Tensor) -> torch.Tensor:
        """B.T (R, out_j) of one slot, or (U, R, out_j) of a range or an index of slots: a view
        on a GPU, a copy out of the blocks on a CPU."""
        stack = self.blocks[member]
        picked = stack.index_select(0, slots) if isinstance(slots, torch.Tensor) else stack[slots]
        if not self.blocked:
            return picked
        rows = picked.transpose(-3, -2).flatten(-2)  # (..., R, blocks * CPU_BLOCK), a copy
        return rows[..., : self.out_features[member]]

    def reshape(self, num_slots: int, rank: int) -> None:
        """Re-allocate the stacks for `num_slots` slots at rank capacity `rank`, keeping what
        the slots and ranks that remain hold."""
        s, r = min(num_slots, self.at.shape[0]), min(rank, self.rank_capacity)
        at, blocks = self.at, self.blocks
        self._allocate(num_slots, rank, at.dtype)
        self.at[:s, :, :, :r] = at[:s, :, :, :r]
        for kept, old in zip(self.blocks, blocks, strict=True):
            if self.blocked:
                kept[:s, :, :r] = old[:s, :, :r]
            else:
                kept[:s, :r] = old[:s, :r]

    def set_slot(self, slot: int, member: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write one member's A (r, in) and scaled B (out, r) into `slot`: all of the member's
        part of it, ranks past r zeroed, one copy per matrix (which converts the dtype too).
        (CpuKernels.lora_set_slot writes a blocked stack's the same, a whole adapter at once.)"""
        r, capacity = a.shape[0], self.rank_capacity
        at = self.at[slot, :, member]  # (in, R)
        at[:, :r].copy_(a.T)
        if r < capacity:
            at[:, r:].zero_()
        blocks = self.blocks[member][slot]  # (R, out), blocked: (out / CPU_BLOCK, R, CPU_BLOCK)
        if not self.blocked:
            blocks[:r].copy_(b.T)
            if r < capacity:
                blocks[r:].zero_()
            return
        pad = blocks.shape[0] * CPU_BLOCK - b.shape[0]
        if pad:  # the last block's columns past out_j are zero
            b = F.pad(b, (0, 0, 0, pad))
        blocks[:, :r].copy_(b.reshape(-1, CPU_BLOCK, r).transpose(1, 2))
        if r < capacity:
            blocks[:, r:].zero_()

    def clear_member(self, slot: int, member: int) -> None:
        self.at[slot, :, member].zero_()
        self.blocks[member][slot].zero_()

    def clear_slot(self, slot: int) -> None:
        self.at[slot].zero_()
        for blocks in self.blocks:
            blocks[slot].zero_()

    def move_slot(self, src: int, dst: int) -> None:
        """Copy slot `src`'s weights into `dst`."""
        self.at[dst].copy_(self.at[src])
        for blocks in self.blocks:
            blocks[dst].copy_(blocks[src])

    def nbytes(self) -> int:
        return self.at.nbytes + sum(blocks.nbytes for blocks in self.blocks)

    def reference_stacks(self, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (S, R, in), B (S, out, R)) of one member, in the layout `lora_delta_reference`
        takes."""
        return self.at[:, :, member].transpose(1, 2), self.bt(member, slice(None)).transpose(1, 2)


def slot_bytes(
    layout: list[dict[str, tuple[int, list[tuple[str, int]]]]],
    rank: int,
    dtype: torch.dtype,
    blocked: bool = False,
) -> int:
    """Device memory one slot takes in LoraStacks at `rank` (A and B of every group member,
    B.T's columns as a `blocked` stack stores them)."""
    per_rank = sum(
        len(members) * in_features + sum(stored_width(out, blocked) for _, out in members)
        for groups in layout
        for in_features, members in groups.values()
    )
    return per_rank * rank * torch.empty((), dtype=dtype).element_size()


MIN_POOL_RANK = 8  # the smallest rank bucket: fewer, larger pools (an r4 slot is stored at 8)


def rank_bucket(rank: int, max_rank: int) -> int:
    """The rank capacity of the pool that holds an adapter of `rank`: the next power of two, at
    least MIN_POOL_RANK and at most max_rank (so that adapters of close ranks share a pool);
    0 for 0."""
    if rank <= 0:
        return 0
    return min(max_rank, max(MIN_POOL_RANK, 1 << (rank - 1).bit_length()))


class LoraPool:
    """The stacks of every LoRA group of the model at one rank capacity: groups[layer][group
    name], with `num_slots` local slots (grown and shrunk by LoraStacks) and each local slot's
    rank. The LoRA kernels run on one pool at a time."""

    def __init__(
        self,
        layout: list[dict[str, tuple[int, list[tuple[str, int]]]]],
        rank: int,
        dtype: torch.dtype,
        device: torch.device,
        blocked: bool,
    ) -> None:
        self.rank_capacity = rank
        self.num_slots = 0
        self.groups: list[dict[str, LoraGroup]] = [
            {
                gname: LoraGroup(
                    in_features, [out for _, out in members], 0, rank, dtype, device, blocked
                )
                for gname, (in_features, members) in groups.items()
            }
            for groups in layout
        ]
        self.ranks: list[int] = []  # per local slot

    def resize(self, num_slots: int) -> None:
        """Re-allocate for `num_slots` local slots, keeping the ones below."""
        for groups in self.groups:
            for group in groups.values():
                group.reshape(num_slots, self.rank_capacity)
        self.ranks = (self.ranks + [0] * num_slots)[:num_slots]
        self.num_slots = num_slots

    def clear(self, local: int) -> None:
        for groups in self.groups:
            for group in groups.values():
                group.clear_slot(local)
        self.ranks[local] = 0

    def move(self, src: int, dst: int) -> None:
        """Copy local slot `src` into `dst` and clear `src` (compaction before a shrink)."""
        for groups in self.groups:
            for group in groups.values():
                group.move_slot(src, dst)
        self.ranks[dst] = self.ranks[src]
        self.clear(src)

    def nbytes(self) -> int:
        return sum(g.nbytes() for gs in self.groups for g in gs.values())


class LoraStacks:
    """Where every slot's adapter lives: pools by rank bucket, each holding its adapters at its
    own rank capacity, so an r8 adapter takes an eighth of an r64 one's memory and a step's
    LoRA runs each pool at the largest rank present in it (not every token at the largest rank
    of the step).

    Slots are the engine's (SlotTable); a slot's adapter sits in local slot `place[slot][1]` of
    the pool of its rank's bucket. `modules` maps a PEFT module name (e.g.
    "model.layers.3.self_attn.k_proj") to its (layer, group name, member) in every pool.

    Storage follows the adapters actually loaded, not the limits: a pool holds as many local
    slots as its adapters need (grown by a quarter at a time, so that it overshoots little),
    and `fit` gives memory back when the adapters that needed it are gone. `generation` is
    bumped at every re-allocation: what holds the pools' addresses (a captured step) re-reads
    them.
    """

    def __init__(
        self,
        layout: list[dict[str, tuple[int, list[tuple[str, int]]]]],
        max_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
        staged: bool | None = None,
        blocked: bool | None = None,
        native: CpuKernels | None = None,
    ) -> None:
        """layout[layer][group] = (in_features, [(module name, out_features), ...]).
        `staged` (default: on CUDA): an adapter's weights reach the device in one copy
        (`_staged`), on a side stream where there is one. `blocked` (default: on a CPU): the
        stacks in the native kernel's layout (LoraGroup), which `native` (the CPU kernels)
        then writes an adapter's weights into."""
        device = torch.device(device)
        self.blocked = device.type == "cpu" if blocked is None else blocked
        self.layout = layout
        self.staged = device.type == "cuda" if staged is None else staged
        self.native = native if self.blocked and dtype in NATIVE_DTYPES else None
        self._copies = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.generation = 0
        self.pools: dict[int, LoraPool] = {}  # by rank bucket
        self._empty: set[int] = set()  # buckets whose pool held no adapter at the last fit
        self.place: dict[int, tuple[int, int]] = {}  # slot -> (rank bucket, local slot)
        self.modules: dict[str, tuple[int, str, int]] = {
            module: (layer, gname, member)
            for layer, groups in enumerate(layout)
            for gname, (_, members) in groups.items()
            for member, (module, _) in enumerate(members)
        }

    def load(self, slot: int, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an adapter ({module: (A (r, in), B (out, r) scaled)}) into `slot`, in the pool
        of its rank; modules it does not target get zeros there."""
        rank = max((a.shape[0] for a, _ in modules.values()), default=0)
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the stacks' max rank {self.max_rank}")
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.max_slots - 1}")
        bucket = rank_bucket(rank, self.max_rank)
        if self.place.get(slot, (bucket,))[0] != bucket:
            self.clear(slot)  # it held an adapter of another pool
        if bucket == 0:
            self.clear(slot)
            return
        pool = self.pools.get(bucket)
        if pool is None:
            pool = self.pools[bucket] = LoraPool(
                self.layout, bucket, self.dtype, self.device, self.blocked
            )
        local = self.place.get(slot, (bucket, -1))[1]
        if local < 0:
            taken = {loc for b, loc in self.place.values() if b == bucket}
            local = next(i for i in range(len(taken) + 1) if i not in taken)
            if local >= pool.num_slots:
                grown = pool.num_slots + max(1, pool.num_slots // 4)
                pool.resize(min(self.max_slots, max(local + 1, grown)))
                self.generation += 1
            self.place[slot] = (bucket, local)
        stream = self._copies
        if stream is not None:  # after what the steps' stream queued (the slot's last use)
            stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            on_device = self._staged(modules) if self.staged else modules
            if self.native is not None and all(
                a.dtype in NATIVE_DTYPES and b.dtype == a.dtype for a, b in modules.values()
            ):
                members = []
                for module, (a, b) in modules.items():
                    layer, gname, member = self.modules[module]
                    members.append((pool.groups[layer][gname], local, member, a, b))
                self.native.lora_set_slot(members)  # one call (some 200 members)
            else:
                for module, (a, b) in on_device.items():
                    layer, gname, member = self.modules[module]
                    group = pool.groups[layer][gname]
                    group.set_slot(local, member, a.to(self.device), b.to(self.device))
            for module in self.modules.keys() - on_device.keys():  # what it does not target
                layer, gname, member = self.modules[module]
                pool.groups[layer][gname].clear_member(local, member)
        if stream is not None:  # the steps' stream waits for the copy, not the engine thread
            torch.cuda.current_stream(self.device).wait_stream(stream)
        pool.ranks[local] = rank

    def _staged(
        self, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """The adapter's A and B of every module on the device through one copy: packed
        into one host buffer in the stacks' dtype (pinned on CUDA, so the copy does not
        block), copied at once; views of it by module. (Unstaged, a 30-layer all-linear
        adapter takes 420 small synchronous copies.)"""
        parts = [t for a, b in modules.values() for t in (a, b)]
        sizes = [t.numel() for t in parts]
        pinned = self.device.type == "cuda"
        host = torch.empty(sum(sizes), dtype=self.dtype, pin_memory=pinned)
        if parts:
            torch.cat([t.reshape(-1).to(self.dtype) for t in parts], out=host)
        flat = host.to(self.device, non_blocking=pinned)
        views = [v.view(t.shape) for v, t in zip(flat.split(sizes), parts, strict=True)]
        return {m: (views[2 * i], views[2 * i + 1]) for i, m in enumerate(modules)}

    def clear(self, slot: int) -> None:
        """Forget `slot`'s adapter (its local slot is free; memory is given back by `fit`)."""
        placed = self.place.pop(slot, None)
        if placed is not None:
            bucket, local = placed
            self.pools[bucket].clear(local)

    @property
    def ranks(self) -> list[int]:
        """Each slot's adapter rank (0: none), from where it is placed."""
        ranks = [0] * self.max_slots
        for slot, (bucket, local) in self.place.items():
            ranks[slot] = self.pools[bucket].ranks[local]
        return ranks

    def shape(self, module: str) -> tuple[int, int]:
        """(in_features, out_features) of a target module (a PEFT module name)."""
        layer, gname, member = self.modules[module]
        in_features, members = self.layout[layer][gname]
        return in_features, members[member][1]

    def locate(self, slot: int) -> tuple[LoraPool, int] | None:
        """The pool and local slot holding `slot`'s adapter (None: nothing loaded there)."""
        placed = self.place.get(slot)
        return None if placed is None else (self.pools[placed[0]], placed[1])

    def fit(self, resident: Iterable[int]) -> None:
        """Give back memory no adapter in `resident` needs: slots not resident are cleared, and
        a pool whose adapters would fit in half its local slots is compacted and shrunk (only
        then, so that churn between adapters does not re-allocate at every load), to nothing
        when it held none at the last fit too (adapters of two ranks taking turns in a slot
        do not re-allocate their pools at every turn)."""
        keep = set(resident)
        for slot in [s for s in self.place if s not in keep]:
            self.clear(slot)
        empty: set[int] = set()
        for bucket, pool in list(self.pools.items()):
            mine = sorted((local, slot) for slot, (b, local) in self.place.items() if b == bucket)
            if not mine and bucket not in self._empty:
                empty.add(bucket)  # gone at the next fit if still empty then
                continue
            if len(mine) > pool.num_slots // 2:
                continue
            for target, (local, slot) in enumerate(mine):
                if local != target:
                    pool.move(local, target)
                    self.place[slot] = (bucket, target)
            if mine:
                pool.resize(len(mine))
            else:
                del self.pools[bucket]
            self.generation += 1
        self._empty = empty

    def nbytes(self) -> int:
        return sum(pool.nbytes() for pool in self.pools.values())

    def describe(self) -> str:
        return (
            ", ".join(
                f"{pool.num_slots} at rank {bucket}" for bucket, pool in sorted(self.pools.items())
            )
            or "none"
        )
