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
    systems alternating within each repeat because the machine is shared and noisy; and the
    longest wait of any request between two of its outputs, over the repeats (a merge that
    stopped the steps shows there).
    Time to merge and to unmerge. Greedy outputs of 20 prompts on adapter 0, merged vs not.

    python benchmarks/merge.py [--requests 32] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import logging
import statistics
import time
from pathlib import Path

import torch

from loraplex.adapters.compose import compose
from loraplex.core.types import AdapterVersion, AdapterWeights
from loraplex.server.config import EngineConfig, MergeSettings

from harness import (
    EngineBench,
    Job,
    add_common_args,
    bench_prompts,
    in_child,
    make_parser,
    publish,
    setup_logging,
    work_dir,
    write_adapters,
)

log = logging.getLogger("benchmark")

METHODS = ("linear", "cat", "ties", "dare_linear", "dare_ties")


def merged_vs_unmerged(
    bench: EngineBench, greedy: list[Job], new_tokens: int
) -> tuple[dict, dict, str]:
    """Greedy outputs of the same requests on adapter 0 unmerged and merged (identical, or where
    they first differ), and the first-token logits' drift; and the lines that say so."""
    adapter, weights = greedy[0].adapter, greedy[0].weights
    assert adapter is not None
    engine = bench.engine
    _, unmerged_out = bench.run(greedy, new_tokens, ignore_eos=False)
    engine.merge(adapter, weights).result()
    _, merged_out = bench.run(greedy, new_tokens, ignore_eos=False)
    engine.unmerge().result()
    same = sum(a == b for a, b in zip(unmerged_out, merged_out, strict=True))
    diverge = [
        next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        for a, b in zip(unmerged_out, merged_out, strict=True)
        if a != b
    ]
    drift = first_step_drift(bench, [job.prompt for job in greedy], adapter)
    line = (
        f"greedy outputs merged vs unmerged: {same}/{len(greedy)} identical"
        + (f", first divergence at tokens {diverge}" if diverge else "")
        + "\nfirst-token logits merged vs unmerged: max |diff| {max_abs:.3f}, mean {mean_abs:.4f} "
        "(logits up to {logit_scale:.1f}); same top token {same_top1}/{prompts}".format(**drift)
    )
    return {"prompts": len(greedy), "identical": same, "first_divergence": diverge}, drift, line


def first_step_drift(bench: EngineBench, prompts: list[list[int]], adapter: AdapterVersion) -> dict:
    """First-token logits of each prompt on `adapter`, merged vs unmerged: |merged - unmerged|
    (largest and mean over prompts and vocabulary), and how many prompts keep their top token."""
    engine = bench.engine

    def logits() -> torch.Tensor:
        # Nothing else runs between these calls: the adapter's slot stays where it is.
        slot = bench.snapshot().slot_of(adapter.key)
        assert slot is not None
        return engine.with_model(
            lambda runner: torch.cat([runner.prefill([p], [slot]) for p in prompts])
        ).result()

    engine.merge(adapter).result()
    merged = logits()
    engine.unmerge().result()
    unmerged = logits()  # its slot stays resident: nothing else runs
    diff = (merged - unmerged).abs()
    return {
        "max_abs": float(diff.max()),
        "mean_abs": float(diff.mean()),
        "logit_scale": float(unmerged.abs().max()),
        "same_top1": int((merged.argmax(-1) == unmerged.argmax(-1)).sum()),
        "prompts": len(prompts),
    }


def composed_version(name: str, weights: AdapterWeights) -> AdapterVersion:
    return AdapterVersion(
        adapter_id=name,
        version=1,
        digest=f"composed:{name}",
        rank=weights.rank,
        lora_alpha=weights.lora_alpha,
        target_modules=weights.target_modules,
        size_bytes=0,
        created_at="",
        source="benchmark",
        base_model_fingerprint="",
    )


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--greedy-prompts", type=int, default=20)
    parser.add_argument(
        "--drift-only", action="store_true", help="only merged vs unmerged outputs (quick)"
    )
    add_common_args(parser, "merge")
    args = parser.parse_args()
    setup_logging()
    home = Path(args.home).expanduser()
    config = EngineConfig(
        max_batch_size=args.requests,
        max_loras=8,
        max_lora_rank=8 * args.rank,
        merge=MergeSettings(policy="off"),
    )
    with work_dir("loraplex-merge-bench-") as work, EngineBench(config, home, work) as bench:
        result, lines = measure(args, bench, home, work)
    publish(result, lines, args.out)
    return 0


