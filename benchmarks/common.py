"""What the benchmarks share: the workload (chat prompts of a given length range) and random
all-linear LoRA adapters made with stock PEFT."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

SENTENCES = [
    "The ocean keeps a slow rhythm against the old harbour wall.",
    "A small robot sorts letters in the back room of the post office.",
    "Coffee tastes better when the morning is cold and quiet.",
    "The library smells of paper, dust and rain on the windows.",
    "Trains cross the valley twice an hour, always a little late.",
    "In winter the garden sleeps under a thin blanket of frost.",
    "Music drifts from an open window above the bakery.",
    "The mountains turn pink for a few minutes after sunset.",
    "A cat watches the street from the top of a parked car.",
    "Stars are easier to see far from the lights of the city.",
    "Fresh bread cools on the counter while the soup simmers.",
    "Time moves differently on long summer afternoons.",
]


def bench_prompts(
    tokenizer: object, n: int, min_tokens: int = 64, max_tokens: int = 128, seed: int = 0
) -> list[list[int]]:
    """n chat prompts (token ids, chat template applied) of min_tokens..max_tokens tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.randint(min_tokens, max_tokens)
        sentences = [
            f"Summarise the following notes in a short paragraph (request {rng.random():.6f})."
        ]
        ids: list[int] = []
        while True:
            sentences.append(rng.choice(SENTENCES))
            candidate = _chat_ids(tokenizer, " ".join(sentences))
            if len(candidate) > max_tokens:
                break
            ids = candidate
            if len(ids) >= target:
                break
        if len(ids) < min_tokens:
            raise ValueError(f"cannot build a prompt of {min_tokens}..{max_tokens} tokens")
        out.append(ids)
    return out


def _chat_ids(tokenizer: object, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(rendered, add_special_tokens=False).input_ids)  # type: ignore[operator]


def make_adapters(model: torch.nn.Module, k: int, rank: int, out: Path) -> PeftModel:
    """k random all-linear LoRA adapters `bench-0..k-1` made with PEFT on `model` (wrapped in
    place), saved under out/; returns the PeftModel holding all of them."""
    names = [f"bench-{i}" for i in range(k)]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(out, selected_adapters=names)
    peft_model.eval()
    return peft_model
