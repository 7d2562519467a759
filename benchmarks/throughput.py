"""Throughput: loraplex against its baselines, all measured in one run.

N requests (chat prompts of 64-128 tokens) x M new tokens each (EOS ignored, so every system
does the same work), with K distinct all-linear LoRA adapters spread round-robin over the
requests (request i of repeat j uses adapter (i + N*j) mod K, so with K > N every adapter is
used across repeats, at most N at once):

    loraplex mixed       requests for K adapters batched together
    loraplex base        no adapter
    HF generate base     transformers generate on one left-padded batch, no adapter, in the
                         dtype loraplex's --dtype auto measures fastest on this machine
    PEFT mixed batch     PEFT generate(adapter_names=...) on one batch
    PEFT one at a time   set_adapter + generate per request (a sample, extrapolated)

Every adapter is loaded once before the first burst. loraplex's bursts are taken in --repeats
rounds, each a burst of the base and then one of every K in turn, so that the drift of a
shared machine over the run's minutes touches every figure alike (measured one figure after
another, the base's bursts once ran minutes before the 32 adapters' and the ratio between them
moved with the machine). Where K <= N a one-token burst of the K adapters comes just before
each of K's bursts, so they run resident, as K adapters in steady service are (else K's figure
would carry the loads of adapters that a larger set before it evicted); with K > N each round
brings adapters the one before evicted, and its figure carries those loads (the drop reported
for K > N).

--via server (the default) measures loraplex as users see it: `loraplex serve` with its default
flags (plus --serve-args), all N requests sent at once over gRPC (GenerateStream), tokens per
second from the first send to the last end. --via engine drives the engine in this process
with the same workload (no protocol, no server defaults: --base-kernel, --lora-dtype apply).
Either way every measured burst carries a cache_salt of its own, so no system is measured on
prompts it cached in an earlier burst (the warm-up sends the base the same prompts; HF and
PEFT cache nothing across calls); within a burst, requests of one adapter (or of the base)
share the chat template's system prompt, as they would in service.

The machine is shared and noisy: each figure is the median of its rounds (each round's rate is
logged, and kept in the JSON as runs_tokens_per_s), and the table
gives ratios to loraplex base-only, to HF generate and to the PEFT mixed batch from the same run.
Peak RSS is loraplex's (the server process, or this one before any baseline model is loaded;
adapter files are written by a child process) and this process's at the end.

    python benchmarks/throughput.py [--via server] [--requests 64] [--new-tokens 64]
        [--adapters 1,8,32,128]
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel

from loraplex.server.config import EngineConfig

from harness import (
    ADAPTER_PREFIX,
    EngineBench,
    Job,
    add_common_args,
    add_server_args,
    bench_prompts,
    burst_rate,
    in_child,
    load_base,
    load_into_peft,
    make_parser,
    peak_rss_mib,
    prompt_texts,
    publish,
    register_adapters,
    run_main,
    server_flags,
    server_process,
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
    parser.add_argument(
        "--via", default="server", choices=["server", "engine"], help="how loraplex is driven"
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", default="1,8,32,128", help="distinct adapter counts")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of loraplex bursts")
    parser.add_argument(
        "--baseline-repeats", type=int, default=1, help="runs per HF/PEFT figure (slow)"
    )
    parser.add_argument(
        "--single-sample",
        type=int,
        default=3,
        help="requests PEFT one-at-a-time actually runs (then extrapolated)",
    )
    parser.add_argument(
        "--lora-dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="engine"
    )
    parser.add_argument(
        "--base-kernel",
        default="auto",
        choices=["auto", "bitsandbytes", "lut", "nf4", "dense", "packed"],
        help="engine",
    )
    parser.add_argument("--skip-baselines", action="store_true", help="loraplex rows only")
    add_server_args(parser, "extra `loraplex serve` flags, --via server (default: none)")
    add_common_args(parser, "throughput")
    args = parser.parse_args()
    extra = server_flags(parser, args.serve_args)
    setup_logging()
    counts = [int(k) for k in args.adapters.split(",")]
    home = Path(args.home).expanduser()
    with work_dir("loraplex-bench-", args.keep_work) as work:
        # Adapter files are made in a child process: its model copy never counts in our RSS.
        dirs = in_child(write_adapters, str(home), max(counts), args.rank, str(work / "peft"))
        if args.via == "server":
            run = via_server(args, extra, counts, home, work)
        else:
            run = via_engine(args, counts, home, work, dirs)
        if not args.skip_baselines:
            run.rows += baselines(args, counts, home, dirs)
    return report(args, counts, run)


@dataclasses.dataclass
class LoraplexRun:
    rows: list[dict]
    prompt_lengths: list[int]
    peak_rss_mib: float
    setup: str  # how loraplex ran, for the table's heading
    facts: dict[str, Any]


def row(
    system: str,
    k: int,
    tokens_per_s: float,
    tokens: int,
    note: str = "",
    runs: Sequence[float] = (),
) -> dict:
    spread = f" (runs {', '.join(f'{r:.1f}' for r in runs)})" if len(runs) > 1 else ""
    log.info("%-22s K=%-3d %8.1f tok/s %s%s", system, k, tokens_per_s, note, spread)
    return {
        "system": system,
        "adapters": k,
        "seconds": tokens / tokens_per_s,
        "tokens_per_s": tokens_per_s,
        "note": note,
        "runs_tokens_per_s": list(runs),
    }


def in_rounds(
    counts: list[int],
    args: Any,
    measure: Callable[[int, int], float],
    warm: Callable[[int], None],
) -> list[dict]:
    """loraplex's rows, taken in rounds as the module's docstring says: measure(K, round) gives
    tok/s (K=0: the base), warm(K) comes before each of K's bursts where K <= N."""
    n, m = args.requests, args.new_tokens
    rates: dict[int, list[float]] = {k: [] for k in (0, *counts)}
    for j in range(args.repeats):
        for k in rates:
            if 0 < k <= n:
                warm(k)
            rates[k].append(measure(k, j))
            log.info("round %d/%d: K=%d %.1f tok/s", j + 1, args.repeats, k, rates[k][-1])
    rows = [row("loraplex base", 0, statistics.median(rates[0]), n * m, runs=rates[0])]
    for k in counts:
        note = f"{min(k, n)} distinct per batch"
        rows.append(
            row("loraplex mixed", k, statistics.median(rates[k]), n * m, note, runs=rates[k])
        )
    return rows


