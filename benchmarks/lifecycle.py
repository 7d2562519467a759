"""Adapter lifecycle through the real gRPC server: load tiers, churn over many adapters, hot swap.

Each phase runs against a `loraplex serve` subprocess (port 0, a temporary adapter store and
adapter root, removed at the end); adapters and prompts are made in spawned child processes.

    1. cold vs warm   --max-loras 4, 6 random r=8 all-linear adapters (~10 MB each), short
                      greedy requests (4 new tokens) one at a time. TTFT of an adapter's first
                      request (cold: store -> host -> device); then, cycling twice over the 6
                      adapters so each was evicted from its slot, of host hits (host ->
                      device); and right after each of those, of the same adapter again (warm:
                      a device hit). The base model, interleaved, is the baseline. Each
                      request's GetCacheStats delta checks it was the case meant.
                      "Cold" is cold for loraplex: the OS page cache may hold the store's files.
    2. churn          --max-loras 16 --host-cache-mb 64 --max-batch-size 32. --adapters small
                      r=4 q_proj,v_proj adapters are registered (timed); then every adapter once
                      plus --requests Zipf(--zipf) draws, shuffled (seeded), as short chat
                      prompts (~65-80 tokens: the template's system prompt alone is ~40), 8 new
                      tokens greedy, from --concurrency closed-loop streaming clients. Baselines
                      on the same server and sequence: the base model alone; afterwards, with
                      the server stopped, stock PEFT one request at a time with a load per
                      request (load_adapter, set_adapter, generate, delete_adapter; one torch
                      thread, as the engine) on a --peft-sample sample of the sequence.
    3. hot swap       on the churn server, --swap-seconds of 16 closed-loop clients on swap-0..3
                      while a new version of one of them (alternating two weight files) is
                      registered every second, plus 2 clients on `flip`, deleted every 5 s and
                      registered again 2 s later. NOT_FOUND for flip is expected (refused); any
                      other non-OK status is a failure; lost = sent - completed - failed -
                      refused. Every completed stream must name one version, not older than
                      the latest registered before it was sent.

Tier hit rates are hits / (hits + misses) of the GetCacheStats deltas over a phase. The machine
is noisy: read the medians and the ratios to the baselines measured in the same run.

    python benchmarks/lifecycle.py [--adapters 1000] [--requests 1000] [--zipf 1.0]
        [--concurrency 32] [--swap-seconds 30] [--peft-sample 16] [--quick]

--quick shrinks everything for a smoke run. Extra `loraplex serve` flags (--serve-args, one
shell-quoted string) go to both servers, after the benchmark's own, so they override them.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from loraplex.server.client import LoraplexClient
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

from harness import (
    ADAPTER_PREFIX,
    WEIGHTS,
    RandomAdapters,
    StreamResult,
    add_common_args,
    add_server_args,
    cell,
    child_pool,
    in_child,
    latency_ms,
    load_base,
    make_adapters,
    make_parser,
    peak_rss_bytes,
    prompt_texts,
    publish,
    register_adapters,
    run_main,
    server_flags,
    server_process,
    setup_logging,
    stream_one,
    summarize_streams,
    user_message,
    work_dir,
)

log = logging.getLogger("benchmark")

LOAD_ADAPTERS = 6  # with 4 slots, cycling over 6 evicts each adapter before its next request
LOAD_SLOTS = 4
LOAD_RANK = 8
CHURN_FLAGS = ["--max-loras", "16", "--host-cache-mb", "64", "--max-batch-size", "32"]
CHURN_NEW_TOKENS = 8
SWAP_IDS = [f"swap-{i}" for i in range(4)]
SWAP_CLIENTS = 16
FLIP = "flip"
FLIP_CLIENTS = 2
FLIP_PERIOD = 5.0  # seconds between deletes of flip
FLIP_GAP = 2.0  # seconds flip stays deleted
COUNTERS = ("hits", "misses", "loads", "evictions", "load_seconds", "load_failures")


# -- set-up in child processes (the base model they load never weighs on this process) ---------
def short_prompts(tokenizer: Any, n: int) -> list[str]:
    # Short chat prompts: SmolLM2's template with its system prompt and one sentence is ~65
    # tokens already.
    return prompt_texts(tokenizer, n, 48, 80)


def prepare_load(home: str, model: str | None, out: str) -> tuple[str, int]:
    """The cold/warm adapters bench-0..5 under out/; returns a prompt and one file's size."""
    loaded = load_base(home, model)
    dirs = make_adapters(loaded.model, LOAD_ADAPTERS, LOAD_RANK, Path(out))
    return short_prompts(loaded.tokenizer, 1)[0], (dirs[0] / WEIGHTS).stat().st_size


