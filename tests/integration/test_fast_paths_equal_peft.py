"""The fast paths against stock PEFT on the embedded model's architecture in float32, not
quantized: without rounding in the way (bitsandbytes' CPU 4-bit kernels round to bf16 inside,
whatever the compute dtype), the engine's forward and its segment (prompt) and gather (decode)
LoRA paths must give PEFT's logits, step by step, for a mixed batch of three adapters and the
base. The served NF4/bf16 configuration is compared with PEFT in test_peft_equivalence.py."""

from __future__ import annotations

import pytest

from loraplex.adapters.validate import load_adapter
from loraplex.core.config import ModelConfig
from loraplex.core.model import load_model
from loraplex.core.types import BaseModelSpec
from loraplex.server.config import EngineConfig
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.model_runner import DecodeWork, ModelRunner, PrefillWork
from tests.helpers import ADAPTERS, add_peft_adapter, peft_logits
from tests.integration.test_peft_equivalence import PROMPTS, chat_ids

pytestmark = pytest.mark.integration

ATOL = 2e-3  # float32 logits (scale 10-30): what is left is summation order
STEPS = 4


@pytest.fixture(scope="module")
def float32_pair(model_home, tmp_path_factory):
    config = ModelConfig(home=model_home, dtype="float32", quantization="none")
    reference = load_model(config).model
    for name, (lora_config, seed) in ADAPTERS.items():
        reference = add_peft_adapter(reference, name, lora_config, seed=seed, b_std=0.03)
    reference.eval()
    out = tmp_path_factory.mktemp("fp32-adapters")
    reference.save_pretrained(out, selected_adapters=list(ADAPTERS))
    loaded = load_model(config)
    runner = ModelRunner.from_config(loaded, EngineConfig(max_loras=4, max_batch_size=8))
    spec = BaseModelSpec(runner.target_shapes, 64, loaded.fingerprint)
    for slot, name in enumerate(ADAPTERS):
        runner.load_adapter(slot, load_adapter(out / name, spec))
    return runner, reference, loaded.tokenizer


def test_prompt_and_decode_paths_equal_peft_in_float32(float32_pair):
    runner, reference, tokenizer = float32_pair
    adapters = [*ADAPTERS, None]
    slots = [*range(len(ADAPTERS)), NO_ADAPTER]
    seqs = [chat_ids(tokenizer, PROMPTS[i % len(PROMPTS)]) for i in range(len(adapters))]
    rows = [runner.cache.allocate(len(ids) + STEPS) for ids in seqs]
    try:
        # One step prefills all four prompts (the segment path), in two chunks each.
        half = [len(ids) // 2 for ids in seqs]
        runner.step(
            [],
            [
                PrefillWork(row=r, slot=s, tokens=ids[:h], start=0, wants_logits=False)
                for r, s, ids, h in zip(rows, slots, seqs, half, strict=True)
            ],
        )
        logits = runner.step(
            [],
            [
                PrefillWork(row=r, slot=s, tokens=ids[h:], start=h, wants_logits=True)
                for r, s, ids, h in zip(rows, slots, seqs, half, strict=True)
            ],
        )
        for step in range(STEPS + 1):
            for i, adapter in enumerate(adapters):
                want = peft_logits(reference, seqs[i], adapter)
                diff = (logits[i] - want).abs().max().item()
                assert diff <= ATOL, f"{adapter or 'base'} step {step}: off by {diff:.2e}"
            if step == STEPS:
                break
            # Teacher-forced decode of PEFT's greedy token: all four in one gather-path step.
            tokens = [
                int(peft_logits(reference, ids, a).argmax())
                for ids, a in zip(seqs, adapters, strict=True)
            ]
            work = [
                DecodeWork(row=r, slot=s, token=t, position=len(ids))
                for r, s, t, ids in zip(rows, slots, tokens, seqs, strict=True)
            ]
            logits = runner.step(work, [])
            seqs = [[*ids, t] for ids, t in zip(seqs, tokens, strict=True)]
    finally:
        for row in reversed(rows):
            runner.cache.free(row, 0, 0)
    for adapter in ADAPTERS:  # each adapter really changes the output
        assert (
            peft_logits(reference, seqs[0], adapter) - peft_logits(reference, seqs[0], None)
        ).abs().max() > 0.1
