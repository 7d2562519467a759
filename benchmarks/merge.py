"""Merge on demand, measured: composing adapters, and folding a dominant adapter into the base.

Composition (adapters/compose.py, as a request's `compose` builds it):
    build time of 2, 4 and 8 rank-16 all-linear inputs for every method (median of --repeats);
    serving throughput of a composed adapter (linear of 2: rank 16; cat of 2: rank 32) against
    a plain adapter, every request on it.

Dynamic merge (the engine, offline; N requests x M new tokens, EOS ignored):
    workloads with 100%, 90% and 50% of the requests on adapter 0 (the rest spread over three
    others), each run never merged, merged (adapter 0 pinned into the base first) and under the
    automatic policy (its default settings, starting unmerged); plus base-only (no adapter):
    throughput and its ratio to base-only and to never merging, medians of --repeats, the
    systems alternating within each repeat because the machine is shared and noisy.
    Time to merge and to unmerge. Greedy outputs of 20 prompts on adapter 0, merged vs not.

    python benchmarks/merge.py [--requests 32] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from multiprocessing import get_context
from pathlib import Path

import torch
from common import bench_prompts
from throughput import write_adapters

from loraplex.adapters.compose import compose
from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.store import AdapterStore
from loraplex.core.config import ModelConfig
from loraplex.core.model import load_model
from loraplex.core.types import AdapterVersion, AdapterWeights, BaseModelSpec
from loraplex.server.config import EngineConfig, MergeSettings
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.merging import MergePolicy
from loraplex.server.engine.model_runner import ModelRunner
from loraplex.server.engine.request import EngineRequest, RequestOutput, SamplingParams

log = logging.getLogger("benchmark")

Job = tuple[list[int], AdapterVersion | None, AdapterWeights | None]
METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties")


def run(engine: Engine, jobs: list[Job], new_tokens: int, ignore_eos: bool = True) -> tuple:
    """Submit every job at once; (seconds until the last finished, tokens of each job)."""
    outputs: list[list[int]] = [[] for _ in jobs]
    remaining = len(jobs)
    done = threading.Event()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def emitter(i: int):
        def emit(item: RequestOutput | BaseException) -> None:
            nonlocal remaining
            if isinstance(item, BaseException):
                errors.append(item)
                done.set()
                return
            outputs[i].extend(item.token_ids)
            if item.finish_reason is not None:
                with lock:
                    remaining -= 1
                    if remaining == 0:
                        done.set()

        return emit

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=ignore_eos)
    start = time.perf_counter()
    for i, (ids, adapter, weights) in enumerate(jobs):
        engine.submit(EngineRequest(f"m{i}", ids, params, adapter, emitter(i), weights))
    if not done.wait(3600) or errors:
        raise RuntimeError(f"the engine failed: {errors[:1]}")
    return time.perf_counter() - start, outputs


def merged_vs_unmerged(
    engine: Engine, runner: ModelRunner, greedy: list[Job], new_tokens: int
) -> tuple[dict, dict, str]:
    """Greedy outputs of the same requests on adapter 0 unmerged and merged (identical, or where
    they first differ), and the first-token logits' drift; and the lines that say so."""
    adapter, weights = greedy[0][1], greedy[0][2]
    assert adapter is not None
    _, unmerged_out = run(engine, greedy, new_tokens, ignore_eos=False)
    engine.call(lambda: engine.merge_pinned(adapter, weights)).result()
    _, merged_out = run(engine, greedy, new_tokens, ignore_eos=False)
    engine.call(engine.unmerge_pinned).result()
    same = sum(a == b for a, b in zip(unmerged_out, merged_out, strict=True))
    diverge = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        for a, b in zip(unmerged_out, merged_out, strict=True)
        if a != b
    ]
    drift = first_step_drift(engine, runner, [p for p, _, _ in greedy], adapter)
    line = (
        f"greedy outputs merged vs unmerged: {same}/{len(greedy)} identical"
        + (f", first divergence at tokens {diverge}" if diverge else "")
        + "\nfirst-token logits merged vs unmerged: max |diff| {max_abs:.3f}, mean {mean_abs:.4f} "
        "(logits up to {logit_scale:.1f}); same top token {same_top1}/{prompts}".format(**drift)
    )
    return {"prompts": len(greedy), "identical": same, "first_divergence": diverge}, drift, line