def prepare_churn(home: str, model: str | None, n: int, out: str, n_prompts: int) -> list[str]:
    """n small adapters tenant-0000.. , swap-i/a and swap-i/b (B halved: new content), and flip
    under out/; returns n_prompts prompts. (RandomAdapters: PEFT lays out one template, the
    rest are written directly with fresh random weights.)"""
    from peft import LoraConfig

    loaded = load_base(home, model)
    root = Path(out)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    adapters = RandomAdapters(loaded.model, config, root, "template", seed=1)
    log.info("writing %d random r=4 q_proj,v_proj adapters under %s", n, root)
    for i in range(n):
        adapters.write(f"tenant-{i:04d}", adapters.random_weights())
    for name in [*SWAP_IDS, FLIP]:
        first = adapters.random_weights()
        adapters.write(f"{name}/a", first)
        adapters.write(f"{name}/b", {k: t * 0.5 if "lora_B" in k else t for k, t in first.items()})
    return short_prompts(loaded.tokenizer, n_prompts)


def peft_baseline(
    home: str, model: str | None, sample: list[tuple[str, str]], new_tokens: int
) -> dict:
    """Stock PEFT, one request at a time, the adapter loaded for each: (adapter dir, prompt)."""
    import torch
    from peft import PeftModel

    loaded = load_base(home, model)
    torch.set_num_threads(1)  # as the server's engine thread
    tokenizer: Any = loaded.tokenizer
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    # A resident adapter to fall back on: the request's own is deleted after it.
    peft_model = PeftModel.from_pretrained(loaded.model, sample[0][0], adapter_name="resident")
    peft_model.eval()

    def one(directory: str, prompt: str) -> tuple[float, float, int]:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        start = time.perf_counter()
        peft_model.load_adapter(directory, adapter_name="request")
        peft_model.set_adapter("request")
        loaded_at = time.perf_counter()
        with torch.inference_mode():
            out = peft_model.generate(
                input_ids=ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
            )
        peft_model.set_adapter("resident")
        peft_model.delete_adapter("request")
        return time.perf_counter() - start, loaded_at - start, out.shape[1] - ids.shape[1]

    one(*sample[0])  # warm-up: lazy initialisation is not what is measured
    log.info("PEFT: %d requests one at a time, a load each", len(sample))
    runs = [one(d, p) for d, p in sample]
    seconds = sum(r[0] for r in runs)
    tokens = sum(r[2] for r in runs)
    return {
        "requests": len(runs),
        "errors": 0,
        "completion_tokens": tokens,
        "seconds": seconds,
        "output_tokens_per_s": tokens / seconds,
        "requests_per_s": len(runs) / seconds,
        "mean_load_ms": statistics.mean(r[1] for r in runs) * 1e3,
        "e2e_ms": latency_ms([r[0] for r in runs]),
    }


# -- the cache counters ------------------------------------------------------------------------
async def tier_counters(admin: adapters_pb2_grpc.AdaptersStub) -> dict[str, dict[str, float]]:
    stats = await admin.GetCacheStats(adapters_pb2.GetCacheStatsRequest(), timeout=60)
    return {t.tier: {c: getattr(t, c) for c in COUNTERS} for t in stats.tiers}


def counter_delta(before: dict, after: dict) -> dict[str, dict]:
    """Per tier: counter differences, hit rate and mean load time over the interval."""
    out = {}
    for tier, counts in after.items():
        d = {c: counts[c] - before[tier][c] for c in COUNTERS}
        lookups = d["hits"] + d["misses"]
        d["hit_rate"] = d["hits"] / lookups if lookups else None
        d["mean_load_ms"] = d["load_seconds"] / d["loads"] * 1e3 if d["loads"] else None
        out[tier] = d
    return out


