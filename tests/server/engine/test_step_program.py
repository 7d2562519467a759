"""Captured decode steps (--compile) against the eager path they replay: the same logits bit
for bit, and every step a program cannot take left to the eager path."""

from __future__ import annotations

import pytest
import torch

from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.model_runner import DecodeWork, ModelRunner, PrefillWork

PROMPTS = [[5, 6, 7, 8], [9, 10], [11, 12, 13], [14, 15, 16, 17, 18]]


def _runner(load_tiny, dtype: str, compile: bool, family: str = "llama") -> ModelRunner:
    loaded = load_tiny(quantization="nf4", dtype=dtype, family=family)
    runner = ModelRunner(loaded, num_slots=3, max_rank=16, base_kernel="nf4", compile=compile)
    _load_adapters(runner)
    return runner


def _load_adapters(runner: ModelRunner) -> None:
    """Random adapters of ranks 4 and 16 in slots 0 and 1, so in two pools (the same ones
    every call)."""
    generator = torch.Generator().manual_seed(1)
    for slot, rank in ((0, 4), (1, 16)):
        weights = {}
        for name in runner.lora.modules:
            fan_in, fan_out = runner.lora.shape(name)
            a = torch.randn(rank, fan_in, generator=generator) * 0.3
            b = torch.randn(fan_out, rank, generator=generator) * 0.3
            weights[name] = (a, b)
        runner.lora.load(slot, weights)
    assert sorted(runner.lora.pools) == [8, 16]


def _generate(runner: ModelRunner, slots: list[int], steps: int) -> list[torch.Tensor]:
    """Prefill the prompts, then decode greedily: all of them for `steps` steps, then only the
    first for `steps` more (two step sizes). Returns every step's logits."""
    rows = [runner.cache.allocate(64) for _ in PROMPTS]
    logits = runner.step(
        [],
        [
            PrefillWork(row=r, slot=s, tokens=p, start=0, wants_logits=True)
            for r, s, p in zip(rows, slots, PROMPTS, strict=True)
        ],
    )
    out = [logits]
    tokens = logits.argmax(-1).tolist()
    positions = [len(p) for p in PROMPTS]
    for i in range(2 * steps):
        live = range(len(PROMPTS)) if i < steps else range(1)
        order = sorted(live, key=lambda j: slots[j])  # the engine orders decodes by adapter
        logits = runner.step(
            [
                DecodeWork(row=rows[j], slot=slots[j], token=tokens[j], position=positions[j])
                for j in order
            ],
            [],
        )
        out.append(logits)
        for row, j in enumerate(order):
            tokens[j] = int(logits[row].argmax())
            positions[j] += 1
    return out


@pytest.mark.cpu_isa
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("slots", [[NO_ADAPTER] * 4, [0, NO_ADAPTER, 1, 0], [1, 1, 1, 1]])
def test_captured_steps_equal_the_eager_path_bit_for_bit(load_tiny, dtype, slots):
    eager = _runner(load_tiny, dtype, compile=False)
    captured = _runner(load_tiny, dtype, compile=True)
    want = _generate(eager, slots, steps=3)
    got = _generate(captured, slots, steps=3)
    programs = captured.forward.programs
    assert programs.get(4) is not None and programs.get(1) is not None, programs
    assert not eager.forward.programs
    for step, (g, w) in enumerate(zip(got, want, strict=True)):
        assert torch.equal(g, w), f"step {step}: max |diff| {(g - w).abs().max():.3g}"


def test_steps_a_program_cannot_take_run_eagerly(load_tiny):
    """A prompt chunk, a merged adapter, a layer that does not run the native kernel: eager."""
    runner = _runner(load_tiny, "float32", compile=True)
    forward = runner.forward
    _generate(runner, [0, 1, 0, 1], steps=1)  # the prefill step is not captured
    assert set(forward.programs) == {1, 4}
    forward.programs.clear()
    runner.merge(0)
    _generate(runner, [0, 1, 0, 1], steps=1)
    assert not forward.programs, "a step with a merged adapter was captured"
    runner.unmerge()
    layer = next(iter(runner.linears.layers.values()))
    layer.set_choice(("lut",) * len(layer.choice))
    _generate(runner, [0, 1, 0, 1], steps=1)
    assert forward.programs == {4: None, 1: None}


def test_a_reallocated_lora_stack_is_captured_again(load_tiny):
    runner = _runner(load_tiny, "float32", compile=True)
    _generate(runner, [0, 0, 0, 0], steps=1)
    first = runner.forward.programs[1]
    assert first is not None
    generator = torch.Generator().manual_seed(2)
    weights = {
        name: (
            torch.randn(16, runner.lora.shape(name)[0], generator=generator) * 0.2,
            torch.randn(runner.lora.shape(name)[1], 16, generator=generator) * 0.2,
        )
        for name in runner.lora.modules
    }
    runner.lora.load(2, weights)  # rank 16: its pool grows to a second slot
    eager = _runner(load_tiny, "float32", compile=False)
    eager.lora.load(2, weights)
    got, want = _generate(runner, [2, 0, 1, 2], steps=2), _generate(eager, [2, 0, 1, 2], steps=2)
    assert runner.forward.programs[1] is not first
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)


def test_stacks_reallocated_back_to_the_same_size_are_captured_again(load_tiny):
    """Shrunk and grown back (eviction, then a load): the same slots and rank, new memory; the
    program must not replay into the old stacks."""
    runner = _runner(load_tiny, "float32", compile=True)
    eager = _runner(load_tiny, "float32", compile=False)
    _generate(runner, [0, 1, 0, 1], steps=1)
    first = runner.forward.programs[1]
    assert first is not None
    size = {bucket: pool.num_slots for bucket, pool in runner.lora.pools.items()}
    runner.lora.fit({0})  # slot 1 evicted: its pool goes (at the second fit that finds it empty)
    runner.lora.fit({0})
    assert set(runner.lora.pools) == {8}
    _load_adapters(runner)
    assert {bucket: pool.num_slots for bucket, pool in runner.lora.pools.items()} == size
    got, want = _generate(runner, [0, 1, 0, 1], steps=2), _generate(eager, [0, 1, 0, 1], steps=2)
    assert runner.forward.programs[1] is not first
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
