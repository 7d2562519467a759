"""`loraplex train`: a tenant's JSONL to a PEFT adapter the server serves.

The base is loaded exactly as the server loads it (same conversion, same NF4 quantization,
same fingerprint), wrapped with PEFT's LoRA and trained by transformers' Trainer: padding-free
batches (examples concatenated, each attended on its own: flattened_attention.py), loss on
assistant tokens only, eval loss with early stopping, checkpoints that resume on the same
trajectory (adapter, optimizer, scheduler and RNG states), and Ctrl-C saving a checkpoint
before it stops. Under `accelerate launch` (or torchrun) the same code trains data-parallel.

Writes output_dir/adapter (adapter_config.json, adapter_model.safetensors and
training_manifest.json: base fingerprint, data sha256, config, metrics, library versions).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import (
    DataCollatorWithFlattening,
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from loraplex.core.config import ModelConfig
from loraplex.core.machine import DtypeChoice
from loraplex.core.model import LoadedModel, eos_ids_of, load_model
from loraplex.training.config import TrainConfig, to_dict
from loraplex.training.data import (
    IGNORE_INDEX,
    LengthReport,
    TokenizedExample,
    dedup,
    prepare,
    read_jsonl,
    render_marked,
    split,
)
from loraplex.training.evaluate import Scorer, score_base_and_adapter
from loraplex.training.flattened_attention import use_flattened_attention
from loraplex.training.frozen_base import dequantize_frozen_base, frozen_base_dtype
from loraplex.training.report import write_report

log = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"
CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "training_manifest.json"
DRY_RUN_SAMPLES = 3


@dataclass
class Prepared:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    eval_chats: list[list[dict[str, str]]]
    report: LengthReport
    data_sha256: str


def file_sha256(*paths: Path) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load_base(config: TrainConfig) -> LoadedModel:
    cuda = torch.cuda.is_available()
    if cuda and "LOCAL_RANK" in os.environ:  # data-parallel: each process on its own GPU
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return load_model(
        ModelConfig(
            model=config.model or None,
            home=Path(config.home).expanduser(),
            device="cuda" if cuda else "cpu",
            quantization=config.quantization,
            dtype="bfloat16" if cuda else "float32",
        )
    )


def prepare_data(config: TrainConfig, tokenizer: Any, eos_ids: set[int]) -> Prepared:
    data = Path(config.data).expanduser()
    chats, duplicates = dedup(read_jsonl(data))
    sources = [data]
    if config.eval_data:
        eval_path = Path(config.eval_data).expanduser()
        train_chats, eval_chats = chats, dedup(read_jsonl(eval_path))[0]
        sources.append(eval_path)
    else:
        train_chats, eval_chats = split(chats, config.eval_fraction, config.seed)
    train, report = prepare(tokenizer, train_chats, config.max_length, eos_ids)
    report.duplicates = duplicates
    evaluation = prepare(tokenizer, eval_chats, config.max_length, eos_ids)[0] if eval_chats else []
    return Prepared(
        train=train,
        eval=evaluation,
        eval_chats=eval_chats,
        report=report,
        data_sha256=file_sha256(*sources),
    )


def dry_run(config: TrainConfig, prepared: Prepared, tokenizer: Any) -> None:
    out = sys.stdout
    out.write(f"{prepared.report.summary()}\n")
    out.write(f"{len(prepared.train)} train / {len(prepared.eval)} eval examples\n")
    for example in prepared.train[:DRY_RUN_SAMPLES]:
        out.write("-" * 72 + "\n" + render_marked(tokenizer, example) + "\n")
    out.write("-" * 72 + "\ntrained tokens are between ⟦ and ⟧\n")


class _Examples(torch.utils.data.Dataset):
    def __init__(self, examples: list[TokenizedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:
        e = self.examples[i]
        return {"input_ids": e.input_ids, "labels": e.labels}


def padded_collator(pad_id: int) -> Any:
    """Right-padded batches (packing off)."""

    def collate(features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), pad_id)
        labels = torch.full((len(features), width), IGNORE_INDEX)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for i, f in enumerate(features):
            n = len(f["input_ids"])
            ids[i, :n] = torch.tensor(f["input_ids"])
            labels[i, :n] = torch.tensor(f["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    return collate


def checkpoint_to_resume(config: TrainConfig) -> str | None:
    if not config.resume:
        return None
    if config.resume != "latest":
        return str(Path(config.resume).expanduser())
    found = sorted(
        (config.out / CHECKPOINTS_DIR).glob("checkpoint-*"),
        key=lambda p: int(p.name.rsplit("-", 1)[1]),
    )
    if not found:
        raise FileNotFoundError(f"no checkpoint under {config.out / CHECKPOINTS_DIR} to resume")
    return str(found[-1])


def train(config: TrainConfig) -> Path | None:
    """Train (or, with dry_run, only show the data); returns the adapter directory (None when
    nothing was written: a dry run, or an interrupted run that left a checkpoint)."""
    set_seed(config.seed)
    loaded = load_base(config)
    model, tokenizer = loaded.model, loaded.tokenizer
    prepared = prepare_data(config, tokenizer, eos_ids_of(model, tokenizer))
    if config.dry_run:
        dry_run(config, prepared, tokenizer)
        return None
    cuda = torch.cuda.is_available()
    base_dtype: DtypeChoice | None = None
    if config.quantization == "nf4" and not cuda:
        base_dtype = frozen_base_dtype(model, Path(config.home).expanduser())
        log.info("frozen base in %s (%s)", base_dtype.dtype, base_dtype.reason)
        dequantize_frozen_base(model, getattr(torch, base_dtype.dtype))
    if config.packing:
        use_flattened_attention(model)
    if config.quantization == "nf4":
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing
        )
    lora = LoraConfig(
        r=config.r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        use_rslora=config.use_rslora,
        target_modules=config.targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.print_trainable_parameters()
    has_eval = bool(prepared.eval)
    early = has_eval and config.early_stopping_patience > 0
    args = TrainingArguments(
        output_dir=str(config.out / CHECKPOINTS_DIR),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_ratio,  # a float below 1: a share of the steps
        weight_decay=config.weight_decay,
        gradient_checkpointing=config.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=cuda,
        optim="paged_adamw_8bit" if cuda and config.quantization == "nf4" else "adamw_torch",
        logging_steps=config.logging_steps,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=3,
        load_best_model_at_end=early,
        metric_for_best_model="eval_loss" if early else None,
        greater_is_better=False if early else None,
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        report_to=[],
        use_cpu=not cuda,
        dataloader_num_workers=0,
        # Training tokens, summed over processes (padding-free batches have no padding).
        include_num_input_tokens_seen="all" if config.packing else "non_padding",
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in every step
    )
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # With the examples' boundaries, attention stays within each example (flattened_attention).
    collator = (
        DataCollatorWithFlattening(return_flash_attn_kwargs=True)
        if config.packing
        else padded_collator(pad_id)
    )
    interrupt = InterruptToCheckpoint()
    callbacks: list[Any] = [interrupt]
    if early:
        callbacks.append(EarlyStoppingCallback(config.early_stopping_patience))
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=_Examples(prepared.train),
        eval_dataset=_Examples(prepared.eval) if has_eval else None,
        data_collator=collator,
        callbacks=callbacks,
    )
    checkpoint = checkpoint_to_resume(config)
    with interrupt.installed():
        result = trainer.train(resume_from_checkpoint=checkpoint)
    if interrupt.interrupted:
        log.warning(
            "interrupted: checkpoint saved in %s; resume with --resume latest",
            config.out / CHECKPOINTS_DIR,
        )
        return None
    metrics = dict(result.metrics)
    # This run's own tokens and training time (not a resumed run's, not its evaluations).
    before = checkpoint_state(checkpoint)
    ours = [e for e in trainer.state.log_history if e.get("step", 0) > before.get("global_step", 0)]
    runtime = (metrics.get("train_runtime") or 0.0) - sum(e.get("eval_runtime", 0) for e in ours)
    tokens = trainer.state.num_input_tokens_seen - before.get("num_input_tokens_seen", 0)
    metrics["train_tokens"] = tokens
    metrics["train_tokens_per_second"] = tokens / runtime if runtime > 0 else 0.0
    metrics["peak_memory_mb"] = peak_memory_mb()
    if has_eval:
        last = next((e for e in reversed(ours) if "eval_loss" in e), None)
        if early or last is None or last["step"] != trainer.state.global_step:
            last = trainer.evaluate()  # the best model was reloaded, or the end was not evaluated
        metrics.update({k: v for k, v in last.items() if k.startswith("eval_")})
    if not trainer.is_world_process_zero():
        return None
    scores = None
    if config.eval_generate and prepared.eval_chats:
        keys = tuple(k.strip() for k in config.eval_json_keys.split(",") if k.strip())
        scores = score_base_and_adapter(
            model,
            tokenizer,
            prepared.eval_chats[: config.eval_generate],
            Scorer(config.eval_metric, keys),
            config.eval_max_new_tokens,
        )
        metrics.update(base_score=scores.base_mean, adapter_score=scores.adapter_mean)
    adapter_dir = config.out / ADAPTER_DIR
    model.save_pretrained(str(adapter_dir))
    summary = write_manifest(adapter_dir, config, loaded, prepared, metrics, trainer, base_dtype)
    write_report(config.out, summary, trainer.state.log_history, scores)
    log.info("adapter written to %s; report in %s", adapter_dir, config.out / "report.md")
    return adapter_dir


def checkpoint_state(checkpoint: str | None) -> dict[str, Any]:
    """The trainer state a checkpoint holds ({} without one)."""
    if checkpoint is None:
        return {}
    return dict(json.loads((Path(checkpoint) / "trainer_state.json").read_text()))


def peak_memory_mb() -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak resident set."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_manifest(
    adapter_dir: Path,
    config: TrainConfig,
    loaded: LoadedModel,
    prepared: Prepared,
    metrics: dict[str, Any],
    trainer: Any,
    frozen_base: DtypeChoice | None = None,
) -> dict[str, Any]:
    """Write the adapter's training_manifest.json; returns it without the log history."""
    import bitsandbytes
    import peft
    import transformers

    from loraplex.core import __version__

    manifest = {
        "base_model": loaded.model_id,
        "base_model_fingerprint": loaded.fingerprint,
        "quantization": loaded.quantization,
        # A CPU's frozen 4-bit base, dequantized once: its dtype and why (None: as loaded).
        "frozen_base_dtype": None if frozen_base is None else frozen_base.dtype,
        "frozen_base_dtype_reason": None if frozen_base is None else frozen_base.reason,
        "data_sha256": prepared.data_sha256,
        "train_examples": len(prepared.train),
        "eval_examples": len(prepared.eval),
        "length_report": prepared.report.summary(),
        "config": to_dict(config),
        "metrics": metrics,
        "log_history": trainer.state.log_history,
        "versions": {
            "loraplex": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "bitsandbytes": bitsandbytes.__version__,
        },
    }
    (adapter_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
    return {k: v for k, v in manifest.items() if k != "log_history"}


class InterruptToCheckpoint(TrainerCallback):
    """Ctrl-C during training: save a checkpoint at the end of the current step, then stop
    (a second Ctrl-C stops at once)."""

    def __init__(self) -> None:
        self.interrupted = False

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield  # signals reach the main thread only
            return
        previous = signal.getsignal(signal.SIGINT)

        def on_sigint(signum: int, frame: Any) -> None:
            if self.interrupted:
                raise KeyboardInterrupt
            self.interrupted = True
            log.warning("Ctrl-C: saving a checkpoint after this step (again to abort)")

        signal.signal(signal.SIGINT, on_sigint)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        stop = self.interrupted
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every process stops at the same step, or the others would wait for it forever.
            flag = torch.tensor(int(stop), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            stop = self.interrupted = bool(flag.item())
        if stop:
            control.should_save = True
            control.should_training_stop = True
        return control