# -- 1. cold vs warm ---------------------------------------------------------------------------
# (host tier, device tier) outcome each case must show in its request's counter delta.
LOAD_CASES = {"cold": ("misses", "misses"), "warm": ("hits", "hits"), "host": ("hits", "misses")}


async def load_phase(address: str, ids: list[str], prompt: str, args: argparse.Namespace) -> dict:
    ttfts: dict[str, list[float]] = {"base": [], "warm": [], "host": [], "cold": []}
    loads = {"host": [0, 0.0], "device": [0, 0.0]}  # tier -> [loads, seconds]
    mismatches: list[str] = []
    async with grpc.aio.insecure_channel(address) as channel:
        infer = inference_pb2_grpc.InferenceStub(channel)
        admin = adapters_pb2_grpc.AdaptersStub(channel)

        async def measure(case: str | None, adapter_id: str) -> None:
            """One request; its TTFT is recorded under `case` (None: a warm-up)."""
            request = inference_pb2.GenerateRequest(
                adapter_id=adapter_id,
                messages=user_message(prompt),
                max_new_tokens=4,
                temperature=0.0,
            )
            before = await tier_counters(admin)
            result = await stream_one(infer, request, args.request_timeout)
            delta = counter_delta(before, await tier_counters(admin))
            if result.error is not None or result.ttft is None:
                raise RuntimeError(f"{case} request for {adapter_id!r} failed: {result.error}")
            if case is None:
                return
            ttfts[case].append(result.ttft)
            for tier, count in loads.items():
                count[0] += delta[tier]["loads"]
                count[1] += delta[tier]["load_seconds"]
            want = LOAD_CASES.get(case)  # base requests touch no tier
            if want and (delta["host"][want[0]], delta["device"][want[1]]) != (1, 1):
                host, device = ({c: delta[t][c] for c in COUNTERS[:4]} for t in ("host", "device"))
                mismatches.append(f"{case} {adapter_id}: host {host}, device {device}")

        for _ in range(2):
            await measure(None, "")
        for adapter_id in ids:
            await measure("cold", adapter_id)
            await measure("warm", adapter_id)
            await measure("base", "")
        for _ in range(2):
            for adapter_id in ids:
                await measure("host", adapter_id)
                await measure("warm", adapter_id)
                await measure("base", "")
    if mismatches:
        log.warning("%d requests were not the cache case meant: %s", len(mismatches), mismatches)
    base = statistics.median(ttfts["base"])
    return {
        "cases": {
            case: {
                "n": len(values),
                "ttft_ms_p50": statistics.median(values) * 1e3,
                "ttft_ms": latency_ms(values),
                "x_base": statistics.median(values) / base,
            }
            for case, values in ttfts.items()
        },
        "store_to_host": _mean_load(*loads["host"]),
        "host_to_device": _mean_load(*loads["device"]),
        "case_mismatches": mismatches,
    }


def _mean_load(n: float, seconds: float) -> dict:
    return {"loads": int(n), "mean_ms": seconds / n * 1e3 if n else None}


# -- 2. churn ----------------------------------------------------------------------------------
def churn_sequence(ids: list[str], draws: int, s: float, seed: int) -> list[str]:
    """Every adapter once plus `draws` Zipf(s) draws over a seeded popularity order, shuffled."""
    rng = random.Random(seed)
    ranked = ids[:]
    rng.shuffle(ranked)
    weights = [1 / (k + 1) ** s for k in range(len(ranked))]
    sequence = ids + rng.choices(ranked, weights, k=draws)
    rng.shuffle(sequence)
    return sequence


async def register_all(address: str, items: list[tuple[str, str]], concurrency: int) -> float:
    """RegisterAdapter for every (id, path), `concurrency` at a time; seconds taken."""
    pending = iter(items)
    async with grpc.aio.insecure_channel(address) as channel:
        admin = adapters_pb2_grpc.AdaptersStub(channel)

        async def worker() -> None:
            for adapter_id, path in pending:  # one shared iterator: each item once
                request = adapters_pb2.RegisterAdapterRequest(adapter_id=adapter_id, path=path)
                await admin.RegisterAdapter(request, timeout=600)

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


