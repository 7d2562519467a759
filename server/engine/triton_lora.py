"""Mixed-adapter LoRA with the Triton kernels (triton_lora_kernels.py): the GPU path of
lora_ops.add_lora, equal to `lora.lora_delta_reference` (tests/server/engine/test_triton_lora.py).

A step's tokens are grouped by slot once per step and pool (LoraTiles.update), and every layer
and group then runs two launches over them: the shrink of all k members of the group, and the
expand into each member's output columns. The metadata sits in fixed-size device buffers whose
addresses never change, the kernels read the tiles' counts and ranks from them, and the grids
are sized by capacity: a CUDA graph captures the launches once and replays them for any batch
that fits.

Importing this module needs no triton (the dev and gpu extras bring it): the kernels are
imported at the first launch.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from types import ModuleType

import torch

from loraplex.server.engine.lora import NO_ADAPTER, LoraGroup

BLOCK_M = 16  # tokens per tile: tl.dot's smallest M; a decode step has few tokens per slot
BLOCK_R = 16  # ranks per block: tl.dot's smallest K (an r8 slot masks half of one)
BLOCK_K = 64  # input features per shrink iteration
BLOCK_N = 64  # output columns per expand program
MAX_MEMBERS = 3  # q/k/v: the largest fused group


class LoraTiles:
    """One step's tokens of one pool (LoraStacks), grouped by slot for the kernels, in device
    buffers of fixed size:

        table   (4 * capacity + max_tokens,) int32, uploaded once per step:
                  tiles (4, capacity)   rows: each tile's slot, start, end (positions in the
                                        order) and rank, as the kernels read them
                  order (max_tokens,)   the token index at each position: the tokens of one
                                        slot contiguous, slots ascending

    A tile is up to BLOCK_M tokens of one slot; tiles beyond the step's are empty (rank 0).
    The capacity, cdiv(max_tokens, BLOCK_M) + min(max_slots, max_tokens), holds any step: each
    slot present has at most one partial tile.
    """

    def __init__(
        self, max_tokens: int, max_slots: int, device: torch.device, block_m: int = BLOCK_M
    ) -> None:
        if max_tokens < 1 or max_slots < 1:
            raise ValueError("LoraTiles needs room for a token and a slot")
        self.max_tokens = max_tokens
        self.max_slots = max_slots
        self.block_m = block_m
        self.capacity = -(-max_tokens // block_m) + min(max_slots, max_tokens)
        size = 4 * self.capacity + max_tokens
        self.table = torch.zeros(size, dtype=torch.int32, device=device)
        on_gpu = self.table.device.type == "cuda"
        # Host copy of the table: pinned on a GPU, so that the step's one upload is
        # asynchronous; `_uploaded` says when the previous upload has read it.
        self._staging = torch.zeros(size, dtype=torch.int32, pin_memory=on_gpu)
        self._uploaded = torch.cuda.Event() if on_gpu else None
        self.num_tiles = 0  # tiles of the current step (host side, for logs and tests)
        # views made once (every launch reads them: no op per launch)
        self.tiles = self.table[: 4 * self.capacity].view(4, self.capacity)  # (4, capacity)
        self.order = self.table[4 * self.capacity :]  # (max_tokens,) the grouped order
        # the shrink's float32 output per width (k * C), reused by every layer and group of
        # that width: launches on one stream run in order, so the expand has read it before
        # the next shrink writes it
        self._shrunk: dict[int, torch.Tensor] = {}

    def shrunk(self, width: int, zero: bool) -> torch.Tensor:
        """The shrink's output buffer (max_tokens, width) float32; zeroed where `zero`."""
        y = self._shrunk.get(width)
        if y is None:
            y = torch.empty(self.max_tokens, width, dtype=torch.float32, device=self.table.device)
            self._shrunk[width] = y
        return y.zero_() if zero else y

    def update(self, token_slots: Sequence[int] | torch.Tensor, ranks: Sequence[int]) -> None:
        """Group the step's tokens: token_slots (N,) the pool's local slot of each token (-1: not
        this pool's, or the base model); ranks: each local slot's rank (0: nothing loaded).
        Tokens of base and rank-0 slots are left out."""
        slots = token_slots.tolist() if isinstance(token_slots, torch.Tensor) else token_slots
        if len(slots) > self.max_tokens:
            raise ValueError(f"{len(slots)} tokens exceed LoraTiles' {self.max_tokens}")
        if len(ranks) > self.max_slots:
            raise ValueError(f"{len(ranks)} slots exceed LoraTiles' {self.max_slots}")
        by_slot: dict[int, list[int]] = {}
        for token, slot in enumerate(slots):
            if slot != NO_ADAPTER and ranks[slot] > 0:
                by_slot.setdefault(slot, []).append(token)
        rows: list[list[int]] = [[], [], [], []]  # slot, start, end, rank
        order: list[int] = []
        for slot in sorted(by_slot):
            tokens, first = by_slot[slot], len(order)
            order += tokens
            for start in range(first, len(order), self.block_m):
                end = min(start + self.block_m, len(order))
                for row, value in zip(rows, (slot, start, end, ranks[slot]), strict=True):
                    row.append(value)
        self.num_tiles = len(rows[0])
        pad = [0] * (self.capacity - self.num_tiles)  # empty tiles: rank 0
        values = [v for row in rows for v in (*row, *pad)] + order
        values += [0] * (self.max_tokens - len(order))
        if self._uploaded is not None:
            self._uploaded.synchronize()  # the last step's upload has read the staging copy
        self._staging.copy_(torch.tensor(values, dtype=torch.int32))
        self.table.copy_(self._staging, non_blocking=True)
        if self._uploaded is not None:
            self._uploaded.record()


