"""Tenant isolation through the real gRPC server: fairness under a flood, and overload.

Each server is a `loraplex serve` subprocess (port 0, the embedded model, a temporary store,
an API key file made for the run). Clients stream base-model requests (short raw prompts,
greedy) in closed loops from one asyncio event loop, with `authorization: Bearer <key>`; one
refused (RESOURCE_EXHAUSTED) sleeps the server's retry-after-ms (x1-1.5), then sends again.

    1. fairness   --max-batch-size 16. Tenant B: --b-clients clients, --b-new-tokens each, for
                  --phase-seconds. "B alone": B only. "A floods + B": tenant A (max_concurrent
                  --a-limit in the key file) runs --flood-clients clients of --a-new-tokens,
                  started --ramp-seconds before B does exactly what it did alone. Then the same
                  on a second server where A has no limit (max_concurrent 0): the VTC fair
                  scheduler and the automatic row share (a tenant holds at most 3/4 of the
                  batch rows when the key file has several tenants) protect B. B's p99 TTFT
                  (first streamed chunk with tokens) in a flood should stay within 2x of B
                  alone (measured on the first server).
    2. overload   --max-batch-size 4 --max-queue 8 (capacity 12 requests in the server), one
                  tenant without a per-tenant limit, --overload-factor x capacity closed-loop
                  clients for --overload-seconds, twice. Other errors and lost calls (still
                  open past their deadline, or DEADLINE_EXCEEDED) must be 0; the server's RSS
                  is read before, after round 1 and after round 2 (flat: the difference).
    3. deadlines  a default server (no engine flags): one burst of --deadline-factors x what it
                  completes within --deadline-seconds (calibrated by one full batch first)
                  unary requests at once, each with that client deadline. Every request must
                  complete or be refused (RESOURCE_EXHAUSTED, at once or while queued):
                  none may end DEADLINE_EXCEEDED after waiting, none may be lost.
    4. compose    --max-batch-size 16, two shared random r16 adapters: B as in part 1, alone
                  and while tenant A's --flood-clients clients each ask for a composition of
                  the two never asked before (a new weight each time: a build on the engine
                  thread for every request). B's p99 TTFT should stay within 2x of alone.

Request counts cover every request sent (A's from its ramp until B's last one ended); tok/s
counts every tenant's tokens received inside B's window (part 1) or the round (part 2).

    python benchmarks/tenancy.py [--phase-seconds 60] [--flood-clients 32] [--a-limit 8]
        [--overload-seconds 45] [--overload-factor 4] [--deadline-seconds 30]
        [--parts fairness,overload,deadlines,compose]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import grpc
import psutil

from loraplex.server.client import LoraplexClient
from loraplex.server.grpc_api.status import RETRY_AFTER_KEY
from loraplex.server.runtime.auth import hash_key, new_key
from loraplex.v1 import inference_pb2, inference_pb2_grpc

from harness import (
    add_common_args,
    add_server_args,
    cell,
    format_table,
    in_child,
    latency_ms,
    make_parser,
    peak_rss_bytes,
    publish,
    run_main,
    server_flags,
    server_process,
    setup_logging,
    work_dir,
    write_adapters,
)

log = logging.getLogger("benchmark")

TTFT_TARGET = 2.0  # B's p99 TTFT in a flood within 2x of B alone
# Raw prompts the embedded model continues past 64 tokens greedily (no early EOS).
B_PROMPT = "The history of the harbour town began"
A_PROMPT = "Once upon a time, in a small village by the sea,"
DEFAULT_RETRY_S = 0.5  # when a refusal carries no retry-after-ms
MAX_BACKOFF_S = 5.0
HANG_GRACE_S = 10.0  # a call still open this long past its deadline is lost
LOST = ("LOST", "DEADLINE_EXCEEDED")


@dataclass(frozen=True)
class Tenant:
    name: str
    key: str


@dataclass
class Call:
    status: str = ""  # "OK", a gRPC status name, "NO_FINISH" or "LOST"
    detail: str = ""
    ttft: float | None = None
    tokens: int = 0
    seconds: float = 0.0
    retry_after_s: float | None = None


def write_key_file(
    path: Path, tenants: list[Tenant], limits: dict[str, int], admin: Tenant | None = None
) -> None:
    lines = []
    for t, role in [*((t, "client") for t in tenants), *(((admin, "admin"),) if admin else ())]:
        lines += ["[[keys]]", f'name = "{t.name}-key"', f'tenant = "{t.name}"', f'role = "{role}"']
        lines += [f'sha256 = "{hash_key(t.key)}"', ""]
    for name, limit in limits.items():
        lines += [f"[tenants.{name}]", f"max_concurrent = {limit}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def request(prompt: str, new_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(prompt=prompt, max_new_tokens=new_tokens, temperature=0.0)


Requests: TypeAlias = inference_pb2.GenerateRequest | Callable[[], inference_pb2.GenerateRequest]
Group: TypeAlias = tuple[Tenant, Requests, int]  # tenant, its request (or a maker of each), clients


@dataclass
class Clients:
    """One tenant's closed-loop clients on their own channel: each streams `req` back to back
    until `stop`; after a refusal it sleeps the server's retry advice (jittered up). Tokens
    received in `window` ([start, end) in perf_counter time, shared) are counted."""

    channel: grpc.aio.Channel
    tenant: Tenant
    req: Requests
    window: list[float]
    args: argparse.Namespace
    calls: list[Call] = field(default_factory=list)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    tokens_in_window: int = 0

    def __post_init__(self) -> None:
        self.stub = inference_pb2_grpc.InferenceStub(self.channel)
        self.timeout = self.args.request_timeout
        self.rng = random.Random(f"{self.args.seed}{self.tenant.name}")
        self.metadata = (("authorization", f"Bearer {self.tenant.key}"),)

    async def call(self, req: inference_pb2.GenerateRequest) -> Call:
        start, rec, finished = time.perf_counter(), Call(), False

        async def consume() -> None:
            nonlocal finished
            stream = self.stub.GenerateStream(req, timeout=self.timeout, metadata=self.metadata)
            async for chunk in stream:
                now = time.perf_counter()
                if chunk.token_ids and rec.ttft is None:
                    rec.ttft = now - start
                rec.tokens += len(chunk.token_ids)
                if self.window[0] <= now < self.window[1]:
                    self.tokens_in_window += len(chunk.token_ids)
                finished = finished or bool(chunk.finish_reason)

        try:
            await asyncio.wait_for(consume(), self.timeout + HANG_GRACE_S)
            rec.status = "OK" if finished else "NO_FINISH"
        except grpc.aio.AioRpcError as exc:
            rec.status, rec.detail = exc.code().name, exc.details() or ""
            for key, value in exc.trailing_metadata() or ():
                if key == RETRY_AFTER_KEY:
                    rec.retry_after_s = int(value) / 1000
        except TimeoutError:
            rec.status = "LOST"
        rec.seconds = time.perf_counter() - start
        return rec

    async def loop(self) -> None:
        while not self.stop.is_set():
            rec = await self.call(self.req() if callable(self.req) else self.req)
            self.calls.append(rec)
            if rec.status == "RESOURCE_EXHAUSTED":
                advice = rec.retry_after_s or DEFAULT_RETRY_S
                with contextlib.suppress(TimeoutError):
                    delay = min(advice * self.rng.uniform(1, 1.5), MAX_BACKOFF_S)
                    await asyncio.wait_for(self.stop.wait(), delay)

    def start(self, n: int) -> asyncio.Future[list[None]]:
        return asyncio.gather(*(self.loop() for _ in range(n)))


def summarize(calls: list[Call], tokens: int, seconds: float) -> dict:
    ok = [c for c in calls if c.status == "OK"]
    refused = [c for c in calls if c.status == "RESOURCE_EXHAUSTED"]
    lost = [c for c in calls if c.status in LOST]
    other = [c for c in calls if c.status not in ("OK", "RESOURCE_EXHAUSTED", *LOST)]
    return {
        "sent": len(calls),
        "accepted": len(calls) - len(refused),
        "completed": len(ok),
        "resource_exhausted": len(refused),
        "other_errors": len(other),
        "lost": len(lost),
        "error_samples": sorted({f"{c.status}: {c.detail}" for c in other + lost})[:3],
        "mean_completion_tokens": sum(c.tokens for c in ok) / len(ok) if ok else None,
        "ttft_ms": latency_ms([c.ttft for c in ok if c.ttft is not None]),
        "e2e_ms": latency_ms([c.seconds for c in ok]),
        "refusal_ms": latency_ms([c.seconds for c in refused]),
        "retry_after_ms": latency_ms([c.retry_after_s for c in refused if c.retry_after_s]),
        "tokens_in_window": tokens,
        "tokens_per_s": tokens / seconds,
    }


async def closed_loops(
    address: str, groups: list[Group], seconds: float, args: argparse.Namespace
) -> list[Clients]:
    """Each group's clients on its own channel, after one short base request each (not
    counted: it opens the channel and checks the key).
    The first group sends for `seconds`, the window in which tokens are counted; the
    others start --ramp-seconds before it and stop sending when its last request ends."""
    window = [math.inf, math.inf]
    channels = [grpc.aio.insecure_channel(address) for _ in groups]
    try:
        loads = []
        for channel, (tenant, requests, _) in zip(channels, groups, strict=True):
            loads.append(Clients(channel, tenant, requests, window, args))
            warm = await loads[-1].call(request(B_PROMPT, 2))
            if warm.status != "OK":
                raise RuntimeError(f"warm-up of {tenant.name}: {warm.status}: {warm.detail}")
        background = [load.start(g[2]) for load, g in zip(loads[1:], groups[1:], strict=True)]
        if background:
            await asyncio.sleep(args.ramp_seconds)
        window[:] = [time.perf_counter(), time.perf_counter() + seconds]
        asyncio.get_running_loop().call_later(seconds, loads[0].stop.set)
        await loads[0].start(groups[0][2])
        for load in loads[1:]:
            load.stop.set()
        await asyncio.gather(*background)
    finally:
        for channel in channels:
            await channel.close()
    return loads


# -- 1. fairness -------------------------------------------------------------------------------
async def fairness_phase(
    address: str,
    a: Tenant,
    b: Tenant,
    flood: bool,
    args: argparse.Namespace,
    a_requests: Requests | None = None,
) -> dict:
    """B's clients for --phase-seconds; with `flood`, A's (`a_requests`, by default base
    requests of --a-new-tokens) from --ramp-seconds before until B's last request ends."""
    groups: list[Group] = [(b, request(B_PROMPT, args.b_new_tokens), args.b_clients)]
    if flood:
        a_requests = a_requests or request(A_PROMPT, args.a_new_tokens)
        groups.append((a, a_requests, args.flood_clients))
    window = args.phase_seconds
    loads = await closed_loops(address, groups, window, args)
    result = {
        "b": summarize(loads[0].calls, loads[0].tokens_in_window, window),
        "a": summarize(loads[1].calls, loads[1].tokens_in_window, window) if flood else None,
        "tokens_per_s": sum(load.tokens_in_window for load in loads) / window,
    }
    ttft = result["b"]["ttft_ms"] or {}
    log.info(
        "B: %d done, TTFT p99 %s ms", result["b"]["completed"], cell(ttft.get("p99"), ".0f", 0)
    )
    return result


