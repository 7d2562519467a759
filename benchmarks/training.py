"""Training throughput: `loraplex train` against a plain PEFT + transformers Trainer run with the
same model, data, LoRA config and optimizer settings, in one run.

Both train QLoRA (the embedded SmolLM2 in NF4, fp32 compute on a CPU) for the same number of
optimizer steps on the same batches: the same file, deduplicated and chat-rendered alike (loss
on the answers), in the file's order, drawn by the Trainer's sampler with the same seed, so
both sides see the same examples in the same order (the token counts in the JSON match).
The baseline pads each batch to its longest example, as a plain Trainer script does;
loraplex concatenates a batch's examples without padding. Throughput counts real
(non-padding) tokens per second of training; each side runs in a fresh process, so peak
memory is its own, and the sides alternate so drift on a shared machine hits both.

    python benchmarks/training.py [--steps 8] [--batch-size 8] [--examples 400] [--repeats 1]

(CPU training is slow: ~10-15 s per step of 8 examples on 2 cores; the defaults take ~5 min
a repeat.)
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import (
    add_common_args,
    make_parser,
    peak_rss_mib,
    publish,
    setup_logging,
)

log = logging.getLogger("benchmark")

TOPICS = ["printers", "invoices", "passwords", "shipping", "refunds", "laptops", "routers"]


def make_dataset(path: Path, n: int, seed: int) -> None:
    """Instructions and answers of varied length (padding is what packing saves)."""
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            topic = rng.choice(TOPICS)
            words = " ".join(rng.choice(TOPICS) for _ in range(rng.randint(3, 60)))
            answer = " ".join(
                f"step {k}: check the {rng.choice(TOPICS)}." for k in range(rng.randint(1, 12))
            )
            row = {"instruction": f"#{i} Help with {topic}: {words}", "output": answer}
            f.write(json.dumps(row) + "\n")


def run_loraplex(args: argparse.Namespace, data: Path, out: Path) -> dict:
    from loraplex.training.config import TrainConfig
    from loraplex.training.train import MANIFEST, train

    config = TrainConfig(
        data=str(data),
        home=args.home,
        output_dir=str(out),
        eval_fraction=0,
        max_steps=args.steps,
        batch_size=args.batch_size,
        max_length=args.max_length,
        gradient_checkpointing=args.gradient_checkpointing,
        eval_generate=0,
        save_steps=10**6,
        logging_steps=10**6,
        seed=args.seed,
    )
    adapter = train(config)
    assert adapter is not None
    metrics = json.loads((adapter / MANIFEST).read_text())["metrics"]
    return {
        "tokens": metrics["train_tokens"],
        "seconds": metrics["train_runtime"],
        "tokens_per_second": metrics["train_tokens_per_second"],
        "loss": metrics["train_loss"],
        "peak_rss_mb": peak_rss_mib(),
    }


def run_peft(args: argparse.Namespace, data: Path, out: Path) -> dict:
    """The plain way: from_pretrained with a BitsAndBytesConfig, PEFT, a padding collator."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainingArguments,
        set_seed,
    )

    from loraplex.core.model import embedded_model_dir, eos_ids_of
    from loraplex.training.data import dedup, prepare, read_jsonl

    set_seed(args.seed)
    model_dir = embedded_model_dir(Path(args.home).expanduser())
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, quantization_config=quant, dtype=torch.float32
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = prepare_model_for_kbit_training(
        model, use_gradient_checkpointing=args.gradient_checkpointing
    )
    model = get_peft_model(
        model,
        LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                   task_type="CAUSAL_LM"),
    )  # fmt: skip
    chats, _ = dedup(read_jsonl(data))
    examples, _ = prepare(tokenizer, chats, args.max_length, eos_ids_of(model, tokenizer))
    rows = [
        {"input_ids": e.input_ids, "labels": e.labels, "attention_mask": [1] * len(e.input_ids)}
        for e in examples
    ]
    pad = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)

    targs = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=2e-4,
        lr_scheduler_type="cosine",
        warmup_steps=0.03,
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        optim="adamw_torch",
        save_strategy="no",
        logging_steps=10**6,
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        remove_unused_columns=False,
        # The Trainer's count of the batches it trained on (counting in the collator would
        # also count the batch the dataloader fetches ahead: one step's worth too many).
        include_num_input_tokens_seen="non_padding",
    )
    trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=pad)
    result = trainer.train()
    seconds = result.metrics["train_runtime"]
    tokens = trainer.state.num_input_tokens_seen
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds,
        "loss": result.metrics["train_loss"],
        "peak_rss_mb": peak_rss_mib(),
    }


def child(args: argparse.Namespace) -> None:
    """One side, in this (fresh) process; its result as JSON on the last stdout line."""
    out = Path(tempfile.mkdtemp(prefix=f"train-bench-{args.only}-"))
    run = run_loraplex if args.only == "loraplex" else run_peft
    result = run(args, Path(args.data), out)
    sys.stdout.write(json.dumps(result) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--examples", type=int, default=400)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction,
                        default=True)  # fmt: skip
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side (median)")
    parser.add_argument("--seed", type=int, default=0)
    add_common_args(parser, "training")
    parser.add_argument("--only", choices=["loraplex", "peft"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    setup_logging()
    if args.only:
        child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="train-bench-"))
    data = work / "data.jsonl"
    make_dataset(data, args.examples, args.seed)
    results: dict[str, list[dict]] = {"loraplex": [], "peft": []}
    for _ in range(args.repeats):
        for side in ("peft", "loraplex"):  # alternate: drift on a shared machine hits both
            log.info("training with %s (%d steps)", side, args.steps)
            argv_child = [sys.executable, __file__, "--only", side, "--data", str(data)]
            for flag in ("steps", "batch_size", "max_length", "seed", "home"):
                argv_child += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
            if not args.gradient_checkpointing:
                argv_child.append("--no-gradient-checkpointing")
            start = time.perf_counter()
            done = subprocess.run(argv_child, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stderr[-3000:])
                raise SystemExit(f"{side} failed")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["wall_seconds"] = time.perf_counter() - start
            results[side].append(result)

    def median(side: str, key: str) -> float:
        values = sorted(r[key] for r in results[side])
        return values[len(values) // 2]

    rows = []
    base_tps = median("peft", "tokens_per_second")
    for side, label in (("peft", "PEFT + Trainer (padded)"), ("loraplex", "loraplex train")):
        tps = median(side, "tokens_per_second")
        rows.append((label, tps, tps / base_tps, median(side, "peak_rss_mb"),
                     median(side, "seconds"), median(side, "loss"),
                     median(side, "tokens")))  # fmt: skip
    header = (
        f"{'system':<26}{'tokens/s':>10}{'x PEFT':>8}{'peak RSS MB':>13}{'train s':>9}{'loss':>8}"
        f"{'tokens':>8}"
    )
    lines = [
        f"QLoRA on the embedded model, {args.steps} steps x batch {args.batch_size}, "
        f"{args.examples} examples, median of {args.repeats}",
        header,
        *(
            f"{r[0]:<26}{r[1]:>10.1f}{r[2]:>8.2f}{r[3]:>13.0f}{r[4]:>9.1f}{r[5]:>8.3f}{r[6]:>8.0f}"
            for r in rows
        ),
    ]
    # The machine as a fresh process sees it, as each side started (this one has no torch).
    publish({"config": vars(args), "runs": results}, lines, args.out, fresh_process=True)


if __name__ == "__main__":
    main()
