"""Where a mixed-adapter burst's time goes beyond the base's, and how far its LoRA is from the
machine's memory floor.

The engine in this process with the server's default engine settings (`EngineConfig`, the
batch sized to the burst) and the server's runtime libraries (tcmalloc, Intel OpenMP: the
program re-executes itself with them preloaded, as `loraplex serve` does). N requests x M new
tokens (EOS ignored) on the base and over K adapters (random r16 all-linear, request i on
adapter i mod K), in --repeats rounds of one burst each, every burst under a fresh cache_salt.
Each burst is split by timing, in this process, the engine's steps (`Engine._run_step`) and
the native LoRA kernel (`CpuKernels.lora_add`, around the call):

    prefill steps       the steps that computed prompt tokens (with the decodes riding along)
    decode steps        the steps of N decode rows only: median ms; LoRA kernel ms a step
    LoRA in prefill     the kernel's seconds inside the prefill steps
    cached              prompt tokens the prefix cache served (a block is its adapter's own,
                        so K adapters find less of a shared prompt start than the base)

Then the floor. A decode step over K adapters reads each one's A and B once (its slot in the
stacks, in the stacks' dtype); at this machine's read bandwidth (a 320 MB float32 sum on
torch's threads, median of 5, before and after the bursts: the higher, so the lower floor) that
takes `floor` ms a step, whatever the kernel. `at floor` is the mixed burst's rate with its
decode steps' LoRA at that floor, the rest as measured: the most a faster decode kernel could
give here; then also with the prompt steps' LoRA free.

And the compute roofline: each burst's arithmetic (the base's linears over every token it
computed, prompt and decode, the LM head over every row it samples, the attention's products
over each token's context, and the LoRA's over every token on an adapter) at the best rate this
machine's matmuls reach in the compute dtype (torch's, on the model's linear shapes at 64 and
512 rows and a 2048-square product, median of 5 each, the fastest): the fastest each burst
could possibly be here, however good every kernel, and how close each comes to it.

    python benchmarks/mixed_gap.py [--requests 64] [--new-tokens 64] [--adapters 32]
        [--repeats 3] [--no-prefix-cache]
"""

from __future__ import annotations

import collections
import functools
import itertools
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from loraplex.server.preload import reexec_with_runtime_libraries

if __name__ == "__main__":  # before torch: the allocator and OpenMP the server runs with
    reexec_with_runtime_libraries()

import torch

from loraplex.core.machine import interleaved_medians
from loraplex.server.config import EngineConfig
from loraplex.server.engine import cpu_kernels, engine
from loraplex.server.engine.lora import rank_bucket

from harness import (
    EngineBench,
    Job,
    add_common_args,
    bench_prompts,
    format_table,
    in_child,
    make_parser,
    publish,
    run_main,
    setup_logging,
    work_dir,
    write_adapters,
)

log = logging.getLogger("benchmark")

BANDWIDTH_FLOATS = 80_000_000  # 320 MB: far past the caches


class StepTimer:
    """Each step's (whether it computed prompt tokens, sequences, seconds, LoRA kernel seconds),
    taken by wrapping the engine's step and the kernel's entry point in this process."""

    def __init__(self) -> None:
        self.steps: list[tuple[bool, int, float, float]] = []
        self._kernel = 0.0
        step, lora_add = engine.Engine._run_step, cpu_kernels.CpuKernels.lora_add

        def timed_step(eng: Any) -> None:
            prefilling = any(s.prefilling for s in eng._batch.seqs)
            size = len(eng._batch.seqs)
            kernel, start = self._kernel, time.perf_counter()
            step(eng)
            self.steps.append(
                (prefilling, size, time.perf_counter() - start, self._kernel - kernel)
            )

        def timed_lora(lib: Any, *args: Any, **kwargs: Any) -> None:
            start = time.perf_counter()
            try:
                lora_add(lib, *args, **kwargs)
            finally:
                self._kernel += time.perf_counter() - start

        engine.Engine._run_step = timed_step  # type: ignore[method-assign]
        cpu_kernels.CpuKernels.lora_add = timed_lora  # type: ignore[method-assign]

    def burst(self, rows: int) -> dict[str, float]:
        """The split of the steps recorded since `steps` was last cleared (see the module's
        docstring)."""
        steps = self.steps
        prefill = [s for s in steps if s[0]]
        decode = [s for s in steps if not s[0] and s[1] == rows]
        return {
            "steps": len(steps),
            "prefill_steps": len(prefill),
            "prefill_s": sum(s[2] for s in prefill),
            "lora_in_prefill_s": sum(s[3] for s in prefill),
            "decode_steps": len(decode),
            "decode_s": sum(s[2] for s in decode),
            "decode_step_ms": 1e3 * statistics.median(s[2] for s in decode) if decode else 0.0,
            "decode_lora_ms": 1e3 * statistics.median(s[3] for s in decode) if decode else 0.0,
        }


