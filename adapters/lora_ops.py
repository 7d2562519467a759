"""Fast mixed-adapter LoRA for one step's flat token batch (N tokens, in = input width):

    tokens [0, n_decode)   one per decoding sequence: the BGMV-like gather path. Tokens are
                           grouped by slot into a padded (U, G, in) block, U = distinct adapters,
                           G = most tokens of one adapter; one bmm shrinks, one bmm per member
                           expands, and only the U adapters present are read.
    tokens [n_decode, N)   prompt chunks, contiguous per sequence: the SGMV-like segment path,
                           one matmul pair per (adapter, run of tokens).

`LoraPlan` is built once per step and shared by every layer; the rank used is the largest of the
slots present (smaller ranks are zero-padded, which adds nothing). Both paths equal
`lora.lora_delta_reference` (tests/unit/test_lora.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loraplex.adapters.lora import NO_ADAPTER, LoraGroup


@dataclass(frozen=True)
class DecodeLayout:
    """Where the adapter tokens of the decode part go in the padded (U, G) block."""

    slots: torch.Tensor  # (U,) distinct slots, ascending
    group_size: int  # G
    src: torch.Tensor  # (M,) decode-token index of every adapter token, grouped by slot
    dst: torch.Tensor | None  # (M,) flat index u * G + j in the block; None when M == U * G


@dataclass(frozen=True)
class LoraPlan:
    rank: int  # R: the largest rank of the slots present; 0 = nothing to add
    n_decode: int
    decode: DecodeLayout | None
    segments: list[tuple[int, int, int]]  # (slot, start, end) token ranges, prompt part

    @property
    def empty(self) -> bool:
        return self.rank == 0


def plan_lora(
    decode_slots: list[int],
    segments: list[tuple[int, int, int]],
    ranks: list[int],
    device: torch.device,
) -> LoraPlan:
    """decode_slots: the slot of each decode token (tokens 0..n_decode-1); segments: (slot,
    start, end) of each prompt chunk (start >= n_decode). Slots of rank 0 and base tokens are
    left out."""
    n_decode = len(decode_slots)
    live = {s for s in decode_slots if s != NO_ADAPTER and ranks[s] > 0}
    segs = [(s, a, b) for s, a, b in segments if s != NO_ADAPTER and ranks[s] > 0 and b > a]
    live.update(s for s, _, _ in segs)
    rank = max((ranks[s] for s in live), default=0)
    decode = None
    by_slot: dict[int, list[int]] = {}
    for i, s in enumerate(decode_slots):
        if s != NO_ADAPTER and ranks[s] > 0:
            by_slot.setdefault(s, []).append(i)
    if by_slot:
        order = sorted(by_slot)
        g = max(len(v) for v in by_slot.values())
        src = [i for s in order for i in by_slot[s]]
        dst = [u * g + j for u, s in enumerate(order) for j in range(len(by_slot[s]))]
        decode = DecodeLayout(
            slots=torch.tensor(order, dtype=torch.long, device=device),
            group_size=g,
            src=torch.tensor(src, dtype=torch.long, device=device),
            dst=None
            if len(dst) == len(order) * g
            else torch.tensor(dst, dtype=torch.long, device=device),
        )
    return LoraPlan(rank, n_decode, decode, _merge_runs(segs))


def _merge_runs(segments: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Join adjacent ranges of one slot, so each becomes one matmul pair."""
    out: list[tuple[int, int, int]] = []
    for s, a, b in sorted(segments, key=lambda t: t[1]):
        if out and out[-1][0] == s and out[-1][2] == a:
            out[-1] = (s, out[-1][1], b)
        else:
            out.append((s, a, b))
    return out


def add_lora(
    outputs: list[torch.Tensor], x: torch.Tensor, group: LoraGroup, plan: LoraPlan
) -> None:
    """outputs[j] (N, out_j) += LoRA delta of member j, in place. x: (N, in)."""
    if plan.empty:
        return
    if plan.decode is not None:
        _add_decode(outputs, x, group, plan.rank, plan.decode)
    for slot, start, end in plan.segments:
        _add_segment(outputs, x, group, plan.rank, slot, start, end)


def _add_decode(
    outputs: list[torch.Tensor], x: torch.Tensor, group: LoraGroup, r: int, lay: DecodeLayout
) -> None:
    u, g, k = lay.slots.numel(), lay.group_size, len(group.bt)
    dtype = group.a.dtype
    xs = x.index_select(0, lay.src).to(dtype)  # (M, in)
    if lay.dst is not None:  # pad each adapter's tokens to G rows
        padded = xs.new_zeros(u * g, x.shape[1])
        padded.index_copy_(0, lay.dst, xs)
        xs = padded
    a = group.a[:, :, :r].index_select(0, lay.slots).reshape(u, k * r, -1)  # (U, k*R, in)
    shrunk = torch.bmm(xs.view(u, g, -1), a.transpose(1, 2))  # (U, G, k*R)
    for j, out in enumerate(outputs):
        bt = group.bt[j][:, :r].index_select(0, lay.slots)  # (U, R, out_j)
        delta = torch.bmm(shrunk[:, :, j * r : (j + 1) * r], bt).view(u * g, -1)  # (U*G, out_j)
        if lay.dst is not None:
            delta = delta.index_select(0, lay.dst)
        out.index_add_(0, lay.src, delta.to(out.dtype))


def _add_segment(
    outputs: list[torch.Tensor],
    x: torch.Tensor,
    group: LoraGroup,
    r: int,
    slot: int,
    start: int,
    end: int,
) -> None:
    xs = x[start:end].to(group.a.dtype)  # (n, in)
    k = len(group.bt)
    shrunk = xs @ group.a[slot, :, :r].reshape(k * r, -1).T  # (n, k*R)
    for j, out in enumerate(outputs):
        delta = shrunk[:, j * r : (j + 1) * r] @ group.bt[j][slot, :r]  # (n, out_j)
        out[start:end] += delta.to(out.dtype)
