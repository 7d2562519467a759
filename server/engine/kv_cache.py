"""The KV cache of the running batch: per layer keys/values (B, H_kv, T, D) left-padded to a
common length T, with an attention mask (B, T) marking real tokens.

Rows join (prefilled separately, then merged) and leave (selected out) between steps. Joining
re-pads: the cost is one copy of the cache per join, paid only on steps where requests join.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache


@dataclass
class BatchKV:
    cache: DynamicCache
    attention_mask: torch.Tensor  # (B, T) int64, 1 = real token, 0 = left padding

    @property
    def length(self) -> int:
        return int(self.attention_mask.shape[1])

    def next_positions(self) -> torch.Tensor:
        """(B, 1) position id of each row's next token: the count of its real tokens."""
        return self.attention_mask.sum(dim=1, keepdim=True)

    def extend_mask(self) -> None:
        """Mark one more real token per row (the one about to be decoded)."""
        ones = torch.ones_like(self.attention_mask[:, :1])
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)

    def select(self, rows: list[int]) -> BatchKV:
        """Keep only `rows`, and drop leading columns that became padding for every row."""
        index = torch.tensor(rows, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        first = int((mask.sum(dim=0) > 0).int().argmax()) if mask.numel() else 0
        layers = [
            (
                layer.keys.index_select(0, index)[:, :, first:],
                layer.values.index_select(0, index)[:, :, first:],
            )
            for layer in self.cache.layers
        ]
        return BatchKV(DynamicCache(ddp_cache_data=layers), mask[:, first:])

    @staticmethod
    def merge(a: BatchKV, b: BatchKV) -> BatchKV:
        """Rows of `a` then rows of `b`, left-padded to the longer length."""
        t = max(a.length, b.length)
        layers = []
        for la, lb in zip(a.cache.layers, b.cache.layers, strict=True):
            keys = torch.cat([_left_pad(la.keys, t), _left_pad(lb.keys, t)], dim=0)
            values = torch.cat([_left_pad(la.values, t), _left_pad(lb.values, t)], dim=0)
            layers.append((keys, values))
        mask = torch.cat(
            [F.pad(a.attention_mask, (t - a.length, 0)), F.pad(b.attention_mask, (t - b.length, 0))]
        )
        return BatchKV(DynamicCache(ddp_cache_data=layers), mask)


def _left_pad(x: torch.Tensor, length: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, H, length, D) with zeros in front."""
    return F.pad(x, (0, 0, length - x.shape[2], 0))
