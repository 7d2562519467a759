"""Mixed-adapter LoRA: the math, and where the adapters' weights live on the device.

For one linear layer with base weight W and the adapter in slot s:

    y = x @ W.T + (x @ A[s].T) @ B[s].T          A[s]: (r, in)   B[s]: (out, r)

with PEFT's alpha/r (or alpha/sqrt(r) for rsLoRA) folded into B[s] at load time. Slot -1 means
"no adapter" (the base model). Ranks may differ per slot: every slot's stacks are zero-padded to
the table's max rank, and zero rows/columns add nothing, so a batch of mixed ranks runs at the
largest rank present in it.

`lora_delta_reference` is the spec; the fast paths (lora_ops.py) are tested equal to it.
"""

from __future__ import annotations

import torch

NO_ADAPTER = -1


def lora_delta_reference(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: list[int],
    token_slots: torch.Tensor,
) -> torch.Tensor:
    """The spec: per-token LoRA delta, one token at a time, in the adapter weights' dtype.

    x: (N, in); lora_a: (S, R, in); lora_b: (S, out, R), scaled; ranks: S ints;
    token_slots: (N,) with -1 for base tokens. Returns (N, out) in lora_a's dtype.
    """
    out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=lora_a.dtype, device=x.device)
    for i, slot in enumerate(token_slots.tolist()):
        if slot == NO_ADAPTER or ranks[slot] == 0:
            continue
        r = ranks[slot]
        xi = x[i : i + 1].to(lora_a.dtype)
        out[i] = ((xi @ lora_a[slot, :r].T) @ lora_b[slot, :, :r].T)[0]
    return out