async def closed_loop(
    address: str, sequence: list[str], prompts: list[str], args: argparse.Namespace
) -> dict:
    """The sequence's requests from --concurrency clients, each sending its next request when
    the last one ends; summary plus distinct adapters served and the tier counter deltas."""
    results: list[StreamResult] = []
    pending = iter(enumerate(sequence))
    async with grpc.aio.insecure_channel(address) as channel:
        infer = inference_pb2_grpc.InferenceStub(channel)
        admin = adapters_pb2_grpc.AdaptersStub(channel)

        async def client() -> None:
            for i, adapter_id in pending:
                request = inference_pb2.GenerateRequest(
                    adapter_id=adapter_id,
                    messages=user_message(prompts[i % len(prompts)]),
                    max_new_tokens=CHURN_NEW_TOKENS,
                    temperature=0.0,
                )
                results.append(await stream_one(infer, request, args.request_timeout))
                if len(results) % 250 == 0:
                    log.info("%d of %d requests done", len(results), len(sequence))

        before = await tier_counters(admin)
        await asyncio.gather(*(client() for _ in range(args.concurrency)))
        tiers = counter_delta(before, await tier_counters(admin))
    row = summarize_streams(results)
    row["distinct_adapters"] = len({r.adapter_id for r in results if r.error is None} - {""})
    row["tiers"] = tiers
    return row


# -- 3. hot swap -------------------------------------------------------------------------------
@dataclass
class SwapRecord:
    adapter_id: str
    floor: int
    """The oldest version that may serve it: the latest whose registration had returned when
    it was sent (the next one if flip's delete had returned)."""
    flip_state: str
    """For flip: "present", "deleted" or "changing" when sent (a delete or register running)."""
    deletes_at_send: int
    status: str | None = None
    """None until answered: "OK" or a gRPC status name."""
    detail: str = ""
    finish_reason: str = ""
    versions: set[int] = field(default_factory=set)
    ids: set[str] = field(default_factory=set)
    deletes_at_end: int = 0
    ttft: float | None = None


async def stream_versions(
    infer: inference_pb2_grpc.InferenceStub,
    request: inference_pb2.GenerateRequest,
    record: SwapRecord,
    timeout: float,
) -> None:
    start = time.perf_counter()
    try:
        async for chunk in infer.GenerateStream(request, timeout=timeout):
            record.versions.add(chunk.adapter_version)
            record.ids.add(chunk.adapter_id)
            if chunk.token_ids and record.ttft is None:
                record.ttft = time.perf_counter() - start
            record.finish_reason = chunk.finish_reason or record.finish_reason
        record.status = "OK"
    except grpc.aio.AioRpcError as exc:
        record.status = exc.code().name
        record.detail = exc.details() or ""