def read_bandwidth() -> float:
    """Bytes a second a float32 sum over BANDWIDTH_FLOATS values reads (median of 5)."""
    x = torch.ones(BANDWIDTH_FLOATS)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - start)
    return x.numel() * x.element_size() / statistics.median(times[1:])


def matmul_rate(shapes: list[tuple[int, int]], dtype: torch.dtype) -> float:
    """The most FLOP a second torch's matmuls reached in `dtype`: each (in, out) shape at 64
    and 512 rows, and a 2048-square product (median of 5 timed calls each, taking turns)."""
    cases = [(rows, i, o) for i, o in shapes for rows in (64, 512)] + [(2048, 2048, 2048)]
    calls = [
        functools.partial(
            torch.nn.functional.linear,
            torch.randn(rows, fan_in, dtype=dtype),
            torch.randn(fan_out, fan_in, dtype=dtype),
        )
        for rows, fan_in, fan_out in cases
    ]
    times = interleaved_medians(calls, torch.device("cpu"), rounds=5)
    return max(2 * r * i * o / t for (r, i, o), t in zip(cases, times, strict=True))


class Arithmetic:
    """The FLOP of a burst's matmuls and attention products, from the model's shapes."""

    def __init__(self, bench: EngineBench, rank: int) -> None:
        runner = bench.engine._model()
        config = runner.model.config
        shapes = list(runner.target_shapes.values())
        self.shapes = sorted(set(shapes))
        self.dtype = runner.loaded.dtype
        self.linear = sum(i * o for i, o in shapes)  # multiply-adds a token, every layer
        self.lora = sum(rank * (i + o) for i, o in shapes)
        self.head = config.vocab_size * config.hidden_size
        # q.k and p.v: every query head over each context token, every layer
        self.attend = 2 * config.num_hidden_layers * config.hidden_size

    def burst(self, n: int, m: int, computed: int, cached: int, on_adapter: bool) -> float:
        """n requests of new m tokens each; `computed` prompt tokens computed, `cached` served
        from the prefix cache (the prompts' mean length is their sum / n)."""
        prompt = (computed + cached) / n
        decoded = n * (m - 1)  # the first token comes from the prompt's step
        tokens = computed + decoded
        # context: a prompt's computed tokens see about half the prompt on average, decoded
        # token j (1..m-1) sees prompt + j
        context = computed * prompt / 2 + n * ((m - 1) * prompt + m * (m - 1) / 2)
        macs = (
            tokens * self.linear
            + (decoded + n) * self.head
            + context * self.attend
            + (tokens * self.lora if on_adapter else 0)
        )
        return 2 * macs


def adapter_bytes(bench: EngineBench, rank: int) -> int:
    """The bytes one adapter of `rank` holds in the LoRA stacks (A and B of every group, at its
    pool's rank capacity, in the stacks' dtype): what a decode step reads for it."""
    return bench.engine._model().rank_bytes * rank_bucket(rank, bench.config.max_lora_rank)


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--no-prefix-cache", action="store_true", help="both bursts compute every prompt whole"
    )
    add_common_args(parser, "mixed_gap")
    args = parser.parse_args()
    if args.adapters < 1 or args.requests < 1 or args.repeats < 1:
        parser.error("--adapters, --requests and --repeats take 1 or more")
    setup_logging()
    home = Path(args.home).expanduser()
    n, m, k = args.requests, args.new_tokens, args.adapters
    preloaded = os.environ.get("LD_PRELOAD", "")
    log.info("runtime libraries preloaded: %s", preloaded or "none")
    bandwidths = [read_bandwidth()]
    with work_dir("loraplex-mixed-gap-") as work:
        dirs = in_child(write_adapters, str(home), k, args.rank, str(work / "peft"))
        timer = StepTimer()
        config = EngineConfig(max_batch_size=n, prefix_cache=not args.no_prefix_cache)
        with EngineBench(config, home, work) as bench:
            info = bench.start()
            prompts = bench_prompts(info.tokenizer, n)
            versions = bench.register(dirs)
            arithmetic = Arithmetic(bench, args.rank)
            bench.run([Job(p, v) for p, v in zip(prompts, versions, strict=False)], 1)
            salts = (f"gap-{i}" for i in itertools.count())
            runs: dict[str, list[dict[str, float]]] = collections.defaultdict(list)
            for j in range(args.repeats):
                for name, jobs in (
                    ("base", [Job(p) for p in prompts]),
                    (f"{k} mixed", [Job(p, versions[i % k]) for i, p in enumerate(prompts)]),
                ):
                    first = bench.snapshot()
                    before = first.prefix_cache
                    timer.steps.clear()
                    seconds, _ = bench.run(jobs, m, salt=next(salts))
                    last = bench.snapshot()
                    after = last.prefix_cache
                    split = timer.burst(n)
                    split["computed"] = last.stats.prefill_tokens - first.stats.prefill_tokens
                    split["tokens_per_s"] = n * m / seconds
                    split["seconds"] = seconds
                    split["cached"] = after.hits - before.hits if after and before else 0
                    split["flop"] = arithmetic.burst(
                        n, m, int(split["computed"]), int(split["cached"]), name != "base"
                    )
                    runs[name].append(split)
                    log.info("round %d %s: %s", j + 1, name, split)
            weights = min(k, n) * adapter_bytes(bench, args.rank)
        bandwidths.append(read_bandwidth())
    log.info("read bandwidth before and after: %s GB/s", [round(b / 1e9, 1) for b in bandwidths])
    rate = matmul_rate(arithmetic.shapes, arithmetic.dtype)
    log.info("best matmul rate in %s: %.1f GFLOPS", arithmetic.dtype, rate / 1e9)
    return report(args, runs, weights, max(bandwidths), preloaded, rate, str(arithmetic.dtype))


