"""Decode steps replayed from graphs (decode_graphs.py) on the Triton path over the paged cache:
here `capture` is an eager replay on the same static buffers (a CUDA graph needs a GPU: the
`gpu` test captures for real), which checks the buckets, the pads and the keys: the logits
equal the eager step's, for mixed adapters and batch sizes that are not a bucket."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from loraplex.adapters.validate import load_adapter
from loraplex.core.types import AdapterWeights, BaseModelSpec
from loraplex.server.engine.decode_graphs import DecodeGraphs
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.model_runner import DecodeWork, ModelRunner, PrefillWork
from tests.helpers import add_peft_adapter

pytest.importorskip("triton", reason="triton comes with the dev extra (Linux)")


class EagerCapture:
    """Stands in for torch.cuda.graph: the 'graph' runs the step again on the buffers it was
    captured with."""

    def __init__(self) -> None:
        self.captured = 0

    def __call__(self, step):
        self.captured += 1
        return step


def decode_logits(
    runner: ModelRunner, prompts: list[list[int]], slots: list[int], fewer: int
) -> list[torch.Tensor]:
    """Prefill the prompts, then six greedy decode steps: all of them, then the first
    `fewer`; each step's logits (copies)."""
    rows = [runner.cache.allocate(len(p) + 8) for p in prompts]
    work = [PrefillWork(r, s, p, 0, True) for r, s, p in zip(rows, slots, prompts, strict=True)]
    tokens = runner.step([], work).argmax(-1).tolist()
    out = []
    for n in range(6):
        live = range(len(rows)) if n < 3 else range(fewer)
        step = [DecodeWork(rows[i], slots[i], tokens[i], len(prompts[i]) + n) for i in live]
        logits = runner.step(step, [])
        out.append(logits.clone())
        tokens = logits.argmax(-1).tolist() + tokens[len(step) :]
    return out


def runner_with_adapters(load_tiny, tmp_path) -> ModelRunner:
    runner = ModelRunner(load_tiny(), num_slots=3, max_rank=16, kernels="triton", max_rows=8)
    spec = BaseModelSpec(runner.target_shapes, max_rank=16, fingerprint="tiny")
    for slot, name in enumerate(("first", "second")):
        runner.load_adapter(slot, load_adapter(tmp_path / name, spec))
    return runner


def test_replayed_decode_steps_equal_eager_ones(load_tiny, tmp_path):
    reference = load_tiny().model
    configs = {
        "first": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "second": LoraConfig(r=16, lora_alpha=3, target_modules="all-linear"),
    }
    for i, (name, config) in enumerate(configs.items()):
        reference = add_peft_adapter(reference, name, config, seed=i, b_std=0.5)
    reference.save_pretrained(tmp_path, selected_adapters=list(configs))
    runners = [runner_with_adapters(load_tiny, tmp_path) for _ in range(2)]
    capture = EagerCapture()
    runners[1].graphs = graphs = DecodeGraphs(runners[1], capture, max_tokens=8)
    assert graphs.buckets == [1, 2, 4, 8]
    prompts = [[5, 17, 300, 42, 7] * 4, [9, 8, 7], [100, 200, 300, 400], [3, 1, 4, 1, 5, 9]]
    slots = [0, 1, NO_ADAPTER, 1]
    # 4 tokens (a bucket), then 3
    outs = [decode_logits(runner, prompts, slots, fewer=3) for runner in runners]
    assert graphs.replays == 6 and capture.captured == 1  # 4 tokens, then 3 padded to 4
    for eager, replayed in zip(*outs, strict=True):
        assert replayed.shape == eager.shape
        torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    # the pads wrote only the scratch block: the sequences' caches are the same
    for layer in range(2):
        for row in range(len(prompts)):
            keys = [r.cache.gather(layer, row)[0] for r in runners]
            torch.testing.assert_close(keys[0], keys[1], rtol=1e-5, atol=1e-5)


def test_steps_a_graph_cannot_take_run_eagerly(load_tiny, tmp_path):
    reference = add_peft_adapter(
        load_tiny().model, "first", LoraConfig(r=4, target_modules=["q_proj"]), seed=0, b_std=0.5
    )
    reference = add_peft_adapter(
        reference, "second", LoraConfig(r=8, target_modules=["v_proj"]), seed=1, b_std=0.5
    )
    reference.save_pretrained(tmp_path, selected_adapters=["first", "second"])
    runner = runner_with_adapters(load_tiny, tmp_path)
    runner.graphs = graphs = DecodeGraphs(runner, EagerCapture(), max_tokens=2)
    rows = [runner.cache.allocate(20) for _ in range(3)]
    runner.step([], [PrefillWork(r, 0, [5, 6, 7], 0, True) for r in rows])
    assert graphs.run([DecodeWork(r, 0, 9, 3) for r in rows]) is None  # past the largest bucket
    runner.merge(1)
    assert graphs.run([DecodeWork(rows[0], 0, 9, 3)]) is None  # a merged adapter
    runner.unmerge()
    assert graphs.run([DecodeWork(rows[0], 0, 9, 3)]) is not None

    def refuse(step):
        raise RuntimeError("operation not permitted when stream is capturing")

    runner.graphs = graphs = DecodeGraphs(runner, refuse, max_tokens=2)
    step = [DecodeWork(rows[0], 0, 9, 4)]
    assert graphs.run(step) is None and graphs.run(step) is None  # eager, captured once
    assert runner.step(step, []).shape[0] == 1 and graphs.replays == 0
    with pytest.raises(ValueError, match="Triton kernels over the paged"):
        DecodeGraphs(ModelRunner(load_tiny(), num_slots=2, max_rank=8), EagerCapture(), 4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_replay_the_eager_steps_on_a_gpu(tiny_model_dir):
    """--cuda-graphs on a GPU, the NF4 tiny model in bf16: every decode step's logits from a
    captured graph equal the eager step's, batch sizes inside and at a bucket."""
    from loraplex.core.config import ModelConfig
    from loraplex.core.model import load_model

    config = ModelConfig(
        model=str(tiny_model_dir), quantization="nf4", dtype="bfloat16", device="cuda"
    )
    runners = [  # two in one process: the second may use up to 0.6 of the GPU in all
        ModelRunner(
            load_model(config),
            num_slots=2,
            max_rank=8,
            max_rows=8,
            dense_cache_bytes=0,
            gpu_memory_utilization=share,
            cuda_graphs=graphs,
        )
        for graphs, share in ((False, 0.3), (True, 0.6))
    ]
    assert runners[0].graphs is None and runners[1].graphs is not None
    gen = torch.Generator().manual_seed(0)
    shapes = runners[0].target_shapes
    adapter = AdapterWeights(
        {
            name: (torch.randn(8, d_in, generator=gen) * 0.1, torch.randn(d_out, 8, generator=gen))
            for name, (d_in, d_out) in shapes.items()
        },
        rank=8,
        lora_alpha=8.0,
        target_modules=tuple(sorted({name.rsplit(".", 1)[-1] for name in shapes})),
    )
    for runner in runners:
        runner.load_adapter(0, adapter)
    prompts = [[5, 17, 300, 42, 7] * 5, [9, 8, 7], [100, 200, 300, 400]]
    slots = [0, NO_ADAPTER, 0]  # an adapter beside the base: the LoRA tiles under capture
    outs = [decode_logits(runner, prompts, slots, fewer=2) for runner in runners]
    assert runners[1].graphs.replays == 6
    for eager, replayed in zip(*outs, strict=True):
        torch.testing.assert_close(replayed, eager, rtol=2e-2, atol=2e-2)