def rotation(items: list[Any], k: int, n: int, repeat: int) -> list[Any]:
    """What request i of `repeat` uses: items[(i + n * repeat) % k]."""
    return [items[(i + n * repeat) % k] for i in range(n)]


def via_server(
    args: Any, extra: list[str], counts: list[int], home: Path, work: Path
) -> LoraplexRun:
    from loraplex.server.client import LoraplexClient

    n, m = args.requests, args.new_tokens
    ids = [f"{ADAPTER_PREFIX}{i}" for i in range(max(counts))]
    prompts = in_child(prompt_texts_for, str(home), args.model, n)
    with server_process(home, work, extra, args.model) as server:
        address = server.wait_ready(args.startup_timeout)
        with LoraplexClient(address, timeout=600) as client:
            register_adapters(client, work / "peft", ids)
        salts = (f"burst-{i}" for i in itertools.count())  # a fresh cache_salt per burst

        def burst(adapters: list[str], tokens: int) -> float:
            return burst_rate(address, prompts, adapters, tokens, next(salts))

        burst([], 2)  # warm-up
        for i in range(0, len(ids), n):  # load every adapter once (from the store)
            burst(ids[i : i + n], 1)

        def measure(k: int, j: int) -> float:
            return burst(rotation(ids, k, n, j) if k else [], m)

        def warm(k: int) -> None:
            burst(rotation(ids, k, n, 0), 1)

        rows = in_rounds(counts, args, measure, warm)
        with LoraplexClient(address, timeout=600) as client:
            info = client.model_info()  # after the loads: the slot count for their rank
        rss = (server.peak_rss_bytes() or 0) / 2**20
    setup = (
        f"`loraplex serve` {' '.join(extra) or '(default flags)'} over gRPC: {info.dtype} "
        f"({info.dtype_choice}), max_loras {info.max_loras} ({info.max_loras_choice})"
    )
    facts = {
        "dtype": info.dtype,
        "dtype_choice": info.dtype_choice,
        "max_loras": info.max_loras,
        "max_loras_choice": info.max_loras_choice,
        "machine": info.machine,
        "dense_cache_bytes": info.dense_cache_bytes,
    }
    return LoraplexRun(rows, [], rss, setup, facts)


