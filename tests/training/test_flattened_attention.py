"""Padding-free batches attend within each example: the same logits and gradients as the
examples run one by one, and sdpa's behaviour whenever the batch is not one flattened row."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, DataCollatorWithFlattening

from loraplex.training.flattened_attention import use_flattened_attention

LENGTHS = (5, 11, 3, 8)


def rows() -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(3, 200, (n,), generator=g).tolist()} for n in LENGTHS]


def test_each_example_attends_only_to_itself(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model.config.use_cache = False
    examples = rows()
    q_proj = model.model.layers[0].self_attn.q_proj.weight

    def loss(logits: torch.Tensor) -> torch.Tensor:  # (1, tokens, vocab)
        targets = torch.cat([torch.tensor(r["input_ids"]) for r in examples]).flip(0)
        return torch.nn.functional.cross_entropy(logits[0], targets, reduction="sum")

    alone = torch.cat(
        [model(input_ids=torch.tensor([r["input_ids"]])).logits for r in examples], dim=1
    )
    loss(alone).backward()
    want = q_proj.grad.clone()
    model.zero_grad()
    use_flattened_attention(model)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(examples)
    batch.pop("labels")
    flat = model(**batch).logits
    loss(flat).backward()
    torch.testing.assert_close(flat, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(q_proj.grad, want, rtol=1e-4, atol=1e-5)


def test_padded_batches_and_generation_compute_what_sdpa_does(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    want = model(input_ids=ids, attention_mask=mask).logits
    generated = model.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False)
    use_flattened_attention(model)
    torch.testing.assert_close(model(input_ids=ids, attention_mask=mask).logits, want)
    again = model.generate(input_ids=ids[:1], max_new_tokens=4, do_sample=False)
    assert torch.equal(again, generated)