class HotSwap:
    """Phase 3 on one channel: streaming clients, an operator registering new versions of the
    swap adapters, another deleting and registering flip, and a record of every request."""

    def __init__(
        self, channel: grpc.aio.Channel, root: Path, prompts: list[str], args: argparse.Namespace
    ) -> None:
        self.infer = inference_pb2_grpc.InferenceStub(channel)
        self.admin = adapters_pb2_grpc.AdaptersStub(channel)
        self.root = root
        self.prompts = prompts
        self.args = args
        self.latest: dict[str, int] = {}  # adapter id -> latest version registered
        self.variant = dict.fromkeys([*SWAP_IDS, FLIP], 0)  # its weight file now: a or b
        self.registered = 0
        self.flip_state = "present"
        self.deletes = 0
        self.records: list[SwapRecord] = []
        self.deadline = 0.0

    async def run(self) -> dict:
        for adapter_id in [*SWAP_IDS, FLIP]:
            await self.register(adapter_id)
        self.deadline = time.perf_counter() + self.args.swap_seconds
        seed = self.args.seed
        clients = [self.client(SWAP_IDS, seed + i) for i in range(SWAP_CLIENTS)]
        clients += [self.client([FLIP], seed + 100 + i) for i in range(FLIP_CLIENTS)]
        log.info("hot swap: %d clients for %.0f s", len(clients), self.args.swap_seconds)
        try:
            # Clients stop sending at the deadline; whatever is still open 3 minutes later
            # (past each request's own deadline) is counted lost.
            await asyncio.wait_for(
                asyncio.gather(*clients, self.swapper(random.Random(seed)), self.flipper()),
                self.args.swap_seconds + 180,
            )
        except TimeoutError:
            log.error("hot swap: requests still open long after the deadline")
        return swap_summary(self.records, self.registered)

    async def register(self, adapter_id: str) -> None:
        path = self.root / adapter_id / "ab"[self.variant[adapter_id]]
        request = adapters_pb2.RegisterAdapterRequest(adapter_id=adapter_id, path=str(path))
        reply = await self.admin.RegisterAdapter(request, timeout=120)
        self.latest[adapter_id] = reply.adapter.version
        self.registered += reply.created

    async def client(self, choices: list[str], seed: int) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < self.deadline:
            adapter_id = rng.choice(choices)
            latest = self.latest[adapter_id]
            gone = adapter_id == FLIP and self.flip_state == "deleted"
            # Sent after a delete returned: only a version registered later may serve it.
            record = SwapRecord(
                adapter_id, latest + 1 if gone else latest, self.flip_state, self.deletes
            )
            self.records.append(record)
            request = inference_pb2.GenerateRequest(
                adapter_id=adapter_id,
                messages=user_message(self.prompts[len(self.records) % len(self.prompts)]),
                max_new_tokens=CHURN_NEW_TOKENS,
                temperature=0.0,
            )
            await stream_versions(self.infer, request, record, self.args.request_timeout)
            record.deletes_at_end = self.deletes
            if record.status == "NOT_FOUND":
                await asyncio.sleep(0.1)  # flip is gone: do not spin on refusals

    async def swapper(self, rng: random.Random) -> None:
        """A new version of a random swap adapter every second (its other weight file)."""
        while time.perf_counter() + 1.0 < self.deadline:
            await asyncio.sleep(1.0)
            adapter_id = rng.choice(SWAP_IDS)
            self.variant[adapter_id] ^= 1
            await self.register(adapter_id)

    async def flipper(self) -> None:
        while time.perf_counter() + FLIP_PERIOD < self.deadline:
            await asyncio.sleep(FLIP_PERIOD - FLIP_GAP)
            self.flip_state, self.deletes = "changing", self.deletes + 1
            await self.admin.DeleteAdapter(
                adapters_pb2.DeleteAdapterRequest(adapter_id=FLIP), timeout=120
            )
            self.flip_state = "deleted"
            await asyncio.sleep(FLIP_GAP)
            self.flip_state = "changing"
            await self.register(FLIP)
            self.flip_state = "present"


async def swap_phase(
    address: str, root: Path, prompts: list[str], args: argparse.Namespace
) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        return await HotSwap(channel, root, prompts, args).run()


def swap_summary(records: list[SwapRecord], registered: int) -> dict:
    completed = [r for r in records if r.status == "OK" and r.finish_reason]
    refused = [
        r
        for r in records
        if r.status == "NOT_FOUND"
        and r.adapter_id == FLIP
        and (r.flip_state != "present" or r.deletes_at_end > r.deletes_at_send)
    ]
    refused_ids = {id(r) for r in refused}
    failed = [r for r in records if r.status not in (None, "OK") and id(r) not in refused_ids]
    one_version = [r for r in completed if len(r.versions) == 1 and r.ids == {r.adapter_id}]
    stale = [r for r in one_version if min(r.versions) < r.floor]
    # Sent while flip was deleted, yet served (by its next version, else they count as stale):
    # they reached the server as the new version was being registered.
    raced = [r for r in completed if r.adapter_id == FLIP and r.flip_state == "deleted"]
    lost = len(records) - len(completed) - len(failed) - len(refused)
    return {
        "sent": len(records),
        "completed": len(completed),
        "failed": len(failed),
        "failure_samples": sorted({f"{r.status}: {r.detail}" for r in failed})[:5],
        "refused": len(refused),
        "lost": lost,
        "versions_registered": registered,
        "distinct_versions_seen": len({(r.adapter_id, v) for r in completed for v in r.versions}),
        "one_version_streams": len(one_version),
        "stale_versions": len(stale),
        "flip_raced_registration": len(raced),
        "ttft_ms": latency_ms([r.ttft for r in completed if r.ttft is not None]),
    }