def run_fairness(
    args: argparse.Namespace, home: Path, work: Path, tenants: list[Tenant]
) -> tuple[dict, dict]:
    """The three phases on two servers: (phases, the served model's info)."""
    a, b, _ = tenants
    phases: dict[str, dict] = {}
    info: dict = {}
    for name, limit in (("capped", args.a_limit), ("uncapped", 0)):
        where = work / f"fair-{name}"
        where.mkdir()
        write_key_file(where / "keys.toml", tenants, {a.name: limit})
        flags = ["--auth-keys", str(where / "keys.toml"), "--max-batch-size", str(args.batch)]
        with server_process(home, where, flags + args.extra, args.model) as proc:
            address = proc.wait_ready(args.startup_timeout)
            if name == "capped":
                with LoraplexClient(address, timeout=60, api_key=b.key) as c:
                    reply = c.model_info()
                fields = ("model_id", "device", "dtype", "quantization", "max_batch_size")
                info = {k: getattr(reply, k) for k in fields}
                log.info("B alone: %d clients for %.0f s", args.b_clients, args.phase_seconds)
                phases["alone"] = asyncio.run(fairness_phase(address, a, b, False, args))
            log.info("A floods + B, A max_concurrent %d: %d A clients", limit, args.flood_clients)
            phases[name] = asyncio.run(fairness_phase(address, a, b, True, args))
            phases[name]["a_max_concurrent"] = limit
    alone = (phases["alone"]["b"]["ttft_ms"] or {}).get("p99")
    for name in ("capped", "uncapped"):
        flood = (phases[name]["b"]["ttft_ms"] or {}).get("p99")
        phases[name]["b_ttft_p99_over_alone"] = flood / alone if flood and alone else None
    return phases, info