class LoraGroup:
    """The LoRA stacks of k linear layers that read the same input (q/k/v, or gate/up), so that
    one shrink serves all k of them:

        at:    (S, in, k, R)     A.T of every slot and member, columns beyond a slot's rank are
                                 0; transposed so that a slot's shrink is one (in, k*R) matrix
                                 with unit stride along it (the CPU bmm then runs ~1.5x faster
                                 than on A's transposed view)
        bt[j]: (S, R, out_j)     B.T of member j, scaled; stored transposed so that slicing the
                                 rank is a view of whole rows

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
    ) -> None:
        self.in_features = in_features
        self.out_features = out_features
        k = len(out_features)
        self.at = torch.zeros(num_slots, in_features, k, max_rank, dtype=dtype, device=device)
        self.bt = [
            torch.zeros(num_slots, max_rank, out, dtype=dtype, device=device)
            for out in out_features
        ]

    @property
    def rank_capacity(self) -> int:
        return self.at.shape[3]

    def a(self, slot: int, member: int) -> torch.Tensor:
        """A (R, in) of one slot and member, a view."""
        return self.at[slot, :, member].T

    def reshape(self, num_slots: int, rank: int) -> None:
        """Re-allocate the stacks for `num_slots` slots at rank capacity `rank`, keeping what
        the slots and ranks that remain hold."""
        s, r = min(num_slots, self.at.shape[0]), min(rank, self.rank_capacity)
        _, fan_in, k, _ = self.at.shape
        at = self.at.new_zeros(num_slots, fan_in, k, rank)
        at[:s, :, :, :r] = self.at[:s, :, :, :r]
        self.at = at
        for j, bt in enumerate(self.bt):
            kept = bt.new_zeros(num_slots, rank, bt.shape[2])
            kept[:s, :r] = bt[:s, :r]
            self.bt[j] = kept

    def set_slot(self, slot: int, member: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """Write one member's A (r, in) and scaled B (out, r) into `slot`."""
        r = a.shape[0]
        self.at[slot, :, member].zero_()
        self.bt[member][slot].zero_()
        self.at[slot, :, member, :r].copy_(a.T)
        self.bt[member][slot, :r].copy_(b.T)

    def clear_slot(self, slot: int) -> None:
        self.at[slot].zero_()
        for bt in self.bt:
            bt[slot].zero_()

    def reference_stacks(self, member: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(A (S, R, in), B (S, out, R)) of one member, in the layout `lora_delta_reference`
        takes."""
        return self.at[:, :, member].transpose(1, 2), self.bt[member].transpose(1, 2)


def slot_bytes(
    layout: list[dict[str, tuple[int, list[tuple[str, int]]]]], rank: int, dtype: torch.dtype
) -> int:
    """Device memory one slot takes in LoraStacks at `rank` (A and B of every group member)."""
    per_rank = sum(
        len(members) * in_features + sum(out for _, out in members)
        for groups in layout
        for in_features, members in groups.values()
    )
    return per_rank * rank * torch.empty((), dtype=dtype).element_size()


def rank_bucket(rank: int, max_rank: int) -> int:
    """The rank capacity that holds `rank`: the next power of two (so that adapters of close
    ranks share one allocation), at most max_rank; 0 for 0."""
    return 0 if rank <= 0 else min(max_rank, 1 << (rank - 1).bit_length())


class LoraStacks:
    """Every LoRA group of the model: groups[layer][group name], plus each slot's rank.

    `modules` maps a PEFT module name (e.g. "model.layers.3.self_attn.k_proj") to its
    (layer, group name, member) so an adapter's weights can be written where they belong.

    Storage follows the adapters actually loaded, not the limits: the stacks hold as many
    slots as the highest slot written so far needs (doubling, up to `max_slots`) at the rank
    bucket of the largest adapter loaded (not --max-lora-rank), and `fit` gives memory back
    when the adapters that needed it are gone.
    """

    def __init__(
        self,
        layout: list[dict[str, tuple[int, list[tuple[str, int]]]]],
        max_slots: int,
        max_rank: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        """layout[layer][group] = (in_features, [(module name, out_features), ...])."""
        self.max_slots = max_slots
        self.max_rank = max_rank
        self.dtype = dtype
        self.device = device
        self.num_slots = 0  # slots allocated (grows as higher slots are written)
        self.rank_capacity = 0  # the rank bucket allocated (grows with the largest rank loaded)
        self.generation = 0  # bumped at every re-allocation: what holds their addresses re-reads
        self.groups: list[dict[str, LoraGroup]] = []
        self.modules: dict[str, tuple[int, str, int]] = {}
        for layer, groups in enumerate(layout):
            built = {}
            for gname, (in_features, members) in groups.items():
                outs = [out for _, out in members]
                built[gname] = LoraGroup(in_features, outs, 0, 0, dtype, device)
                for member, (module, _) in enumerate(members):
                    self.modules[module] = (layer, gname, member)
            self.groups.append(built)
        self.ranks: list[int] = []

    def load(self, slot: int, modules: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Write an adapter ({module: (A (r, in), B (out, r) scaled)}) into `slot`; modules it
        does not target get zeros there."""
        rank = max((a.shape[0] for a, _ in modules.values()), default=0)
        if rank > self.max_rank:
            raise ValueError(f"rank {rank} exceeds the stacks' max rank {self.max_rank}")
        if not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot} is outside 0..{self.max_slots - 1}")
        if slot >= self.num_slots or rank > self.rank_capacity:
            slots = self.num_slots
            if slot >= slots:
                slots = min(self.max_slots, max(slot + 1, 2 * slots))
            self.fit(slots, max(self.rank_capacity, rank_bucket(rank, self.max_rank)))
        self.clear(slot)
        for module, (a, b) in modules.items():
            layer, gname, member = self.modules[module]
            self.groups[layer][gname].set_slot(
                slot, member, a.to(self.device, self.dtype), b.to(self.device, self.dtype)
            )
        self.ranks[slot] = rank

    def fit(self, num_slots: int, rank: int) -> None:
        """Re-allocate for `num_slots` slots at rank capacity `rank`: slots beyond are dropped,
        ranks beyond are cut (the caller keeps every adapter still wanted within both)."""
        if (num_slots, rank) == (self.num_slots, self.rank_capacity):
            return
        for groups in self.groups:
            for group in groups.values():
                group.reshape(num_slots, rank)
        self.ranks = (self.ranks + [0] * num_slots)[:num_slots]
        self.num_slots, self.rank_capacity = num_slots, rank
        self.generation += 1

    def nbytes(self) -> int:
        return sum(
            g.at.nbytes + sum(bt.nbytes for bt in g.bt) for gs in self.groups for g in gs.values()
        )

    def clear(self, slot: int) -> None:
        if slot >= self.num_slots:
            return  # never written
        for groups in self.groups:
            for group in groups.values():
                group.clear_slot(slot)
        self.ranks[slot] = 0