def report(
    args: Any,
    runs: dict[str, list[dict[str, float]]],
    weights: int,
    bandwidth: float,
    preloaded: str,
    rate: float,
    dtype: str,
) -> int:
    med = {
        name: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        for name, rounds in runs.items()
    }
    base, mixed = med["base"], med[f"{args.adapters} mixed"]
    floor_ms = 1e3 * weights / bandwidth
    # the mixed burst with its decode steps' LoRA at the floor, the rest as measured
    saved = mixed["decode_steps"] * max(0.0, mixed["decode_lora_ms"] - floor_ms) / 1e3
    tokens = args.requests * args.new_tokens
    at_floor = tokens / (mixed["seconds"] - saved)
    # and with the prompt steps' LoRA free as well: what the prefix cache's head start leaves
    no_lora = tokens / (mixed["seconds"] - saved - mixed["lora_in_prefill_s"])
    cols = [
        ("system", 10, "s"),
        ("tok/s", 7, ".1f"),
        ("x base", 6, ".3f"),
        ("prefill s", 9, ".2f"),
        ("LoRA in it", 10, ".2f"),
        ("decode steps", 12, ".0f"),
        ("step ms", 7, ".1f"),
        ("LoRA ms", 7, ".1f"),
        ("cached", 6, ".0f"),
    ]
    rows = [
        (
            name,
            r["tokens_per_s"],
            r["tokens_per_s"] / base["tokens_per_s"],
            r["prefill_s"],
            r["lora_in_prefill_s"],
            r["decode_steps"],
            r["decode_step_ms"],
            r["decode_lora_ms"],
            r["cached"],
        )
        for name, r in med.items()
    ]
    lines = [
        f"{args.requests} x {args.new_tokens}, {args.adapters} adapters r{args.rank}, "
        f"median of {args.repeats} rounds (the engine in-process, default settings"
        f"{', no prefix cache' if args.no_prefix_cache else ''})",
        *format_table(cols, rows),
        f"decode LoRA floor: {weights / 1e6:.1f} MB of adapter weights a step / "
        f"{bandwidth / 1e9:.1f} GB/s read = {floor_ms:.1f} ms a step "
        f"(measured {mixed['decode_lora_ms']:.1f})",
        f"{args.adapters} mixed at that floor: {at_floor:.1f} tok/s, "
        f"{at_floor / base['tokens_per_s']:.3f}x base; with the prompt LoRA free as well: "
        f"{no_lora:.1f} tok/s, {no_lora / base['tokens_per_s']:.3f}x base",
        f"compute roofline at {rate / 1e9:.1f} GFLOPS (the best {dtype} matmul measured):",
        *(
            f"  {name}: {r['flop'] / 1e12:.3f} TFLOP a burst, at most "
            f"{tokens * rate / r['flop']:.1f} tok/s; measured "
            f"{r['tokens_per_s'] * r['flop'] / (tokens * rate):.0%} of it"
            for name, r in med.items()
        ),
    ]
    result = {
        "requests": args.requests,
        "new_tokens": args.new_tokens,
        "adapters": args.adapters,
        "rank": args.rank,
        "runs": runs,
        "medians": med,
        "adapter_bytes_per_decode_step": weights,
        "read_bytes_per_s": bandwidth,
        "floor_ms": floor_ms,
        "at_floor_tokens_per_s": at_floor,
        "at_floor_prompt_lora_free_tokens_per_s": no_lora,
        "prefix_cache": not args.no_prefix_cache,
        "preloaded": preloaded,
        "matmul_flop_per_s": rate,
        "compute_dtype": dtype,
        "roofline_tokens_per_s": {name: tokens * rate / r["flop"] for name, r in med.items()},
    }
    publish(result, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