# -- 2. overload -------------------------------------------------------------------------------
async def overload_round(
    address: str, tenant: Tenant, clients: int, args: argparse.Namespace
) -> dict:
    group = (tenant, request(B_PROMPT, args.overload_new_tokens), clients)
    (load,) = await closed_loops(address, [group], args.overload_seconds, args)
    row = summarize(load.calls, load.tokens_in_window, args.overload_seconds)
    row["attempts_per_s"] = len(load.calls) / args.overload_seconds
    keys = ("sent", "completed", "resource_exhausted", "other_errors", "lost")
    log.info("overload: %s", ", ".join(f"{row[k]} {k.replace('_', ' ')}" for k in keys))
    return row


def run_overload(args: argparse.Namespace, home: Path, work: Path, tenant: Tenant) -> dict:
    work.mkdir()
    write_key_file(work / "keys.toml", [tenant], {tenant.name: 0})
    capacity = args.overload_batch + args.overload_queue
    clients = args.overload_factor * capacity
    flags = ["--auth-keys", str(work / "keys.toml"), "--max-batch-size", str(args.overload_batch)]
    flags += ["--max-queue", str(args.overload_queue)]
    with server_process(home, work, flags + args.extra, args.model) as proc:
        address = proc.wait_ready(args.startup_timeout)
        process = psutil.Process(proc.pid)
        rss = [process.memory_info().rss]
        rounds = []
        for i in (1, 2):
            log.info("overload round %d: %d clients for %.0f s", i, clients, args.overload_seconds)
            rounds.append(asyncio.run(overload_round(address, tenant, clients, args)))
            rss.append(process.memory_info().rss)
        peak = peak_rss_bytes(proc.pid)  # VmHWM: model loading included
    return {
        "capacity": capacity,
        "clients": clients,
        "rounds": rounds,
        "rss_bytes": {"before": rss[0], "after_round_1": rss[1], "after_round_2": rss[2]},
        "rss_round_2_minus_round_1_bytes": rss[2] - rss[1],
        "peak_rss_bytes": peak,
    }