def resolve_kernels(choice: str, device: torch.device) -> str:
    """The LoRA kernels `--kernels` asks for: auto is triton on CUDA where triton is
    installed, else torch; triton without triton installed is an error."""
    installed = importlib.util.find_spec("triton") is not None
    if choice == "auto":
        return "triton" if device.type == "cuda" and installed else "torch"
    if choice == "triton" and not installed:
        raise ValueError("--kernels triton needs triton (pip install 'loraplex[gpu]')")
    if choice not in ("torch", "triton"):
        raise ValueError(f"kernels must be auto, torch or triton, got {choice!r}")
    return choice


@functools.cache
def _kernels() -> ModuleType:
    from loraplex.server.engine import triton_lora_kernels

    return triton_lora_kernels


def _dot_options(dtype: torch.dtype) -> dict[str, object]:
    """UPCAST only in the interpreter (its bf16 dot is wrong); float32 stacks in IEEE float32
    on a GPU (no TF32: the reference is exact float32)."""
    interpreted = _kernels().INTERPRETED
    return {
        "UPCAST": interpreted and dtype != torch.float32,
        "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
    }


def lora_shrink(
    x: torch.Tensor, at: torch.Tensor, tiles: LoraTiles, split_k: int = 1
) -> torch.Tensor:
    """Y (max_tokens, k*C) float32 (the tiles' buffer for that width: read it before the next
    shrink of that width), row p = grouped position: x (N, in) @ at[slot] (in, k*C)
    of each token's slot, up to the slot's rank (columns beyond it and rows of no tile are
    unset, or zero with split_k > 1). split_k > 1 cuts the input features in that many parts
    added atomically: more programs for a step of few tokens, in a nondeterministic order."""
    _, fan_in, k, cap = at.shape
    if x.shape[1] != fan_in or x.stride(1) != 1:
        raise ValueError(f"x {tuple(x.shape)} does not feed stacks of input width {fan_in}")
    y = tiles.shrunk(k * cap, zero=split_k > 1)
    grid = (tiles.capacity, k * -(-cap // BLOCK_R), split_k)
    _kernels().lora_shrink_kernel[grid](
        x, x.stride(0),
        at, *at.stride(),
        y, y.stride(0),
        tiles.tiles, tiles.order, tiles.capacity,
        fan_in, cap,
        BLOCK_M=tiles.block_m, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, SPLIT_K=split_k,
        **_dot_options(at.dtype),
    )  # fmt: skip
    return y


def lora_expand(
    outputs: list[torch.Tensor],
    y: torch.Tensor,
    bt: list[torch.Tensor],
    tiles: LoraTiles,
    scale: float = 1.0,
) -> None:
    """outputs[j] (N, out_j) += scale * Y[:, j*C : j*C+rank] @ bt[j][slot, :rank] (rank, out_j)
    of each token's slot, in place, every member in one launch. outputs may be column views of
    one fused output (q|k|v); scale -1 takes an adapter merged into the base back out."""
    k = len(bt)
    if not 1 <= k <= MAX_MEMBERS or len(outputs) != k:
        raise ValueError(f"{len(outputs)} outputs for {k} members (1..{MAX_MEMBERS})")
    cap = bt[0].shape[1]
    for out, b in zip(outputs, bt, strict=True):
        if out.shape[1] != b.shape[2] or out.stride(1) != 1 or not b.is_contiguous():
            raise ValueError(f"output {tuple(out.shape)} does not match B.T {tuple(b.shape)}")
    pad = MAX_MEMBERS - k  # absent members: the first's pointers, no columns
    bs, outs = [*bt, *[bt[0]] * pad], [*outputs, *[outputs[0]] * pad]
    widths = [b.shape[2] for b in bt] + [0] * pad
    grid = (tiles.capacity, sum(-(-n // BLOCK_N) for n in widths))
    _kernels().lora_expand_kernel[grid](
        y, y.stride(0),
        *bs,
        *outs,
        *(out.stride(0) for out in outs),
        *widths,
        tiles.tiles, tiles.order, tiles.capacity,
        cap, scale,
        BLOCK_M=tiles.block_m, BLOCK_N=BLOCK_N, BLOCK_R=BLOCK_R,
        **_dot_options(bt[0].dtype),
    )  # fmt: skip


def add_lora_triton(
    outputs: list[torch.Tensor],
    x: torch.Tensor,
    group: LoraGroup,
    tiles: LoraTiles,
    scale: float = 1.0,
    split_k: int = 1,
) -> None:
    """outputs[j] (N, out_j) += scale * LoRA delta of member j, in place, for the tokens
    `tiles` grouped (lora_ops.add_lora's semantics): two launches whatever the adapters."""
    assert not group.blocked, "the Triton kernels read unblocked stacks"
    y = lora_shrink(x, group.at, tiles, split_k)
    lora_expand(outputs, y, group.blocks, tiles, scale)


def lora_delta_triton(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: list[int],
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """`lora_delta_reference` through the kernels, the same arguments and result: x (N, in);
    lora_a (S, R, in); lora_b (S, out, R), scaled; token_slots (N,), -1 for base tokens.
    Returns (N, out) in lora_a's dtype."""
    tiles = LoraTiles(max(1, x.shape[0]), len(ranks), x.device)
    tiles.update(token_slots, ranks)
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=lora_a.dtype, device=x.device)
    at = lora_a.transpose(1, 2).unsqueeze(2)  # (S, in, 1, R), a view
    bt = lora_b.transpose(1, 2).contiguous()  # (S, R, out): the expand reads rows of B.T
    lora_expand([out], lora_shrink(x, at, tiles), [bt], tiles)
    return out