def measure(args, bench: EngineBench, home: Path, work: Path) -> tuple[dict, list[str]]:
    """Every measurement (only the greedy outputs and drift with --drift-only): the results
    and the lines of the tables."""
    n, m = args.requests, args.new_tokens
    info = bench.start()
    engine, on_engine = bench.engine, bench.on_engine
    dirs = in_child(write_adapters, str(home), 8, args.rank, str(work / "peft"))
    versions = bench.register(dirs)
    weights = [bench.load_weights(v) for v in versions]
    prompts = bench_prompts(info.tokenizer, max(n, args.greedy_prompts))
    order = list(info.target_shapes)
    result: dict = {"config": vars(args)}
    greedy = [Job(p, versions[0], weights[0]) for p in prompts[: args.greedy_prompts]]
    if args.drift_only:
        result["greedy"], result["drift"], line = merged_vs_unmerged(bench, greedy, m)
        return result, [line]

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
    bench.run([Job(prompts[0])], 2)  # warm-up
    log.info("serving composed adapters")
    for _ in range(args.repeats):
        seconds, _ = bench.run([Job(p, plain, weights[0]) for p in prompts[:n]], m)
        serving["plain adapter"].append(n * m / seconds)
        for name, w in composed.items():
            version = composed_version(name.replace(" ", "-"), w)
            seconds, _ = bench.run([Job(p, version, w) for p in prompts[:n]], m)
            serving[name].append(n * m / seconds)
    result["compose_serving"] = {k: statistics.median(v) for k, v in serving.items()}

    # -- dynamic merge -----------------------------------------------------------------------
    def workload(share: float) -> list[Job]:
        jobs: list[Job] = []
        on_top = round(share * n)
        for i, p in enumerate(prompts[:n]):
            k = 0 if i < on_top else 1 + i % 3
            jobs.append(Job(p, versions[k], weights[k]))
        return jobs

    rates: dict[str, list[float]] = {}
    gaps: dict[str, list[float]] = {}  # the longest wait of a request between two outputs
    merge_s, unmerge_s, auto_merged = [], [], {}
    for repeat in range(args.repeats):
        log.info("dynamic merge, repeat %d of %d", repeat + 1, args.repeats)
        seconds, _ = bench.run([Job(p) for p in prompts[:n]], m)
        rates.setdefault("base only", []).append(n * m / seconds)
        for share in (1.0, 0.9, 0.5):
            jobs = workload(share)
            for system in ("never merged", "merged", "auto policy"):
                engine.unmerge().result()
                engine.configure_merges(
                    MergeSettings() if system == "auto policy" else MergeSettings(policy="off")
                ).result()
                if system == "merged":
                    engine.merge(versions[0], weights[0]).result()
                    merge_s.append(bench.snapshot().merge.last_merge_s)
                before = bench.snapshot().merge.merges
                seconds, _ = bench.run(jobs, m)
                rates.setdefault(f"{share:.0%} {system}", []).append(n * m / seconds)
                gaps.setdefault(f"{share:.0%} {system}", []).append(bench.longest_gap_s)
                after = bench.snapshot().merge
                if system == "auto policy":  # merges the policy made in this run (last repeat)
                    auto_merged[f"{share:.0%}"] = after.merges - before
                if after.adapter is not None:
                    engine.unmerge().result()
                    unmerge_s.append(bench.snapshot().merge.last_unmerge_s)
    engine.configure_merges(MergeSettings(policy="off")).result()
    medians = {k: statistics.median(v) for k, v in rates.items()}
    result["merge_throughput"] = medians
    result["longest_gap_ms"] = {k: max(v) * 1e3 for k, v in gaps.items()}
    result["merge_seconds"] = statistics.median(merge_s)
    result["unmerge_seconds"] = statistics.median(unmerge_s)
    result["greedy"], result["drift"], drift_line = merged_vs_unmerged(bench, greedy, m)

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
    lines.append(f"{'workload':<24}{'tok/s':>9}{'x base':>8}{'x never':>9}{'longest gap ms':>16}")
    lines.append(f"{'base only':<24}{base:>9.1f}{1.0:>8.2f}")
    for percent in ("100%", "90%", "50%"):
        never = medians[f"{percent} never merged"]
        for system in ("never merged", "merged", "auto policy"):
            rate = medians[f"{percent} {system}"]
            label = f"{percent} {system}"
            if system == "auto policy":
                label += f" ({auto_merged[percent]} merge)"
            gap = result["longest_gap_ms"][f"{percent} {system}"]
            lines.append(
                f"{label:<24}{rate:>9.1f}{rate / base:>8.2f}{rate / never:>9.2f}{gap:>16.0f}"
            )
    lines += [
        "",
        f"merge {result['merge_seconds'] * 1e3:.0f} ms, unmerge "
        f"{result['unmerge_seconds'] * 1e3:.1f} ms (medians)",
        drift_line,
    ]
    return result, lines


if __name__ == "__main__":
    raise SystemExit(main())
