"""`loraplex train` data-parallel: the same entry point under torchrun, 2 CPU processes over gloo.

Launched with `python -m torch.distributed.run --standalone --nproc-per-node 2` (torchrun),
not `accelerate launch`: on CPU, `accelerate launch --cpu --num_processes 2` starts a single
process (its multi-CPU mode needs an MPI hostfile), and `--multi_gpu` on a CPU is a misnomer.
Trainer's accelerate state sees the torchrun environment and, on CPU, picks gloo.

The ranks run `loraplex.server.cli.main` through a small probe (written to tmp_path) that
wraps Trainer.train to record, on each rank, the process group (backend, world size, rank),
whether the model was wrapped in DistributedDataParallel, a digest of the trained LoRA weights
(equal on both ranks only if gradients were all-reduced) and what `train()` returned.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch.distributed

from loraplex.adapters.validate import load_adapter
from loraplex.core.config import ModelConfig
from loraplex.core.model import load_model, lora_target_shapes
from loraplex.core.types import BaseModelSpec
from loraplex.training.train import ADAPTER_DIR, CHECKPOINTS_DIR, MANIFEST

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
        reason="torch built without gloo",
    ),
]

WORLD = 2
BATCH = 4
EXAMPLES = 24  # eval_fraction 0.1 holds 2 out: 22 train, 3 steps an epoch on 2 ranks, 6 on 1

PROBE = textwrap.dedent(
    """
    import hashlib, json, os, sys

    import torch
    import torch.distributed as dist
    from transformers import Trainer

    import loraplex.training.train as training
    from loraplex.server.cli import main

    rank = int(os.environ["RANK"])
    record = {"rank": rank}
    plain_train = Trainer.train

    def train_and_record(self, *args, **kwargs):
        result = plain_train(self, *args, **kwargs)
        digest = hashlib.sha256()
        for name, p in sorted(self.model.named_parameters()):
            if p.requires_grad:
                digest.update(name.encode() + p.detach().cpu().numpy().tobytes())
        record.update(
            initialized=dist.is_initialized(),
            backend=dist.get_backend() if dist.is_initialized() else None,
            world_size=dist.get_world_size() if dist.is_initialized() else 1,
            dist_rank=dist.get_rank() if dist.is_initialized() else 0,
            args_world_size=self.args.world_size,
            ddp=isinstance(self.model_wrapped, torch.nn.parallel.DistributedDataParallel),
            cuda=torch.cuda.is_available(),
            global_step=self.state.global_step,
            lora_digest=digest.hexdigest(),
        )
        return result

    Trainer.train = train_and_record
    plain_run = training.train

    def run_and_record(config):
        adapter = plain_run(config)
        record["returned"] = None if adapter is None else str(adapter)
        return adapter

    training.train = run_and_record  # cli.train imports it when called
    code = main(sys.argv[1:])
    with open(os.path.join(os.environ["PROBE_DIR"], f"rank{rank}.json"), "w") as f:
        json.dump(record, f)
    sys.exit(code)
    """
)


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"Ticket {i}: printer {i % 3} is down", "completion": f'{{"id": {i}}}'}
            for i in range(EXAMPLES)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def launch_env(probe_dir) -> dict[str, str]:
    outer = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
             "MASTER_PORT"}  # fmt: skip
    env = {  # nothing inherited from an outer launcher
        k: v
        for k, v in os.environ.items()
        if k not in outer and not k.startswith(("TORCHELASTIC_", "ACCELERATE_"))
    }
    env.update(
        CUDA_VISIBLE_DEVICES="",  # CPU even on a GPU machine: gloo, fp32, adamw_torch
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        PROBE_DIR=str(probe_dir),
    )
    return env


def test_two_cpu_processes_train_one_adapter_over_gloo(tiny_model_dir, dataset, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "train.yaml"
    config.write_text(
        f"data: {dataset}\nmodel: {tiny_model_dir}\noutput_dir: {out}\n"
        f"quantization: nf4\nr: 4\nlora_alpha: 8\nbatch_size: {BATCH}\nepochs: 1\n"
        "eval_steps: 3\nsave_steps: 3\nlogging_steps: 1\nlearning_rate: 0.001\n"
        "gradient_checkpointing: false\nearly_stopping_patience: 0\neval_generate: 2\n"
    )  # a YAML file, not flags: torchrun's parser rejects `--r` as an ambiguous prefix.
    # early_stopping_patience 0: no best checkpoint reloaded at the end, which would make the
    # ranks' weights equal even without the all-reduce
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--standalone", f"--nproc-per-node={WORLD}",  # rendezvous on a free localhost port
        str(probe), "train", "--config", str(config),
    ]  # fmt: skip
    done = subprocess.run(
        command, env=launch_env(tmp_path), cwd=tmp_path, capture_output=True, text=True,
        timeout=180,  # about 20 s; a rank stuck in a collective fails here, not in 30 min
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    for r, record in enumerate(ranks):
        assert record["initialized"] and record["backend"] == "gloo", record
        assert (record["world_size"], record["args_world_size"], record["dist_rank"]) == (
            WORLD, WORLD, r
        )  # fmt: skip
        assert record["ddp"] and not record["cuda"]
    assert ranks[0]["lora_digest"] == ranks[1]["lora_digest"]  # gradients were all-reduced
    assert ranks[0]["returned"] == str(out / ADAPTER_DIR) and ranks[1]["returned"] is None

    adapter = out / ADAPTER_DIR
    manifest = json.loads((adapter / MANIFEST).read_text())
    train_examples = manifest["train_examples"]
    assert train_examples + manifest["eval_examples"] == EXAMPLES
    steps = math.ceil(train_examples / (BATCH * WORLD))  # half the 1-process steps
    assert steps < math.ceil(train_examples / BATCH)
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == steps
    logged = [e["step"] for e in manifest["log_history"] if "loss" in e]
    assert logged == list(range(1, steps + 1)) and "eval_loss" in manifest["metrics"]
    checkpoint = out / CHECKPOINTS_DIR / f"checkpoint-{steps}"
    assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {
        f"rng_state_{r}.pth" for r in range(WORLD)
    }  # the Trainer saved one RNG state per rank

    # rank 0 alone wrote the adapter, its manifest and the report; the rest are checkpoints
    assert sorted(out.rglob(MANIFEST)) == [adapter / MANIFEST]
    written = {p.parent for p in out.rglob("adapter_model.safetensors")}
    assert {p for p in written if CHECKPOINTS_DIR not in p.relative_to(out).parts} == {adapter}
    assert (out / "report.json").is_file() and (out / "report.md").is_file()

    loaded = load_model(ModelConfig(model=str(tiny_model_dir), device="cpu"))
    spec = BaseModelSpec(lora_target_shapes(loaded.model), max_rank=8, fingerprint="tiny")
    weights = load_adapter(adapter, spec)  # the server's own validation
    assert weights.rank == 4 and len(weights.target_modules) == 7  # all-linear
    assert manifest["base_model_fingerprint"] == loaded.fingerprint
    assert "nf4" in manifest["quantization"]  # QLoRA under DDP
