"""Attention over a padding-free batch, one example at a time.

DataCollatorWithFlattening puts a batch's examples back to back in one row of T tokens, kept
apart by position ids. transformers' sdpa path attends over that row as one sequence with a
(T, T) block-diagonal causal mask: work quadratic in the whole batch's tokens (8 examples of
~130 tokens cost ~8x what attending within each example does), and the explicit mask keeps
SDPA off its causal kernel. On a CPU that made attention a quarter of a training step, and
padding-free batches slower than padded ones.

With `return_flash_attn_kwargs` the collator also passes the examples' boundaries
(`cu_seq_lens_q`, `cu_seq_lens_k`: [0, end of example 1, ..., T]); here each example is then
attended on its own with `is_causal`: the same result as the block-diagonal mask, in
sum(L_i^2) work. Everything else (padded batches, generation with a cache) goes to
transformers' sdpa unchanged, with the mask sdpa would get.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

log = logging.getLogger(__name__)

NAME = "loraplex_flattened_sdpa"


def flattened_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,  # (batch, heads, q_len, head_dim)
    key: torch.Tensor,  # (batch, kv_heads, kv_len, head_dim)
    value: torch.Tensor,  # (batch, kv_heads, kv_len, head_dim)
    attention_mask: torch.Tensor | None,
    cu_seq_lens_q: torch.Tensor | None = None,  # (examples + 1,) int32, from the collator
    cu_seq_lens_k: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function; returns ((batch, q_len, heads, head_dim), None)."""
    if not _is_flattened(query, key, cu_seq_lens_q, cu_seq_lens_k, kwargs.get("sliding_window")):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    # The mask built for this row is causal within each example and nothing across them,
    # which is exactly what attending each example alone with is_causal computes.
    kwargs.pop("is_causal", None)
    bounds = cu_seq_lens_q.tolist()  # type: ignore[union-attr]
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, is_causal=True,
            **kwargs,
        )[0]
        for a, b in itertools.pairwise(bounds)
    ]  # fmt: skip
    return torch.cat(outputs, dim=1), None


def _is_flattened(
    query: torch.Tensor,
    key: torch.Tensor,
    cu_seq_lens_q: torch.Tensor | None,
    cu_seq_lens_k: torch.Tensor | None,
    sliding_window: int | None,
) -> bool:
    """One row of whole examples, no cache, and no sliding window shorter than an example."""
    if cu_seq_lens_q is None or cu_seq_lens_k is None or query.shape[0] != 1:
        return False
    if query.shape[2] != key.shape[2] or not torch.equal(cu_seq_lens_q, cu_seq_lens_k):
        return False
    if int(cu_seq_lens_q[-1]) != query.shape[2]:
        return False
    longest = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    return sliding_window is None or longest <= sliding_window


def use_flattened_attention(model: nn.Module) -> None:
    """Make `model` (a transformers model, before PEFT wraps it) attend with
    flattened_sdpa_attention. Batches must then carry the collator's flash-attention kwargs
    for the per-example path; without them it computes what sdpa does."""
    AttentionInterface.register(NAME, flattened_sdpa_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)  # type: ignore[operator]
    log.info("padding-free batches: attention within each example (%s)", NAME)
