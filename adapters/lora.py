"""Mixed-adapter LoRA: every token of a batch carries the device slot of its adapter.

For one linear layer with base weight W and the adapter in slot s:

    y = x @ W.T + (x @ A[s].T) @ B[s].T          A[s]: (r, in)   B[s]: (out, r)

with PEFT's alpha/r (or alpha/sqrt(r) for rsLoRA) folded into B[s] at load time. Slot -1 means
"no adapter" (the base model). Ranks may differ per slot; each slot's stacks are zero-padded to
the table's max rank and only its first `ranks[s]` rows/columns are used.

`lora_delta_reference` is the spec; faster paths must keep its signature and equal it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

NO_ADAPTER = -1


@dataclass
class LoraBatchContext:
    """The adapter layout of the batch being run, shared by every LoRA layer of the model.

    Set once per forward by the model runner, so grouping tokens by slot is done once per step
    rather than once per layer.
    """

    token_slots: torch.Tensor | None = None  # (N,) int64, slot of each flattened token
    # (slot, row indices) for every slot present in the batch (base tokens excluded).
    groups: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    def set_batch(self, token_slots: torch.Tensor) -> None:
        self.token_slots = token_slots
        self.groups = []
        for slot in torch.unique(token_slots).tolist():
            if slot != NO_ADAPTER:
                self.groups.append((slot, torch.nonzero(token_slots == slot).squeeze(1)))

    def clear(self) -> None:
        self.token_slots = None
        self.groups = []


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


def lora_delta_grouped(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    ranks: list[int],
    groups: list[tuple[int, torch.Tensor]],
) -> torch.Tensor | None:
    """Segment-grouped LoRA: one shrink/expand matmul pair per adapter present in the batch.

    Same math as `lora_delta_reference` (groups come from `LoraBatchContext.set_batch`);
    returns None when no token of the batch uses an adapter targeting this layer.
    """
    out: torch.Tensor | None = None
    for slot, rows in groups:
        r = ranks[slot]
        if r == 0:
            continue
        if out is None:
            out = torch.zeros(x.shape[0], lora_b.shape[1], dtype=lora_a.dtype, device=x.device)
        xs = x.index_select(0, rows).to(lora_a.dtype)  # (n_s, in)
        out.index_copy_(0, rows, (xs @ lora_a[slot, :r].T) @ lora_b[slot, :, :r].T)
    return out


class LoraLinear(nn.Module):
    """A base linear layer (any kind: nn.Linear, bnb Linear4bit) plus per-slot LoRA stacks.

    The model code never sees the difference: it calls the module as before.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        context: LoraBatchContext,
        num_slots: int,
        max_rank: int,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.in_features: int = base_layer.in_features
        self.out_features: int = base_layer.out_features
        device = _weight_device(base_layer)
        # Buffers, not parameters: they are served, never trained here.
        self.register_buffer(
            "lora_a", torch.zeros(num_slots, max_rank, self.in_features, dtype=dtype, device=device)
        )
        self.register_buffer(
            "lora_b",
            torch.zeros(num_slots, self.out_features, max_rank, dtype=dtype, device=device),
        )
        self.ranks: list[int] = [0] * num_slots

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None) -> None:
        """Write one adapter's (scaled) weights into a slot; None clears the slot."""
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is None or b is None:
            self.ranks[slot] = 0
            return
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a)
        self.lora_b[slot, :, :r].copy_(b)
        self.ranks[slot] = r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if not self.context.groups:
            return y
        delta = lora_delta_grouped(
            x.reshape(-1, self.in_features),
            self.lora_a,
            self.lora_b,
            self.ranks,
            self.context.groups,
        )
        if delta is None:
            return y
        # As PEFT does: LoRA runs in the adapter dtype, then is cast and added to the base output.
        return y + delta.to(y.dtype).view(y.shape)


def _weight_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def inject_lora_layers(
    model: nn.Module,
    target_names: list[str],
    context: LoraBatchContext,
    num_slots: int,
    max_rank: int,
    dtype: torch.dtype,
) -> dict[str, LoraLinear]:
    """Swap every named module for a LoraLinear wrapping it; returns {module name: layer}."""
    layers: dict[str, LoraLinear] = {}
    for name in target_names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        wrapped = LoraLinear(getattr(parent, child), context, num_slots, max_rank, dtype)
        setattr(parent, child, wrapped)
        layers[name] = wrapped
    return layers
