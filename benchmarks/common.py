"""What the benchmarks share: the workload (chat prompts of a given length range) and random
all-linear LoRA adapters in stock PEFT's format."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

WEIGHTS = "adapter_model.safetensors"

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


def make_adapters(model: torch.nn.Module, k: int, rank: int, out: Path) -> list[Path]:
    """k random all-linear LoRA adapters `bench-0..k-1` in PEFT's format under out/ (PEFT lays
    out one, the others are written with the same names and fresh random weights: adding
    adapters to one PeftModel one by one is quadratic). Wraps `model` in place."""
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    template = out / "bench-0"
    get_peft_model(model, config, adapter_name="bench-0").save_pretrained(out)
    names = list(load_file(template / WEIGHTS).keys())
    shapes = {n: t.shape for n, t in load_file(template / WEIGHTS).items()}
    generator = torch.Generator().manual_seed(0)
    dirs = []
    for i in range(k):
        tensors = {}
        for name in names:
            shape = shapes[name]
            std = shape[1] ** -0.5 if "lora_A" in name else 0.02  # B random, not PEFT's zeros
            tensors[name] = torch.randn(shape, generator=generator) * std
        path = out / f"bench-{i}"
        path.mkdir(parents=True, exist_ok=True)
        if i:
            shutil.copy(template / "adapter_config.json", path / "adapter_config.json")
        save_file(tensors, path / WEIGHTS)
        dirs.append(path)
    return dirs


def load_into_peft(model: torch.nn.Module, dirs: list[Path]) -> PeftModel:
    """Stock PEFT holding every adapter of `dirs` (named by directory), for the baselines."""
    peft_model = PeftModel.from_pretrained(model, dirs[0], adapter_name=dirs[0].name)
    for path in dirs[1:]:
        peft_model.load_adapter(path, adapter_name=path.name)
    peft_model.eval()
    return peft_model
