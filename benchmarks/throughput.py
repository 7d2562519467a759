"""Offline throughput: the loraplex engine against its baselines, all measured in one run.

N requests (chat prompts of 64-128 tokens) x M new tokens each (EOS ignored, so every system
does the same work), with K distinct all-linear LoRA adapters spread round-robin over the
requests (request i of repeat j uses adapter (i + N*j) mod K, so with K > N every adapter is
used across repeats, at most N at once):

    loraplex mixed       the engine, requests for K adapters batched together
    loraplex base        the engine, no adapter
    HF generate base     transformers generate on one left-padded batch, no adapter
    PEFT mixed batch     PEFT generate(adapter_names=...) on one batch
    PEFT one at a time   set_adapter + generate per request (a sample, extrapolated)

The machine is shared and noisy: each figure is the median of --repeats runs, and the table
gives ratios to loraplex base-only, to HF generate and to the PEFT mixed batch from the same run.
Peak RSS is read after the loraplex runs (before any baseline model is loaded; the adapter
files are written by a child process) and at the end.

    python benchmarks/throughput.py [--requests 64] [--new-tokens 64] [--adapters 1,8,32,128]
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from loraplex.core.config import ModelConfig
from loraplex.core.model import load_model
from loraplex.server.config import EngineConfig

from harness import (
    EngineBench,
    Job,
    add_common_args,
    bench_prompts,
    in_child,
    load_into_peft,
    make_parser,
    peak_rss_mib,
    publish,
    setup_logging,
    work_dir,
    write_adapters,
)

log = logging.getLogger("benchmark")


def hf_batch(
    model: PeftModel,
    batch: list[list[int]],
    new_tokens: int,
    pad: int,
    adapter_names: list[str] | None,
) -> float:
    """One left-padded generate() over the whole batch; seconds."""
    t = max(map(len, batch))
    ids = torch.tensor([[pad] * (t - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in batch])
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    start = time.perf_counter()
    with torch.inference_mode():
        if adapter_names is None:
            model.generate(**kwargs)
        else:
            model.generate(**kwargs, adapter_names=adapter_names)
    return time.perf_counter() - start


def peft_one_at_a_time(
    model: PeftModel, batch: list[list[int]], names: list[str], new_tokens: int, pad: int
) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for ids, name in zip(batch, names, strict=True):
            model.set_adapter(name)
            model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
    return time.perf_counter() - start


def median_time(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", default="1,8,32,128", help="distinct adapter counts")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="runs per loraplex figure")
    parser.add_argument(
        "--baseline-repeats", type=int, default=1, help="runs per HF/PEFT figure (slow)"
    )
    parser.add_argument(
        "--single-sample",
        type=int,
        default=3,
        help="requests PEFT one-at-a-time actually runs (then extrapolated)",
    )
    parser.add_argument("--lora-dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument(
        "--base-kernel", default="auto", choices=["auto", "bitsandbytes", "lut", "dense"]
    )
    parser.add_argument("--skip-baselines", action="store_true", help="loraplex rows only")
    add_common_args(parser, "throughput")
    args = parser.parse_args()
    setup_logging()
    counts = [int(k) for k in args.adapters.split(",")]
    home = Path(args.home).expanduser()
    config = EngineConfig(
        max_batch_size=args.requests,
        max_loras=max(counts),
        max_lora_rank=args.rank,
        lora_dtype=args.lora_dtype,
        base_kernel=args.base_kernel,
    )
    # Every system runs its tensor work on the engine's thread (one torch thread: see Engine).
    with work_dir("loraplex-bench-") as work, EngineBench(config, home, work) as bench:
        info = bench.start()
        return run_systems(args, bench, info.tokenizer, counts, home, work)


def run_systems(
    args, bench: EngineBench, tokenizer: Any, counts: list[int], home: Path, work: Path
) -> int:
    n, m = args.requests, args.new_tokens
    on_engine = bench.on_engine
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    batch = bench_prompts(tokenizer, n)
    # Adapter files are made in a child process: its model copy never counts in our peak RSS.
    dirs = in_child(write_adapters, str(home), max(counts), args.rank, str(work / "peft"))
    versions = bench.register(dirs)
    bench.run([Job(batch[0])], 2)  # warm-up
    for i in range(0, max(counts), n):  # load every adapter into its slot once
        bench.run([Job(batch[0], v) for v in versions[i : i + n]], 1)

    tokens = n * m
    rows: list[dict] = []

    def record(system: str, k: int, seconds: float, note: str = "") -> None:
        rows.append(
            {
                "system": system,
                "adapters": k,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "note": note,
            }
        )
        log.info("%-22s K=%-3d %8.1f tok/s %s", system, k, tokens / seconds, note)

    def mixed(k: int, repeat: int) -> list[Job]:
        return [Job(p, versions[(i + n * repeat) % k]) for i, p in enumerate(batch)]

    record(
        "loraplex base",
        0,
        median_time(lambda: bench.run([Job(p) for p in batch], m)[0], args.repeats),
    )
    for k in counts:
        times = [bench.run(mixed(k, j), m)[0] for j in range(args.repeats)]
        in_flight = len({id(job.adapter) for job in mixed(k, 0)})
        record("loraplex mixed", k, statistics.median(times), f"{in_flight} distinct per batch")
    rss_loraplex = peak_rss_mib()
    stats = bench.snapshot().stats
    log.info("engine: %s", stats)

    if not args.skip_baselines:
        log.info("loading %d adapters into PEFT for the baselines", len(dirs))
        peft_model = on_engine(
            lambda: load_into_peft(
                load_model(ModelConfig(home=home)).model, [Path(d) for d in dirs]
            )
        )
        plain = on_engine(lambda: load_model(ModelConfig(home=home)).model)  # HF, no PEFT
        record(
            "HF generate base",
            0,
            median_time(
                lambda: on_engine(lambda: hf_batch(plain, batch, m, pad, None)),
                args.baseline_repeats,
            ),
        )
        del plain
        for k in counts:
            names = [f"bench-{i % k}" for i in range(n)]
            record(
                "PEFT mixed batch",
                k,
                median_time(
                    lambda names=names: on_engine(
                        partial(hf_batch, peft_model, batch, m, pad, names)
                    ),
                    args.baseline_repeats,
                ),
            )
            s = min(args.single_sample, n)
            sample = on_engine(
                partial(peft_one_at_a_time, peft_model, batch[:s], names[:s], m, pad)
            )
            record("PEFT one at a time", k, sample * n / s, f"extrapolated: {s} of {n} run")

    def rate(system: str, k: int) -> float | None:
        return next(
            (r["tokens_per_s"] for r in rows if r["system"] == system and r["adapters"] == k),
            None,
        )

    base = rate("loraplex base", 0)
    hf = rate("HF generate base", 0)
    for r in rows:
        peft_mixed = rate("PEFT mixed batch", r["adapters"])
        r["vs_loraplex_base"] = r["tokens_per_s"] / base if base else None
        r["vs_hf_generate"] = r["tokens_per_s"] / hf if hf else None
        r["vs_peft_mixed"] = r["tokens_per_s"] / peft_mixed if peft_mixed else None

    def ratio(x: float | None) -> str:
        return f"{x:.2f}" if x else "-"

    lines = [
        f"{n} requests (prompts {min(map(len, batch))}-{max(map(len, batch))} tokens) x {m} new "
        f"tokens, r={args.rank} all-linear, LoRA dtype {args.lora_dtype}, base kernel "
        f"{args.base_kernel}, median of "
        f"{args.repeats} (baselines {args.baseline_repeats}), torch threads "
        f"{torch.get_num_threads()}",
        f"{'system':<20}{'adapters':>9}{'tok/s':>9}{'x base':>8}{'x HF gen':>10}"
        f"{'x PEFT mix':>12}  note",
    ]
    for r in rows:
        lines.append(
            f"{r['system']:<20}{r['adapters']:>9}{r['tokens_per_s']:>9.1f}"
            f"{ratio(r['vs_loraplex_base']):>8}{ratio(r['vs_hf_generate']):>10}"
            f"{ratio(r['vs_peft_mixed']):>12}  {r['note']}"
        )
    first, last = rate("loraplex mixed", counts[0]), rate("loraplex mixed", counts[-1])
    if first and last:
        lines.append(
            f"loraplex mixed, {counts[0]} -> {counts[-1]} adapters: "
            f"{100 * (1 - last / first):+.1f}% throughput drop"
        )
    rss_end = peak_rss_mib()
    lines.append(
        f"peak RSS: {rss_loraplex:.0f} MiB after the loraplex runs, {rss_end:.0f} MiB at the end"
    )
    publish(
        {
            "requests": n,
            "new_tokens": m,
            "prompt_tokens": [len(p) for p in batch],
            "rank": args.rank,
            "lora_dtype": args.lora_dtype,
            "repeats": args.repeats,
            "baseline_repeats": args.baseline_repeats,
            "torch_threads": torch.get_num_threads(),
            "peak_rss_mib": {"loraplex": rss_loraplex, "end": rss_end},
            "engine_stats": dataclasses.asdict(stats),
            "rows": rows,
        },
        lines,
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