# -- the report --------------------------------------------------------------------------------
def table(report: dict) -> str:
    cfg, info = report["config"], report["config"]["model_info"]
    lines = [
        f"loraplex adapter lifecycle: {info['model_id']} ({info['quantization']}, "
        f"{info['device']}, {info['dtype']}), {cfg['cpus']} CPUs; times in ms",
        *load_lines(report["load"]),
        *churn_lines(report["churn"], cfg),
        *swap_lines(report["swap"], cfg),
        "peak RSS: "
        + ", ".join(
            f"{name} {n / 2**20:.0f} MiB" if n else f"{name} ?"
            for name, n in report["memory"].items()
        ),
    ]
    return "\n".join(lines) + "\n"


LOAD_NAMES = {
    "base": "base model",
    "warm": "warm (device hit)",
    "host": "host hit (host -> device)",
    "cold": "cold (store -> host -> device)",
}


def load_lines(load: dict) -> list[str]:
    lines = [
        f"1. cold vs warm: {LOAD_ADAPTERS} adapters r={LOAD_RANK} all-linear "
        f"({load['adapter_bytes'] / 1e6:.1f} MB each), --max-loras {LOAD_SLOTS}, "
        "4 new tokens greedy, one request at a time",
        f"  {'case':<32} {'n':>3} {'TTFT p50':>9} {'x base':>7}",
    ]
    for case, name in LOAD_NAMES.items():
        row = load["cases"][case]
        lines.append(f"  {name:<32} {row['n']:>3} {row['ttft_ms_p50']:>9.1f} {row['x_base']:>7.2f}")
    sh, hd = load["store_to_host"], load["host_to_device"]
    lines.append(
        f"  mean load: store -> host {cell(sh['mean_ms'], '.1f', 0)} ms ({sh['loads']} loads), "
        f"host -> device {cell(hd['mean_ms'], '.1f', 0)} ms ({hd['loads']} loads)"
    )
    if load["case_mismatches"]:
        lines.append(f"  {len(load['case_mismatches'])} requests were not the cache case meant")
    return lines


def churn_lines(churn: dict, cfg: dict) -> list[str]:
    reg, base = churn["registration"], churn["base"]
    lines = [
        f"2. churn: {reg['adapters']} adapters r=4 q_proj,v_proj registered in "
        f"{reg['seconds']:.1f} s ({reg['adapters_per_s']:.1f}/s, {cfg['register_concurrency']} "
        f"at a time); each once + {cfg['requests']} Zipf(s={cfg['zipf']}) draws, "
        f"{cfg['concurrency']} closed-loop clients, {CHURN_NEW_TOKENS} new tokens greedy; "
        f"{' '.join(cfg['churn_serve_args'])}",
        f"  {'system':<26} {'req':>5} {'err':>4} {'adapters':>8} {'tok/s':>7} {'req/s':>6} "
        f"{'TTFT p50':>9} {'TTFT p99':>9} {'x base tok/s':>12} {'x base TTFT':>11}",
    ]
    for name, row in (
        ("loraplex, mixed adapters", churn["mixed"]),
        ("loraplex, base only", base),
        ("PEFT, load per request", churn["peft"]),
    ):
        ttft = row.get("ttft_ms") or {}
        lines.append(
            f"  {name:<26} {row['requests']:>5} {row['errors']:>4} "
            f"{row.get('distinct_adapters', row['requests']):>8} "
            f"{row['output_tokens_per_s']:>7.1f} {row['requests_per_s']:>6.2f} "
            f"{cell(ttft.get('p50'), '.0f', 9)} {cell(ttft.get('p99'), '.0f', 9)} "
            f"{row['output_tokens_per_s'] / base['output_tokens_per_s']:>12.2f} "
            + cell(ttft["p50"] / base["ttft_ms"]["p50"] if ttft else None, ".2f", 11)
        )
    mixed, peft = churn["mixed"], churn["peft"]
    lines.append(
        f"  loraplex mixed = {mixed['output_tokens_per_s'] / peft['output_tokens_per_s']:.1f}x "
        f"PEFT's tok/s ({peft['mean_load_ms']:.0f} ms per PEFT load_adapter)"
    )
    lines.append(
        "  cache over the mixed run: "
        + "; ".join(
            f"{tier} hit rate {cell(t['hit_rate'], '.3f', 0)} ({t['hits']} hits, "
            f"{t['misses']} misses, {t['loads']} loads, {t['evictions']} evictions)"
            for tier, t in churn["mixed"]["tiers"].items()
        )
    )
    for row in (churn["mixed"], base):
        if row["errors"]:
            lines.append(f"  errors, e.g.: {'; '.join(row['error_samples'])}")
    return lines


