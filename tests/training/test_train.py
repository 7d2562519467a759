"""`loraplex train` on the tiny random Llama: the config and flags, a dry run, a QLoRA run that
writes an adapter the server's validation accepts, with its manifest, and a resume."""

from __future__ import annotations

import argparse
import json
import os
import signal

import pytest

from loraplex.adapters.validate import load_adapter
from loraplex.core.config import ModelConfig
from loraplex.core.model import load_model, lora_target_shapes
from loraplex.core.types import BaseModelSpec
from loraplex.training.config import TrainConfig, add_arguments, from_args
from loraplex.training.evaluate import Scorer
from loraplex.training.train import ADAPTER_DIR, MANIFEST, InterruptToCheckpoint, train


@pytest.fixture
def dataset(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"prompt": f"Ticket {i}: printer {i % 3} is down", "completion": f'{{"id": {i}}}'}
            for i in range(24)]  # fmt: skip
    rows.append(rows[0])  # an exact duplicate, dropped
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parse(argv: list[str]) -> TrainConfig:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return from_args(parser.parse_args(argv))


def test_flags_override_the_config_file(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("data: a.jsonl\nr: 8\nuse_rslora: true\nlearning_rate: 0.001\n")
    parsed = parse(["--config", str(config), "--r", "4", "--no-use-rslora"])
    assert (parsed.data, parsed.r, parsed.use_rslora, parsed.learning_rate) == (
        "a.jsonl", 4, False, 0.001
    )  # fmt: skip
    config.write_text("data: a.jsonl\nrank: 8\n")
    with pytest.raises(ValueError, match="unknown keys"):
        parse(["--config", str(config)])
    with pytest.raises(ValueError, match="no training data"):
        parse([])


def test_dry_run_shows_trained_tokens_and_trains_nothing(tiny_model_dir, dataset, tmp_path, capsys):
    config = TrainConfig(
        data=str(dataset), model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), dry_run=True
    )
    assert train(config) is None
    shown = capsys.readouterr().out
    assert "1 duplicates dropped" in shown and "⟦" in shown and '{"id"' in shown
    assert not (tmp_path / "out" / ADAPTER_DIR).exists()


def tiny_config(tiny_model_dir, dataset, out, **overrides) -> TrainConfig:
    values = dict(
        data=str(dataset),
        model=str(tiny_model_dir),
        output_dir=str(out),
        r=4,
        lora_alpha=8,
        batch_size=4,
        max_steps=6,
        eval_steps=3,
        save_steps=3,
        logging_steps=1,
        learning_rate=1e-3,
        gradient_checkpointing=False,
    )
    values.update(overrides)
    return TrainConfig(**values)


def test_qlora_run_writes_an_adapter_the_server_accepts(tiny_model_dir, dataset, tmp_path):
    adapter = train(tiny_config(tiny_model_dir, dataset, tmp_path / "out"))
    assert adapter is not None and (adapter / "adapter_model.safetensors").is_file()
    loaded = load_model(ModelConfig(model=str(tiny_model_dir), device="cpu"))
    spec = BaseModelSpec(lora_target_shapes(loaded.model), max_rank=8, fingerprint="tiny")
    weights = load_adapter(adapter, spec)  # the server's own validation
    assert weights.rank == 4 and len(weights.target_modules) == 7  # all-linear
    manifest = json.loads((adapter / MANIFEST).read_text())
    assert manifest["base_model_fingerprint"] == loaded.fingerprint
    assert len(manifest["data_sha256"]) == 64 and manifest["config"]["r"] == 4
    assert manifest["train_examples"] + manifest["eval_examples"] == 24
    losses = [e["loss"] for e in manifest["log_history"] if "loss" in e]
    assert len(losses) == 6 and "eval_loss" in manifest["metrics"]
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(manifest["versions"])
    # On a CPU the frozen 4-bit base computes in the dtype measured fastest here.
    assert manifest["frozen_base_dtype"] in ("bfloat16", "float32")
    assert "float32's" in manifest["frozen_base_dtype_reason"]
    metrics = manifest["metrics"]
    assert metrics["train_tokens"] > 0 and metrics["train_tokens_per_second"] > 0
    assert 0 <= metrics["base_score"] <= 1 and 0 <= metrics["adapter_score"] <= 1
    out = tmp_path / "out"
    report = json.loads((out / "report.json").read_text())
    assert report["generation_eval"]["examples"] == manifest["eval_examples"]
    assert "| adapter |" in (out / "report.md").read_text()
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ctrl_c_leaves_a_checkpoint_that_resumes_on_the_same_trajectory(
    tiny_model_dir, dataset, tmp_path, monkeypatch
):
    config = tiny_config(tiny_model_dir, dataset, tmp_path / "a", quantization="none")
    straight = train(config)
    assert straight is not None
    original = InterruptToCheckpoint.on_step_end

    def ctrl_c_at_step_2(self, args, state, control, **kwargs):
        if state.global_step == 2 and not self.interrupted:
            os.kill(os.getpid(), signal.SIGINT)  # the handler sets `interrupted`
        return original(self, args, state, control, **kwargs)

    monkeypatch.setattr(InterruptToCheckpoint, "on_step_end", ctrl_c_at_step_2)
    interrupted = tiny_config(tiny_model_dir, dataset, tmp_path / "b", quantization="none")
    assert train(interrupted) is None  # stopped, nothing written but the checkpoint
    assert (tmp_path / "b" / "checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.setattr(InterruptToCheckpoint, "on_step_end", original)
    resumed = train(TrainConfig(**{**interrupted.__dict__, "resume": "latest"}))
    assert resumed is not None

    def losses(adapter) -> list[float]:
        history = json.loads((adapter / MANIFEST).read_text())["log_history"]
        return [round(e["loss"], 5) for e in history if "loss" in e]

    assert losses(resumed) == losses(straight)


def test_scorers():
    exact, contains = Scorer("exact"), Scorer("contains")
    assert exact(" yes ", "yes") == 1 and exact("yes.", "yes") == 0
    assert contains("the answer is 42", "42") == 1 and contains("41", "42") == 0
    keyed = Scorer("json", ("team", "urgency"))
    want = '{"team": "billing", "urgency": "high"}'
    assert keyed('{"team": "billing", "urgency": "high", "x": 1}', want) == 1
    assert keyed('{"team": "billing", "urgency": "low"}', want) == 0
    assert keyed('{"team": "billing"}', want) == 0  # a required key missing
    assert keyed("not json", want) == 0
    assert Scorer("json", ("a",))('{"a": 1}', "free text") == 1  # valid with its keys