def first_step_drift(
    engine: Engine, runner: ModelRunner, prompts: list[list[int]], adapter: AdapterVersion
) -> dict:
    """First-token logits of each prompt on `adapter`, merged vs unmerged: |merged - unmerged|
    (largest and mean over prompts and vocabulary), and how many prompts keep their top token."""

    def logits() -> torch.Tensor:
        slot = engine.slots.lookup(adapter.key)
        assert slot is not None
        return torch.cat([runner.prefill([p], [slot]) for p in prompts])

    engine.call(lambda: engine.merge_pinned(adapter)).result()
    merged = engine.call(logits).result()
    engine.call(engine.unmerge_pinned).result()
    unmerged = engine.call(logits).result()  # its slot stays resident: nothing else runs
    diff = (merged - unmerged).abs()
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "logit_scale": float(unmerged.abs().max()),
        "same_top1": int((merged.argmax(-1) == unmerged.argmax(-1)).sum()),
        "prompts": len(prompts),
    }


def composed_version(name: str, weights: AdapterWeights) -> AdapterVersion:
    return AdapterVersion(name, 1, f"composed:{name}", weights.rank, weights.lora_alpha,
                          weights.target_modules, 0, "", "benchmark", "")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--greedy-prompts", type=int, default=20)
    parser.add_argument(
        "--drift-only", action="store_true", help="only merged vs unmerged outputs (quick)"
    )
    parser.add_argument("--home", default=os.environ.get("LORAPLEX_HOME", "~/.cache/loraplex"))
    parser.add_argument("--out", default="benchmarks/results/merge.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    n, m, home = args.requests, args.new_tokens, Path(args.home).expanduser()
    config = EngineConfig(
        max_batch_size=n,
        max_loras=8,
        max_lora_rank=8 * args.rank,
        merge=MergeSettings(policy="off"),
    )
    engine = Engine(
        lambda: ModelRunner.from_config(load_model(ModelConfig(home=home)), config), config
    )
    runner = engine.start()

    def on_engine(fn):
        return engine.call(fn).result()

    work = tempfile.mkdtemp(prefix="loraplex-merge-bench-")
    with get_context("spawn").Pool(1) as pool:
        dirs = pool.apply(write_adapters, (str(home), 8, args.rank, f"{work}/peft"))
    spec = BaseModelSpec(runner.target_shapes, config.max_lora_rank, runner.loaded.fingerprint)
    registry = AdapterRegistry(AdapterStore(Path(work) / "store"), spec, [Path(work)])
    versions = on_engine(lambda: [registry.register(Path(d).name, d)[0] for d in dirs])
    weights = [registry.load_weights(v) for v in versions]
    engine.load_weights = registry.load_weights
    prompts = bench_prompts(runner.loaded.tokenizer, max(n, args.greedy_prompts))
    order = list(runner.target_shapes)
    result: dict = {"config": vars(args)}
    greedy = [(p, versions[0], weights[0]) for p in prompts[: args.greedy_prompts]]
    if args.drift_only:
        result["greedy"], result["drift"], line = merged_vs_unmerged(engine, runner, greedy, m)
        engine.stop()
        sys.stdout.write(line + "\n")
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return 0

    # -- composition: build times ------------------------------------------------------------
    builds = []
    log.info("composition build times")
    for k in (2, 4, 8):
        parts = [(w, 1.0 / k) for w in weights[:k]]
        for method in METHODS:
            density = 0.5 if method in ("ties", "dare_linear", "dare_ties") else None

            def build(parts=parts, method=method, density=density) -> AdapterWeights:
                return compose(parts, method, density=density, seed=0, module_order=order)

            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                on_engine(build)
                times.append(time.perf_counter() - start)
            builds.append({"inputs": k, "method": method, "ms": statistics.median(times) * 1e3})
    result["compose_build"] = builds

    # -- composition: serving ------------------------------------------------------------------
    plain = versions[0]
    composed = {
        "linear of 2": compose(
            [(weights[0], 0.5), (weights[1], 0.5)], "linear", module_order=order
        ),
        "cat of 2": compose([(weights[0], 0.5), (weights[1], 0.5)], "cat", module_order=order),
    }
    serving: dict[str, list[float]] = {"plain adapter": []}
    for name in composed:
        serving[name] = []
    run(engine, [(prompts[0], None, None)], 2)  # warm-up
    log.info("serving composed adapters")
    for _ in range(args.repeats):
        seconds, _ = run(engine, [(p, plain, weights[0]) for p in prompts[:n]], m)
        serving["plain adapter"].append(n * m / seconds)
        for name, w in composed.items():
            version = composed_version(name.replace(" ", "-"), w)
            seconds, _ = run(engine, [(p, version, w) for p in prompts[:n]], m)
            serving[name].append(n * m / seconds)
    result["compose_serving"] = {k: statistics.median(v) for k, v in serving.items()}

    # -- dynamic merge -----------------------------------------------------------------------
    def workload(share: float) -> list[Job]:
        jobs: list[Job] = []
        on_top = round(share * n)
        for i, p in enumerate(prompts[:n]):
            k = 0 if i < on_top else 1 + i % 3
            jobs.append((p, versions[k], weights[k]))
        return jobs

    def merged(on: bool) -> None:
        if on:
            on_engine(lambda: engine.merge_pinned(versions[0], weights[0]))
        else:
            on_engine(engine.unmerge_pinned)

    rates: dict[str, list[float]] = {}
    merge_s, unmerge_s, auto_merged = [], [], {}
    for repeat in range(args.repeats):
        log.info("dynamic merge, repeat %d of %d", repeat + 1, args.repeats)
        seconds, _ = run(engine, [(p, None, None) for p in prompts[:n]], m)
        rates.setdefault("base only", []).append(n * m / seconds)
        for share in (1.0, 0.9, 0.5):
            jobs = workload(share)
            for system in ("never merged", "merged", "auto policy"):
                merged(False)
                engine.merge_policy = MergePolicy(
                    MergeSettings() if system == "auto policy" else MergeSettings(policy="off")
                )
                if system == "merged":
                    merged(True)
                    merge_s.append(engine.merge.last_merge_s)
                before = engine.merge.merges
                seconds, _ = run(engine, jobs, m)
                rates.setdefault(f"{share:.0%} {system}", []).append(n * m / seconds)
                if system == "auto policy":  # merges the policy made in this run (last repeat)
                    auto_merged[f"{share:.0%}"] = engine.merge.merges - before
                if engine.merge.key is not None:
                    merged(False)
                    unmerge_s.append(engine.merge.last_unmerge_s)
    engine.merge_policy = MergePolicy(MergeSettings(policy="off"))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    result["merge_throughput"] = medians
    result["merge_seconds"] = statistics.median(merge_s)
    result["unmerge_seconds"] = statistics.median(unmerge_s)
    result["greedy"], result["drift"], drift_line = merged_vs_unmerged(engine, runner, greedy, m)

    engine.stop()

    # -- tables ----------------------------------------------------------------------------------
    lines = [f"Composition build time (ms, median of {args.repeats}), rank-{args.rank} inputs"]
    lines.append(f"{'inputs':<8}" + "".join(f"{mth:>13}" for mth in METHODS))
    for k in (2, 4, 8):
        row = {b["method"]: b["ms"] for b in builds if b["inputs"] == k}
        lines.append(f"{k:<8}" + "".join(f"{row[mth]:>13.1f}" for mth in METHODS))
    plain_rate = result["compose_serving"]["plain adapter"]
    lines += ["", f"Serving a composed adapter ({n} requests x {m} tokens)"]
    for name, rate in result["compose_serving"].items():
        lines.append(f"{name:<16}{rate:>9.1f} tok/s {rate / plain_rate:>6.2f}x plain")
    base = medians["base only"]
    lines += ["", f"Dynamic merge ({n} requests x {m} tokens, median of {args.repeats})"]
    lines.append(f"{'workload':<24}{'tok/s':>9}{'x base':>8}{'x never':>9}")
    lines.append(f"{'base only':<24}{base:>9.1f}{1.0:>8.2f}")
    for share in ("100%", "90%", "50%"):
        never = medians[f"{share} never merged"]
        for system in ("never merged", "merged", "auto policy"):
            rate = medians[f"{share} {system}"]
            label = f"{share} {system}"
            if system == "auto policy":
                label += f" ({auto_merged[share]} merge)"
            lines.append(f"{label:<24}{rate:>9.1f}{rate / base:>8.2f}{rate / never:>9.2f}")
    lines += [
        "",
        f"merge {result['merge_seconds'] * 1e3:.0f} ms, unmerge "
        f"{result['unmerge_seconds'] * 1e3:.1f} ms (medians)",
        drift_line,
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