def swap_lines(swap: dict, cfg: dict) -> list[str]:
    ok = swap["failed"] == 0 and swap["lost"] == 0
    lines = [
        f"3. hot swap, {cfg['swap_seconds']:.0f} s: {SWAP_CLIENTS} clients on "
        f"{SWAP_IDS[0]}..{SWAP_IDS[-1]} (a new version every second), {FLIP_CLIENTS} on {FLIP} "
        f"(deleted for {FLIP_GAP:.0f} s every {FLIP_PERIOD:.0f} s)",
        f"  sent {swap['sent']}, completed {swap['completed']}, failed {swap['failed']}, "
        f"refused ({FLIP} NOT_FOUND) {swap['refused']}, lost {swap['lost']}; "
        f"TTFT p50 {cell((swap['ttft_ms'] or {}).get('p50'), '.0f', 0)}",
        f"  versions registered {swap['versions_registered']}, distinct versions seen "
        f"{swap['distinct_versions_seen']}; streams naming exactly one version "
        f"{swap['one_version_streams']}/{swap['completed']}, served by an older version than "
        f"the latest at send (or a deleted one) {swap['stale_versions']}",
        f"  targets 0 failed, 0 lost: {'met' if ok else 'MISSED'}",
    ]
    if swap["failure_samples"]:
        lines.append(f"  failures, e.g.: {'; '.join(swap['failure_samples'])}")
    return lines


