"""What `loraplex train` does, as one dataclass: read from a YAML file, every key also a flag
(`--config train.yaml --r 32` takes r from the flag). The defaults are those of a good QLoRA
run: NF4 with double quantization, all linear layers, rank 16, bf16 compute on a GPU (fp32 on
a CPU), gradient checkpointing, paged AdamW on CUDA, padding-free batches."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from loraplex.core.options import add_options, given


@dataclass(frozen=True)
class TrainConfig:
    data: str = ""
    """Training data: JSONL in alpaca, chat (messages) or prompt/completion form."""
    output_dir: str = "adapter-out"
    """Where the adapter (output_dir/adapter), checkpoints and the report go."""
    eval_data: str = ""
    """Held-out JSONL; empty = split eval_fraction off the training data."""
    eval_fraction: float = 0.1
    model: str = ""
    """Base model (HF id or directory); empty = the embedded SmolLM2 the server serves."""
    home: str = "~/.cache/loraplex"
    quantization: Literal["nf4", "none"] = "nf4"
    """nf4 = QLoRA (4-bit NF4 base, double quantization); none = LoRA on the compute dtype."""
    max_length: int = 1024
    """Tokens per example; longer ones are truncated (and counted in the length report)."""
    r: int = 16
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    use_rslora: bool = False
    target_modules: str = "all-linear"
    """all-linear, or a comma-separated list (q_proj,v_proj)."""
    epochs: float = 3.0
    max_steps: int = -1
    """Stop after this many optimizer steps (-1: run the epochs)."""
    batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    """Linear warmup over this share of the steps."""
    weight_decay: float = 0.0
    gradient_checkpointing: bool = True
    packing: bool = True
    """Padding-free batches: examples concatenated, attention kept apart by position ids."""
    eval_steps: int = 50
    save_steps: int = 50
    logging_steps: int = 10
    early_stopping_patience: int = 3
    """Stop when eval loss has not improved for this many evaluations (0 = never)."""
    eval_metric: Literal["exact", "contains", "json"] = "exact"
    """How held-out answers are scored against the reference (see training/evaluate.py)."""
    eval_json_keys: str = ""
    """With eval_metric json: keys the answer must hold (comma-separated)."""
    eval_generate: int = 64
    """Held-out examples the base and the adapter both answer and are scored on (0 = none)."""
    eval_max_new_tokens: int = 128
    seed: int = 0
    resume: str = ""
    """A checkpoint directory, or "latest" (the newest under output_dir/checkpoints)."""
    dry_run: bool = False
    """Print decoded samples with the trained tokens marked, and the length report; no training."""
    register: str = ""
    """A running server's address: push the adapter to it when training ends."""
    adapter_id: str = ""
    """The id to register it under (default: output_dir's name)."""

    def __post_init__(self) -> None:
        positive = ("max_length", "r", "batch_size", "gradient_accumulation_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_steps", "save_steps", "logging_steps", "eval_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.quantization not in ("nf4", "none"):
            raise ValueError(f"quantization must be nf4 or none, got {self.quantization!r}")

    @property
    def targets(self) -> str | list[str]:
        if self.target_modules == "all-linear":
            return "all-linear"
        return [t.strip() for t in self.target_modules.split(",") if t.strip()]

    @property
    def out(self) -> Path:
        return Path(self.output_dir).expanduser()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` and one flag per field (unset flags leave the file's value)."""
    parser.add_argument("--config", metavar="YAML", help="a YAML file of the keys below")
    add_options(parser, TrainConfig, overrides_only=True)


def from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = {}
    if args.config:
        loaded = yaml.safe_load(Path(args.config).read_text(encoding="utf-8")) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{args.config}: expected a mapping of keys to values")
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(loaded) - known)
        if unknown:
            raise ValueError(f"{args.config}: unknown keys {unknown}")
        values.update(loaded)
    values.update(given(TrainConfig, args))
    config = TrainConfig(**values)
    if not config.data:
        raise ValueError("no training data: give --data FILE (or data: in the config)")
    return config


def to_dict(config: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