def prompt_texts_for(home: str, model: str | None, n: int) -> list[str]:
    """In a child: the benchmark's prompts as text (they tokenize back to bench_prompts)."""
    return prompt_texts(load_base(home, model).tokenizer, n)


def via_engine(
    args: Any, counts: list[int], home: Path, work: Path, dirs: list[str]
) -> LoraplexRun:
    n, m = args.requests, args.new_tokens
    config = EngineConfig(
        max_batch_size=n,
        max_loras=max(counts),
        max_lora_rank=args.rank,
        lora_dtype=args.lora_dtype,
        base_kernel=args.base_kernel,
    )
    # Every system runs its tensor work on the engine's thread (one torch thread: see Engine).
    with EngineBench(config, home, work) as bench:
        info = bench.start()
        batch = bench_prompts(info.tokenizer, n)
        versions = bench.register(dirs)
        bench.run([Job(batch[0])], 2)  # warm-up
        for i in range(0, max(counts), n):  # load every adapter into its slot once
            bench.run([Job(batch[0], v) for v in versions[i : i + n]], 1)
        salts = (f"burst-{i}" for i in itertools.count())  # as via_server's

        def jobs(k: int, j: int) -> list[Job]:
            if k == 0:
                return [Job(p) for p in batch]
            return [Job(p, v) for p, v in zip(batch, rotation(versions, k, n, j), strict=True)]

        def measure(k: int, j: int) -> float:
            return n * m / bench.run(jobs(k, j), m, salt=next(salts))[0]

        def warm(k: int) -> None:
            bench.run(jobs(k, 0), 1)

        rows = in_rounds(counts, args, measure, warm)
        stats = bench.snapshot().stats
    log.info("engine: %s", stats)
    setup = (
        f"the engine in-process: LoRA dtype {args.lora_dtype}, base kernel {args.base_kernel}, "
        f"torch threads {torch.get_num_threads()}"
    )
    facts = {"engine_stats": dataclasses.asdict(stats)}
    return LoraplexRun(rows, [len(p) for p in batch], peak_rss_mib(), setup, facts)


def baselines(args: Any, counts: list[int], home: Path, dirs: list[str]) -> list[dict]:
    """HF generate base and PEFT's mixed batch and one-at-a-time, on the same prompts."""
    n, m = args.requests, args.new_tokens
    loaded = load_base(str(home), args.model)
    batch = bench_prompts(loaded.tokenizer, n)
    tok = loaded.tokenizer
    pad = int(tok.pad_token_id if tok.pad_token_id is not None else 0)
    rows = [
        row(
            "HF generate base",
            0,
            n
            * m
            / median_time(
                lambda: hf_batch(loaded.model, batch, m, pad, None), args.baseline_repeats
            ),
            n * m,
            f"{loaded.dtype}".removeprefix("torch."),
        )
    ]
    log.info("loading %d adapters into PEFT for the baselines", len(dirs))
    peft_model = load_into_peft(loaded.model, [Path(d) for d in dirs])
    for k in counts:
        names = [f"{ADAPTER_PREFIX}{i % k}" for i in range(n)]
        seconds = median_time(
            partial(hf_batch, peft_model, batch, m, pad, names), args.baseline_repeats
        )
        rows.append(row("PEFT mixed batch", k, n * m / seconds, n * m))
        s = min(args.single_sample, n)
        sample = peft_one_at_a_time(peft_model, batch[:s], names[:s], m, pad)
        note = f"extrapolated: {s} of {n} run"
        rows.append(row("PEFT one at a time", k, n * m * s / (sample * n), n * m, note))
    return rows


def report(args: Any, counts: list[int], run: LoraplexRun) -> int:
    rows, n, m = run.rows, args.requests, args.new_tokens

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
        f"{n} requests x {m} new tokens (EOS ignored), r={args.rank} all-linear; loraplex: "
        f"{run.setup}; median of {args.repeats} (baselines {args.baseline_repeats})",
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
    lines.append(f"peak RSS: loraplex {run.peak_rss_mib:.0f} MiB, this process {rss_end:.0f} MiB")
    publish(
        {
            "via": args.via,
            "requests": n,
            "new_tokens": m,
            "rank": args.rank,
            "repeats": args.repeats,
            "baseline_repeats": args.baseline_repeats,
            "loraplex": run.facts | {"setup": run.setup},
            "peak_rss_mib": {"loraplex": run.peak_rss_mib, "end": rss_end},
            "rows": rows,
        },
        lines,
        args.out,
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