# -- main --------------------------------------------------------------------------------------
QUICK = {"adapters": 60, "requests": 60, "swap_seconds": 8.0, "peft_sample": 4}
FULL = {"adapters": 1000, "requests": 1000, "swap_seconds": 30.0, "peft_sample": 16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("--adapters", type=int, help="churn adapters (1000; --quick 60)")
    parser.add_argument("--requests", type=int, help="Zipf draws after each adapter once (1000)")
    parser.add_argument("--zipf", type=float, default=1.0, help="Zipf exponent s")
    parser.add_argument("--concurrency", type=int, default=32, help="closed-loop clients")
    parser.add_argument("--register-concurrency", type=int, default=4)
    parser.add_argument("--swap-seconds", type=float, help="hot-swap phase length (30)")
    parser.add_argument("--peft-sample", type=int, help="requests PEFT runs (16)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: everything smaller")
    parser.add_argument("--seed", type=int, default=0)
    add_common_args(parser, "lifecycle")
    add_server_args(parser)
    parser.add_argument("--request-timeout", type=float, default=600.0)
    args = parser.parse_args(argv)
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name in ("adapters", "concurrency", "register_concurrency", "peft_sample"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.requests < 0 or args.swap_seconds <= 0:
        parser.error("--requests must be >= 0 and --swap-seconds > 0")
    args.extra = server_flags(parser, args.serve_args)
    return args


def run_load(args: argparse.Namespace, home: Path, work: Path) -> tuple[dict, dict, int | None]:
    """Phase 1 on its own server: (results, model info, server peak RSS)."""
    work.mkdir()
    flags = ["--max-loras", str(LOAD_SLOTS), *args.extra]
    with child_pool() as pool, server_process(home, work, flags, args.model) as proc:
        made = pool.apply_async(prepare_load, (str(home), args.model, str(work / "peft")))
        address = proc.wait_ready(args.startup_timeout)
        prompt, size = made.get(args.startup_timeout)
        pool.close()
        pool.join()
        ids = [f"{ADAPTER_PREFIX}{i}" for i in range(LOAD_ADAPTERS)]
        with LoraplexClient(address, timeout=600) as client:
            info = client.model_info()
            register_adapters(client, work / "peft", ids)
        log.info("cold vs warm: %d adapters of %.1f MB", len(ids), size / 1e6)
        result = asyncio.run(load_phase(address, ids, prompt, args))
        result["adapter_bytes"] = size
        model_info = {
            k: getattr(info, k)
            for k in ("model_id", "device", "dtype", "quantization", "max_lora_rank", "version")
        }
        return result, model_info, proc.peak_rss_bytes()


def run_churn(args: argparse.Namespace, home: Path, work: Path) -> tuple[dict, dict, int | None]:
    """Phases 2 and 3 on one server, then the PEFT baseline with the server stopped:
    (churn results, swap results, server peak RSS)."""
    work.mkdir()
    root = work / "peft"
    ids = [f"tenant-{i:04d}" for i in range(args.adapters)]
    sequence = churn_sequence(ids, args.requests, args.zipf, args.seed)
    flags = CHURN_FLAGS + args.extra
    with child_pool() as pool, server_process(home, work, flags, args.model) as proc:
        made = pool.apply_async(
            prepare_churn, (str(home), args.model, args.adapters, str(root), 64)
        )
        address = proc.wait_ready(args.startup_timeout)
        prompts = made.get(args.startup_timeout)
        pool.close()
        pool.join()
        log.info("registering %d adapters, %d at a time", len(ids), args.register_concurrency)
        items = [(i, str(root / i)) for i in ids]
        seconds = asyncio.run(register_all(address, items, args.register_concurrency))
        registration = {
            "adapters": len(ids),
            "seconds": seconds,
            "adapters_per_s": len(ids) / seconds,
        }
        log.info("registered in %.1f s; churn: %d requests, mixed", seconds, len(sequence))
        mixed = asyncio.run(closed_loop(address, sequence, prompts, args))
        log.info("churn, base only: %d requests", len(sequence))
        base = asyncio.run(closed_loop(address, [""] * len(sequence), prompts, args))
        swap = asyncio.run(swap_phase(address, root, prompts, args))
        rss = proc.peak_rss_bytes()
    step = max(1, len(sequence) // args.peft_sample)
    picks = range(0, step * args.peft_sample, step)
    sample = [(str(root / sequence[i]), prompts[i % len(prompts)]) for i in picks]
    peft = in_child(peft_baseline, str(home), args.model, sample, CHURN_NEW_TOKENS)
    churn = {"registration": registration, "mixed": mixed, "base": base, "peft": peft}
    return churn, swap, rss


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    home = Path(args.home).expanduser()
    start = time.perf_counter()
    with work_dir("loraplex-lifecycle-", args.keep_work) as work:
        load, model_info, load_rss = run_load(args, home, work / "load")
        churn, swap, churn_rss = run_churn(args, home, work / "churn")
    report = {
        "config": {
            "adapters": args.adapters,
            "requests": args.requests,
            "zipf": args.zipf,
            "concurrency": args.concurrency,
            "register_concurrency": args.register_concurrency,
            "swap_seconds": args.swap_seconds,
            "peft_sample": args.peft_sample,
            "seed": args.seed,
            "quick": args.quick,
            "serve_args": args.extra,
            "churn_serve_args": CHURN_FLAGS + args.extra,
            "model_info": model_info,
            "cpus": os.cpu_count(),
        },
        "load": load,
        "churn": churn,
        "swap": swap,
        "memory": {
            "load server": load_rss,
            "churn server": churn_rss,
            "benchmark client": peak_rss_bytes(),
        },
        "wall_seconds": time.perf_counter() - start,
    }
    # The machine as a fresh process sees it, as the servers started (this one has no torch).
    publish(report, table(report), args.out, fresh_process=True)
    log.info("%.0f s in all", report["wall_seconds"])
    if swap["failed"] or swap["lost"]:
        log.error("hot swap: %d failed and %d lost requests", swap["failed"], swap["lost"])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
