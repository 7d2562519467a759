"""The LoRA math: the grouped path equals the per-token spec, and served adapters equal PEFT."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel

from loraplex.adapters.lora import (
    NO_ADAPTER,
    LoraBatchContext,
    LoraLinear,
    lora_delta_grouped,
    lora_delta_reference,
)
from loraplex.adapters.validate import BaseModelSpec, load_adapter
from loraplex.server.engine.model_runner import ModelRunner
from tests.conftest import TINY_FAMILIES
from tests.helpers import add_peft_adapter


@pytest.mark.parametrize(
    "token_slots",
    [
        [0, 0, 0, 0],
        [NO_ADAPTER] * 4,
        [2, NO_ADAPTER, 0, 2, 1, 1, NO_ADAPTER, 3],  # slot 3 has rank 0 for this layer
        [1],
    ],
)
def test_grouped_equals_reference(token_slots):
    torch.manual_seed(0)
    num_slots, max_rank, d_in, d_out = 4, 16, 24, 40
    ranks = [16, 4, 8, 0]  # mixed ranks, zero-padded to max_rank
    a = torch.zeros(num_slots, max_rank, d_in)
    b = torch.zeros(num_slots, d_out, max_rank)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, d_in)
        b[s, :, :r] = torch.randn(d_out, r)
    x = torch.randn(len(token_slots), d_in, dtype=torch.bfloat16)
    slots = torch.tensor(token_slots)
    ctx = LoraBatchContext()
    ctx.set_batch(slots)
    ref = lora_delta_reference(x, a, b, ranks, slots)
    fast = lora_delta_grouped(x, a, b, ranks, ctx.groups)
    if fast is None:
        assert torch.count_nonzero(ref) == 0
    else:
        torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    for i, s in enumerate(token_slots):  # base tokens and rank-0 slots get no delta
        if s == NO_ADAPTER or ranks[s] == 0:
            assert torch.count_nonzero(ref[i]) == 0


def test_lora_linear_adds_delta_only_for_its_tokens():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6, bias=False)
    ctx = LoraBatchContext()
    layer = LoraLinear(base, ctx, num_slots=2, max_rank=4, dtype=torch.float32)
    a, b = torch.randn(2, 8), torch.randn(6, 2)
    layer.set_slot(1, a, b)
    x = torch.randn(2, 3, 8)  # (batch, tokens, in)
    ctx.set_batch(torch.tensor([NO_ADAPTER] * 3 + [1] * 3))  # row 0 base, row 1 slot 1
    y = layer(x)
    torch.testing.assert_close(y[0], base(x[0]))
    torch.testing.assert_close(y[1], base(x[1]) + x[1] @ a.T @ b.T)
    layer.set_slot(1, None, None)
    assert layer.ranks[1] == 0
    torch.testing.assert_close(layer(x), base(x))


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_served_adapters_equal_peft_in_a_mixed_batch(load_tiny, tmp_path, family):
    """Two PEFT adapters (different ranks and targets) and the base, in one prefill batch, on
    each supported model family (Qwen2's q/k/v carry biases)."""
    loaded = load_tiny(family=family)
    reference = copy.deepcopy(loaded.model)
    configs = {
        "first": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "second": LoraConfig(r=8, lora_alpha=3, use_rslora=True, target_modules="all-linear"),
    }
    for i, (name, config) in enumerate(configs.items()):
        reference = add_peft_adapter(reference, name, config, seed=i, b_std=0.5)
    reference.save_pretrained(tmp_path, selected_adapters=list(configs))

    runner = ModelRunner(loaded, num_slots=3, max_rank=8)
    spec = BaseModelSpec(runner.target_shapes, max_rank=8, fingerprint="tiny")
    for slot, name in enumerate(configs):
        runner.load_adapter(slot, load_adapter(tmp_path / name, spec))
    prompts = [[5, 17, 300, 42, 7], [9, 8, 7], [100, 200, 300, 400]]
    slots = [0, 1, NO_ADAPTER]
    logits, _ = runner.prefill(prompts, slots)
    for prompt, slot, got in zip(prompts, slots, logits, strict=True):
        with torch.inference_mode():
            if slot == NO_ADAPTER:
                with reference.disable_adapter():
                    want = reference(torch.tensor([prompt])).logits[0, -1]
            else:
                reference.set_adapter(list(configs)[slot])
                want = reference(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.inference_mode(), reference.disable_adapter():
        base = reference(torch.tensor([prompts[0]])).logits[0, -1]
    assert (logits[0] - base).abs().max() > 1e-2  # the adapter really changed the output
    assert isinstance(reference, PeftModel)