# -- 3. deadlines ------------------------------------------------------------------------------
# A refusal within this share of the deadline of sending is "at once" (thousands of calls sent
# at once from one client process take it a second or more to send and hear back alone).
REFUSED_AT_ONCE_SHARE = 0.1


async def unary(
    stub: inference_pb2_grpc.InferenceStub, tenant: Tenant, new_tokens: int, timeout: float
) -> Call:
    """One Generate call with a client deadline; a call still open past it (plus a grace) is
    LOST."""
    start, rec = time.perf_counter(), Call()
    metadata = (("authorization", f"Bearer {tenant.key}"),)
    req = inference_pb2.GenerateRequest(
        prompt=B_PROMPT, max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True
    )
    try:
        reply = await asyncio.wait_for(
            stub.Generate(req, timeout=timeout, metadata=metadata), timeout + HANG_GRACE_S
        )
        rec.status, rec.tokens = "OK", len(reply.token_ids)
    except grpc.aio.AioRpcError as exc:
        rec.status, rec.detail = exc.code().name, exc.details() or ""
    except TimeoutError:
        rec.status = "LOST"
    rec.seconds = time.perf_counter() - start
    return rec


CALLS_PER_CHANNEL = 256  # well inside --grpc-max-streams-per-connection


async def burst(address: str, tenant: Tenant, n: int, new_tokens: int, timeout: float) -> dict:
    """n unary calls at once, over as many connections as clients that size would open."""
    # each its own connection (channels to one address otherwise share one)
    own = [("grpc.use_local_subchannel_pool", 1)]
    count = -(-n // CALLS_PER_CHANNEL)
    channels = [grpc.aio.insecure_channel(address, options=own) for _ in range(count)]
    try:
        stubs = [inference_pb2_grpc.InferenceStub(c) for c in channels]
        start = time.perf_counter()
        calls = await asyncio.gather(
            *(unary(stubs[i // CALLS_PER_CHANNEL], tenant, new_tokens, timeout) for i in range(n))
        )
        wall = time.perf_counter() - start
    finally:
        for channel in channels:
            await channel.close()
    refused = [c for c in calls if c.status == "RESOURCE_EXHAUSTED"]
    known = ("OK", "RESOURCE_EXHAUSTED", "DEADLINE_EXCEEDED", "LOST")
    other = [c for c in calls if c.status not in known]
    return {
        "sent": n,
        "completed": sum(c.status == "OK" for c in calls),
        "refused_at_once": sum(c.seconds <= REFUSED_AT_ONCE_SHARE * timeout for c in refused),
        "refused_later": sum(c.seconds > REFUSED_AT_ONCE_SHARE * timeout for c in refused),
        "past_deadline": sum(c.status == "DEADLINE_EXCEEDED" for c in calls),
        "lost": sum(c.status == "LOST" for c in calls),
        "other_errors": len(other),
        "error_samples": sorted({f"{c.status}: {c.detail}" for c in other})[:3],
        "refusal_ms": latency_ms([c.seconds for c in refused]),
        "wall_s": wall,
    }


def run_deadlines(args: argparse.Namespace, home: Path, work: Path, tenant: Tenant) -> dict:
    work.mkdir()
    write_key_file(work / "keys.toml", [tenant], {tenant.name: 0})
    flags = ["--auth-keys", str(work / "keys.toml")]
    with server_process(home, work, flags + args.extra, args.model) as proc:
        address = proc.wait_ready(args.startup_timeout)
        with LoraplexClient(address, timeout=60, api_key=tenant.key) as c:
            batch = c.model_info().max_batch_size
        log.info("deadlines: calibrating with one batch of %d", batch)
        wave = asyncio.run(burst(address, tenant, batch, args.deadline_new_tokens, 600.0))
        per_deadline = batch * args.deadline_seconds / wave["wall_s"]
        rounds = []
        for factor in args.deadline_factors:
            n = max(1, round(factor * per_deadline))
            log.info(
                "deadlines: %gx: %d requests at once, %g s deadline",
                factor,
                n,
                args.deadline_seconds,
            )
            row = asyncio.run(
                burst(address, tenant, n, args.deadline_new_tokens, args.deadline_seconds)
            )
            row["factor"] = factor
            rounds.append(row)
            log.info("deadlines: %s", {k: v for k, v in row.items() if isinstance(v, int)})
    return {
        "batch": batch,
        "wave_s": wave["wall_s"],
        "per_deadline": per_deadline,
        "rounds": rounds,
    }


# -- 4. compositions ---------------------------------------------------------------------------
def composing(counter: itertools.count) -> Callable[[], inference_pb2.GenerateRequest]:
    """Requests for compositions of the two shared adapters, each of weights never asked."""

    def make() -> inference_pb2.GenerateRequest:
        req = request(A_PROMPT, 16)
        weight = 0.5 + next(counter) * 1e-4
        req.compose.adapters.add(adapter_id="mix-a", weight=weight)
        req.compose.adapters.add(adapter_id="mix-b", weight=1 - weight)
        return req

    return make


def run_compose(args: argparse.Namespace, home: Path, work: Path, tenants: list[Tenant]) -> dict:
    a, b, _ = tenants
    admin = Tenant("ops", new_key())
    work.mkdir()
    write_key_file(work / "keys.toml", tenants, {}, admin)
    dirs = in_child(write_adapters, str(home), 2, 16, str(work / "peft"))
    flags = ["--auth-keys", str(work / "keys.toml"), "--max-batch-size", str(args.batch)]
    phases: dict[str, Any] = {}
    with server_process(home, work, flags + args.extra, args.model) as proc:
        address = proc.wait_ready(args.startup_timeout)
        with LoraplexClient(address, timeout=300, api_key=admin.key) as ops:
            for name, directory in zip(("mix-a", "mix-b"), dirs, strict=True):
                ops.push(name, Path(directory), tenant="ops", shared=True)
        for name, flood in (("alone", False), ("flood", True)):
            log.info("compose: B %s", "while A floods compositions" if flood else "alone")
            flooding = composing(itertools.count(1))
            phases[name] = asyncio.run(fairness_phase(address, a, b, flood, args, flooding))
    alone = (phases["alone"]["b"]["ttft_ms"] or {}).get("p99")
    flood_p99 = (phases["flood"]["b"]["ttft_ms"] or {}).get("p99")
    phases["b_ttft_p99_over_alone"] = flood_p99 / alone if flood_p99 and alone else None
    return phases


# -- the report --------------------------------------------------------------------------------
FAIR_COLS = [("phase", 28, "s"), ("B done", 6, "d"), ("TTFT p50", 8, ".0f")]
FAIR_COLS += [("TTFT p99", 8, ".0f"), ("p99/alone", 9, ".2f"), ("A done", 6, "d")]
FAIR_COLS += [("A refused", 9, "d"), ("tok/s", 6, ".1f"), ("errors", 6, "d")]
OVER_COLS = [("round", 5, "d"), ("sent", 6, "d"), ("accepted", 8, "d"), ("completed", 9, "d")]
OVER_COLS += [("refused", 7, "d"), ("other err", 9, "d"), ("lost", 4, "d")]
OVER_COLS += [("refusal p50", 11, ".1f"), ("refusal p99", 11, ".1f"), ("tok/s", 6, ".1f")]


DEAD_COLS = [("overload", 8, ".0f"), ("sent", 5, "d"), ("completed", 9, "d")]
DEAD_COLS += [("refused at once", 15, "d"), ("refused later", 13, "d")]
DEAD_COLS += [("past deadline", 13, "d"), ("lost", 4, "d"), ("other err", 9, "d")]
DEAD_COLS += [("refusal p50", 11, ".0f"), ("refusal p99", 11, ".0f")]


def deadline_lines(dead: dict, cfg: dict) -> list[str]:
    rows, notes = [], []
    for row in dead["rounds"]:
        refusal = row["refusal_ms"] or {}
        counts = ("sent", "completed", "refused_at_once", "refused_later", "past_deadline")
        rows.append(
            [
                row["factor"],
                *(row[k] for k in counts),
                row["lost"],
                row["other_errors"],
                refusal.get("p50"),
                refusal.get("p99"),
            ]
        )
        notes += [f"  error: {e}" for e in row["error_samples"]]
    ok = all(r["past_deadline"] == 0 and r["lost"] == 0 for r in dead["rounds"])
    head = (
        f"3. deadlines, default server (--max-batch-size {dead['batch']}): one batch of "
        f"{cfg['deadline_new_tokens']} new tokens took {dead['wave_s']:.1f} s, so about "
        f"{dead['per_deadline']:.0f} requests complete within the {cfg['deadline_seconds']:.0f} s "
        "client deadline; bursts of a multiple of that sent at once; ms"
    )
    return [
        head,
        *format_table(DEAD_COLS, rows),
        *notes,
        f"  targets 0 past deadline, 0 lost: {'met' if ok else 'MISSED'}",
    ]


def phase_row(label: str, row: dict, ratio: float | None) -> tuple[list, list[str]]:
    """A fairness-shaped phase (B's figures, A's, both tenants' tok/s) as a FAIR_COLS row, and
    its error notes."""
    b, a = row["b"], row["a"] or {}
    ttft = b["ttft_ms"] or {}
    errors = b["other_errors"] + b["lost"] + a.get("other_errors", 0) + a.get("lost", 0)
    cells = [b["completed"], ttft.get("p50"), ttft.get("p99"), ratio, a.get("completed")]
    notes = [f"  error: {e}" for e in b["error_samples"] + a.get("error_samples", [])]
    return [label, *cells, a.get("resource_exhausted"), row["tokens_per_s"], errors], notes


def compose_lines(comp: dict, cfg: dict) -> list[str]:
    rows, notes = [], []
    for key, label in (("alone", "B alone"), ("flood", "A floods compositions + B")):
        ratio = comp["b_ttft_p99_over_alone"] if key == "flood" else None
        row, row_notes = phase_row(label, comp[key], ratio)
        rows.append(row)
        notes += row_notes
    ratio = comp["b_ttft_p99_over_alone"]
    verdict = "?" if ratio is None else "met" if ratio <= TTFT_TARGET else "MISSED"
    head = (
        f"4. compositions, {cfg['phase_seconds']:.0f} s per phase, --max-batch-size "
        f"{cfg['batch']}: B = {cfg['b_clients']} clients x {cfg['b_new_tokens']} new tokens, A = "
        f"{cfg['flood_clients']} clients each asking for a new composition of two shared r16 "
        "adapters (16 new tokens); ms"
    )
    return [
        head,
        *format_table(FAIR_COLS, rows),
        *notes,
        f"  B p99 TTFT {cell(ratio, '.2f', 0)}x alone (target <= {TTFT_TARGET:.0f}x: {verdict})",
    ]


def fairness_lines(fair: dict, cfg: dict) -> list[str]:
    names = {
        "alone": "B alone",
        "capped": f"A floods + B (A cap {cfg['a_limit']})",
        "uncapped": "A floods + B (no cap: VTC + row share)",
    }
    rows, notes = [], []
    for key, label in names.items():
        row, row_notes = phase_row(label, fair[key], fair[key].get("b_ttft_p99_over_alone"))
        rows.append(row)
        notes += row_notes
    for key in ("capped", "uncapped"):
        ratio = fair[key]["b_ttft_p99_over_alone"]
        verdict = "?" if ratio is None else "met" if ratio <= TTFT_TARGET else "MISSED"
        notes.append(
            f"  {names[key]}: B p99 TTFT {cell(ratio, '.2f', 0)}x alone "
            f"(target <= {TTFT_TARGET:.0f}x: {verdict})"
        )
    head = (
        f"1. fairness, {cfg['phase_seconds']:.0f} s per phase, --max-batch-size {cfg['batch']}: "
        f"B = {cfg['b_clients']} clients x {cfg['b_new_tokens']} new tokens, A = "
        f"{cfg['flood_clients']} clients x {cfg['a_new_tokens']} (greedy, base model); ms"
    )
    return [head, *format_table(FAIR_COLS, rows), *notes]


def overload_lines(over: dict, cfg: dict) -> list[str]:
    rows, notes = [], []
    for i, row in enumerate(over["rounds"], 1):
        refusal = row["refusal_ms"] or {}
        counts = ("sent", "accepted", "completed", "resource_exhausted", "other_errors", "lost")
        latency = (refusal.get("p50"), refusal.get("p99"), row["tokens_per_s"])
        rows.append([i, *(row[k] for k in counts), *latency])
        notes += [f"  error: {e}" for e in row["error_samples"]]
    mib = {k: v / 2**20 for k, v in over["rss_bytes"].items()}
    ok = all(r["other_errors"] == 0 and r["lost"] == 0 for r in over["rounds"])
    head = (
        f"2. overload, {cfg['overload_seconds']:.0f} s per round: --max-batch-size "
        f"{cfg['overload_batch']} --max-queue {cfg['overload_queue']} (capacity "
        f"{over['capacity']}), {over['clients']} clients ({cfg['overload_factor']}x), "
        f"{cfg['overload_new_tokens']} new tokens; ms"
    )
    return [
        head,
        *format_table(OVER_COLS, rows),
        *notes,
        f"  server RSS: before {mib['before']:.0f} MiB, after round 1 {mib['after_round_1']:.0f}"
        f", after round 2 {mib['after_round_2']:.0f} (round 2 - round 1: "
        f"{mib['after_round_2'] - mib['after_round_1']:+.1f} MiB)",
        f"  targets 0 other errors, 0 lost: {'met' if ok else 'MISSED'}",
    ]


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    add = parser.add_argument
    add("--phase-seconds", type=float, default=60.0, help="length of each fairness phase")
    add("--ramp-seconds", type=float, default=5.0, help="A floods this long before B starts")
    add("--b-clients", type=int, default=2)
    add("--b-new-tokens", type=int, default=32)
    add("--flood-clients", type=int, default=32, help="tenant A's clients")
    add("--a-new-tokens", type=int, default=64)
    add("--a-limit", type=int, default=8, help="A's max_concurrent in the capped phase")
    add("--batch", type=int, default=16, help="--max-batch-size of the fairness servers")
    add("--overload-seconds", type=float, default=45.0, help="length of each overload round")
    add("--overload-batch", type=int, default=4)
    add("--overload-queue", type=int, default=8)
    add("--overload-factor", type=int, default=4, help="clients = factor x (batch + queue)")
    add("--overload-new-tokens", type=int, default=32)
    add("--request-timeout", type=float, default=120.0, help="each call's deadline")
    add("--deadline-seconds", type=float, default=30.0, help="the client deadline of part 3")
    add("--deadline-new-tokens", type=int, default=64)
    add(
        "--deadline-factors",
        type=lambda s: [float(x) for x in s.split(",")],
        default=[2.0, 5.0],
        help="part 3's bursts, as multiples of what completes within the deadline",
    )
    add(
        "--parts",
        type=lambda s: s.split(","),
        default=["fairness", "overload", "deadlines", "compose"],
        help="which parts to run, comma-separated",
    )
    add("--seed", type=int, default=0, help="seed of the back-off jitter")
    add_common_args(parser, "tenancy")
    add_server_args(parser, "extra `loraplex serve` flags, for every server")
    args = parser.parse_args(argv)
    counts = ("b_clients", "flood_clients", "a_limit", "batch", "overload_batch", "overload_queue")
    for name in (*counts, "overload_factor", "b_new_tokens", "a_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.phase_seconds, args.overload_seconds, args.request_timeout) <= 0:
        parser.error("durations must be > 0")
    unknown = set(args.parts) - {"fairness", "overload", "deadlines", "compose"}
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    if args.deadline_seconds <= 0 or min(args.deadline_factors) <= 0:
        parser.error("--deadline-seconds and --deadline-factors must be > 0")
    owned = ("--auth-keys", "--max-batch-size", "--max-queue")
    args.extra = server_flags(parser, args.serve_args, owned=owned)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    home = Path(args.home).expanduser()
    tenants = [Tenant(name, new_key()) for name in ("tenant-a", "tenant-b", "tenant-c")]
    start = time.perf_counter()
    with work_dir("loraplex-tenancy-", args.keep_work) as work:
        fair, info = (
            run_fairness(args, home, work, tenants) if "fairness" in args.parts else ({}, {})
        )
        over = (
            run_overload(args, home, work / "overload", tenants[2])
            if "overload" in args.parts
            else {}
        )
        dead = (
            run_deadlines(args, home, work / "deadlines", tenants[2])
            if "deadlines" in args.parts
            else {}
        )
        comp = run_compose(args, home, work / "compose", tenants) if "compose" in args.parts else {}
    config = {k: v for k, v in vars(args).items() if k not in ("home", "out", "keep_work", "extra")}
    config.update(serve_args=args.extra, model_info=info, cpus=os.cpu_count())
    report = {
        "config": config,
        "fairness": fair,
        "overload": over,
        "deadlines": dead,
        "compose": comp,
        "benchmark_client_peak_rss_bytes": peak_rss_bytes(),
        "wall_seconds": time.perf_counter() - start,
    }
    # The machine as a fresh process sees it, as the servers started (this one has no torch).
    lines: list[str] = []
    if fair:
        lines += [*fairness_lines(fair, config), ""]
    if over:
        lines += [*overload_lines(over, config), ""]
    if dead:
        lines += [*deadline_lines(dead, config), ""]
    if comp:
        lines += compose_lines(comp, config)
    publish(report, lines, args.out, fresh_process=True)
    log.info("%.0f s in all", report["wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
