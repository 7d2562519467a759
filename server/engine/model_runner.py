"""The model runner: forward passes of the base model with per-token adapter slots.

It owns the (possibly 4-bit) HF model, whose target linears are wrapped in LoraLinear at
start-up, and writes adapter weights into slots. Prefill takes new sequences left-padded into
one forward; decode takes one token per running sequence.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from loraplex.adapters.lora import LoraBatchContext, LoraLinear, inject_lora_layers
from loraplex.adapters.validate import AdapterWeights
from loraplex.server.engine.kv_cache import BatchKV
from loraplex.server.model_loader import LoadedModel, lora_target_shapes


class ModelRunner:
    def __init__(
        self,
        loaded: LoadedModel,
        num_slots: int,
        max_rank: int,
        lora_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.loaded = loaded
        self.model = loaded.model
        self.device = loaded.device
        self.target_shapes = lora_target_shapes(self.model)
        self.context = LoraBatchContext()
        # float32 LoRA as PEFT computes it by default (its adapter weights stay float32).
        self.lora_layers: dict[str, LoraLinear] = inject_lora_layers(
            self.model, list(self.target_shapes), self.context, num_slots, max_rank, lora_dtype
        )
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))

    def load_adapter(self, slot: int, weights: AdapterWeights) -> None:
        """Write an adapter into `slot`; layers it does not target get rank 0 there."""
        for name, layer in self.lora_layers.items():
            pair = weights.modules.get(name)
            if pair is None:
                layer.set_slot(slot, None, None)
            else:
                layer.set_slot(slot, pair[0].to(self.device), pair[1].to(self.device))

    def clear_slot(self, slot: int) -> None:
        for layer in self.lora_layers.values():
            layer.set_slot(slot, None, None)

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], slots: list[int]) -> tuple[torch.Tensor, BatchKV]:
        """Run new sequences' prompts; returns last-position logits (B, V) and their cache."""
        t = max(len(p) for p in prompts)
        ids = torch.zeros(len(prompts), t, dtype=torch.long)
        mask = torch.zeros(len(prompts), t, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            ids[row, t - len(prompt) :] = torch.tensor(prompt)
            mask[row, t - len(prompt) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
        token_slots = torch.tensor(slots, device=self.device).repeat_interleave(t)  # (B*T,)
        cache = DynamicCache()
        logits = self._forward(ids, mask, positions, cache, token_slots)
        return logits, BatchKV(cache, mask)

    @torch.inference_mode()
    def decode(self, kv: BatchKV, tokens: list[int], slots: list[int]) -> torch.Tensor:
        """One token for every row of `kv` (extended in place); returns logits (B, V)."""
        ids = torch.tensor(tokens, device=self.device).unsqueeze(1)  # (B, 1)
        positions = kv.next_positions()
        kv.extend_mask()
        token_slots = torch.tensor(slots, device=self.device)  # (B,): one token per row
        return self._forward(ids, kv.attention_mask, positions, kv.cache, token_slots)

    def _forward(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor,
        positions: torch.Tensor,
        cache: DynamicCache,
        token_slots: torch.Tensor,
    ) -> torch.Tensor:
        self.context.set_batch(token_slots)
        try:
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
            )
        finally:
            self.context.clear()
        return out.logits[:, -1, :]
