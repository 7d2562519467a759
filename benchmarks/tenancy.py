"""Tenant isolation through the real gRPC server: fairness under a flood, and overload.

Each server is a `loraplex serve` subprocess (port 0, the embedded model, a temporary store)
with an API key file made for the run; clients send `authorization: Bearer <key>` and stream
base-model requests (raw short prompts, greedy) from closed loops in one asyncio event loop.
A refused client (RESOURCE_EXHAUSTED) sleeps the server's retry-after-ms (x1-1.5, jittered),
then sends again.

    1. fairness   --max-batch-size 16. Tenant B: --b-clients clients, --b-new-tokens each, for
                  --phase-seconds. "B alone": B only. "A floods + B": tenant A (max_concurrent
                  --a-limit in the key file) runs --flood-clients clients of --a-new-tokens,
                  started --ramp-seconds before B does exactly what it did alone. Then the same
                  on a second server whose key file gives A no limit (max_concurrent 0): only
                  the VTC fair scheduler protects B. B's TTFT (first streamed chunk with tokens)
                  p99 in a flood should stay within 2x of B alone (measured on the first server).
    2. overload   --max-batch-size 4 --max-queue 8 (capacity 12 requests in the server), one
                  tenant without a per-tenant limit, --overload-factor x capacity closed-loop
                  clients for --overload-seconds, twice. Other errors and lost calls (still
                  open past their deadline, or DEADLINE_EXCEEDED) must be 0; the server's RSS
                  is read before, after round 1 and after round 2 (flat: the difference).

tok/s counts every tenant's tokens received inside B's window (part 1) or the round (part 2).

    python benchmarks/tenancy.py [--phase-seconds 60] [--flood-clients 32] [--a-limit 8]
        [--overload-seconds 45] [--overload-factor 4]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import grpc
import psutil
from online import ServerProcess, latency_ms, peak_rss_bytes, run, serve_command

from loraplex.server.auth import hash_key, new_key
from loraplex.server.client import LoraplexClient
from loraplex.server.errors import RETRY_AFTER_KEY
from loraplex.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger("benchmark")

TTFT_TARGET = 2.0  # B's p99 TTFT in a flood within 2x of B alone
B_PROMPT = "Write a short note about the sea."
A_PROMPT = "Tell a long story about a lighthouse keeper and the ships he watched at night."
DEFAULT_RETRY_S = 0.5  # when a refusal carries no retry-after-ms
MAX_BACKOFF_S = 5.0
HANG_GRACE_S = 10.0  # a call still open this long past its deadline is lost
LOST = ("LOST", "DEADLINE_EXCEEDED")


@dataclass(frozen=True)
class Tenant:
    name: str
    key: str

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.key}"),)


@dataclass
class Call:
    sent: float
    status: str = ""  # "OK", a gRPC status name, "NO_FINISH" or "LOST"
    detail: str = ""
    ttft: float | None = None
    seconds: float = 0.0
    retry_after_s: float | None = None


class Meter:
    """Tokens received per tenant inside a window [start, end) of perf_counter time."""

    def __init__(self) -> None:
        self.start = self.end = float("inf")
        self.tokens: Counter[str] = Counter()

    def open(self, seconds: float) -> None:
        self.start = time.perf_counter()
        self.end = self.start + seconds

    def add(self, tenant: str, n: int, now: float) -> None:
        if self.start <= now < self.end:
            self.tokens[tenant] += n


def write_key_file(path: Path, tenants: list[Tenant], limits: dict[str, int]) -> None:
    lines = []
    for t in tenants:
        lines += ["[[keys]]", f'name = "{t.name}-key"', f'tenant = "{t.name}"', 'role = "client"']
        lines += [f'sha256 = "{hash_key(t.key)}"', ""]
    for name, limit in limits.items():
        lines += [f"[tenants.{name}]", f"max_concurrent = {limit}", ""]
    path.write_text("\n".join(lines), encoding="utf-8")


def request(prompt: str, new_tokens: int) -> inference_pb2.GenerateRequest:
    return inference_pb2.GenerateRequest(prompt=prompt, max_new_tokens=new_tokens, temperature=0.0)


async def call(
    stub: inference_pb2_grpc.InferenceStub,
    tenant: Tenant,
    req: inference_pb2.GenerateRequest,
    timeout: float,
    meter: Meter,
) -> Call:
    start = time.perf_counter()
    rec = Call(start)
    finished = False

    async def consume() -> None:
        nonlocal finished
        async for chunk in stub.GenerateStream(req, timeout=timeout, metadata=tenant.metadata):
            now = time.perf_counter()
            if chunk.token_ids and rec.ttft is None:
                rec.ttft = now - start
            meter.add(tenant.name, len(chunk.token_ids), now)
            finished = finished or bool(chunk.finish_reason)

    try:
        await asyncio.wait_for(consume(), timeout + HANG_GRACE_S)
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


async def client(
    stub: inference_pb2_grpc.InferenceStub,
    tenant: Tenant,
    req: inference_pb2.GenerateRequest,
    stop: asyncio.Event,
    calls: list[Call],
    meter: Meter,
    timeout: float,
    rng: random.Random,
) -> None:
    """Send `req` back to back until `stop`; after a refusal, back off as the server says."""
    while not stop.is_set():
        rec = await call(stub, tenant, req, timeout, meter)
        calls.append(rec)
        if rec.status == "RESOURCE_EXHAUSTED":
            delay = min((rec.retry_after_s or DEFAULT_RETRY_S) * rng.uniform(1, 1.5), MAX_BACKOFF_S)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)


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
        "ttft_ms": latency_ms([c.ttft for c in ok if c.ttft is not None]),
        "e2e_ms": latency_ms([c.seconds for c in ok]),
        "refusal_ms": latency_ms([c.seconds for c in refused]),
        "retry_after_ms": latency_ms([c.retry_after_s for c in refused if c.retry_after_s]),
        "tokens_in_window": tokens,
        "tokens_per_s": tokens / seconds,
    }


# -- 1. fairness -------------------------------------------------------------------------------
async def fairness_phase(
    address: str, a: Tenant, b: Tenant, flood: bool, args: argparse.Namespace
) -> dict:
    async with (
        grpc.aio.insecure_channel(address) as channel_a,
        grpc.aio.insecure_channel(address) as channel_b,
    ):
        stub_a = inference_pb2_grpc.InferenceStub(channel_a)
        stub_b = inference_pb2_grpc.InferenceStub(channel_b)
        meter, rng = Meter(), random.Random(args.seed)
        for stub, tenant in ((stub_a, a), (stub_b, b)):  # connect; and both keys work
            warm = await call(stub, tenant, request(B_PROMPT, 2), args.request_timeout, meter)
            if warm.status != "OK":
                raise RuntimeError(f"warm-up for {tenant.name}: {warm.status}: {warm.detail}")
        a_calls: list[Call] = []
        b_calls: list[Call] = []
        stop_a, stop_b = asyncio.Event(), asyncio.Event()
        req_a, req_b = request(A_PROMPT, args.a_new_tokens), request(B_PROMPT, args.b_new_tokens)
        timeout = args.request_timeout
        flooders = [
            asyncio.create_task(client(stub_a, a, req_a, stop_a, a_calls, meter, timeout, rng))
            for _ in range(args.flood_clients if flood else 0)
        ]
        if flooders:
            await asyncio.sleep(args.ramp_seconds)
        meter.open(args.phase_seconds)
        asyncio.get_running_loop().call_later(args.phase_seconds, stop_b.set)
        await asyncio.gather(
            *(
                client(stub_b, b, req_b, stop_b, b_calls, meter, timeout, rng)
                for _ in range(args.b_clients)
            )
        )
        stop_a.set()
        await asyncio.gather(*flooders)
    window = args.phase_seconds
    result = {
        "b": summarize(b_calls, meter.tokens[b.name], window),
        "a": summarize(a_calls, meter.tokens[a.name], window) if flood else None,
        "tokens_per_s": sum(meter.tokens.values()) / window,
    }
    log_phase(result)
    return result


def log_phase(result: dict) -> None:
    b, a = result["b"], result["a"] or {}
    ttft = b["ttft_ms"] or {}
    log.info(
        "B: %d done, TTFT p50 %s ms p99 %s ms; A: %s done, %s refused; %.1f tok/s",
        *(b["completed"], _num(ttft.get("p50"), ".0f", 0), _num(ttft.get("p99"), ".0f", 0)),
        *(a.get("completed", "-"), a.get("resource_exhausted", "-"), result["tokens_per_s"]),
    )


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
        with server(args, home, where, flags) as proc:
            address = proc.wait_ready(args.startup_timeout)
            if name == "capped":
                with LoraplexClient(address, timeout=60, api_key=b.key) as c:
                    reply = c.model_info()
                fields = ("model_id", "device", "dtype", "quantization", "max_batch_size")
                info = {k: getattr(reply, k) for k in fields}
                log.info(
                    "phase B alone: %d B clients for %.0f s", args.b_clients, args.phase_seconds
                )
                phases["alone"] = asyncio.run(fairness_phase(address, a, b, False, args))
            log.info(
                "phase A floods + B, A max_concurrent %d: %d A clients", limit, args.flood_clients
            )
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
    calls: list[Call] = []
    meter, stop, rng = Meter(), asyncio.Event(), random.Random(args.seed)
    req = request(B_PROMPT, args.overload_new_tokens)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        await call(stub, tenant, request(B_PROMPT, 2), args.request_timeout, meter)  # connect
        meter.open(args.overload_seconds)
        asyncio.get_running_loop().call_later(args.overload_seconds, stop.set)
        await asyncio.gather(
            *(
                client(stub, tenant, req, stop, calls, meter, args.request_timeout, rng)
                for _ in range(clients)
            )
        )
    row = summarize(calls, sum(meter.tokens.values()), args.overload_seconds)
    row["attempts_per_s"] = len(calls) / args.overload_seconds
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
    with server(args, home, work, flags) as proc:
        address = proc.wait_ready(args.startup_timeout)
        process = psutil.Process(proc.pid)
        rss = [process.memory_info().rss]
        rounds = []
        for i in (1, 2):
            log.info("overload round %d: %d clients for %.0f s", i, clients, args.overload_seconds)
            rounds.append(asyncio.run(overload_round(address, tenant, clients, args)))
            rss.append(process.memory_info().rss)
        peak = peak_rss_bytes(proc.pid)
    return {
        "capacity": capacity,
        "clients": clients,
        "rounds": rounds,
        "rss_bytes": {"before": rss[0], "after_round_1": rss[1], "after_round_2": rss[2]},
        "rss_round_2_minus_round_1_bytes": rss[2] - rss[1],
        "peak_rss_bytes": peak,
    }


# -- the report --------------------------------------------------------------------------------
def _num(value: float | None, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def fairness_lines(fair: dict, cfg: dict) -> list[str]:
    lines = [
        f"1. fairness, {cfg['phase_seconds']:.0f} s per phase, --max-batch-size {cfg['batch']}: "
        f"B = {cfg['b_clients']} clients x {cfg['b_new_tokens']} new tokens, A = "
        f"{cfg['flood_clients']} clients x {cfg['a_new_tokens']} (greedy, base model); ms",
        f"{'phase':<28} {'B done':>6} {'TTFT p50':>8} {'TTFT p99':>8} {'p99/alone':>9} "
        f"{'A done':>6} {'A refused':>9} {'tok/s':>6} {'errors':>6}",
    ]
    names = {
        "alone": "B alone",
        "capped": f"A floods + B (A cap {cfg['a_limit']})",
        "uncapped": "A floods + B (no cap, VTC)",
    }
    for key, label in names.items():
        row = fair[key]
        b, a = row["b"], row["a"] or {}
        ttft = b["ttft_ms"] or {}
        errors = b["other_errors"] + b["lost"] + a.get("other_errors", 0) + a.get("lost", 0)
        lines.append(
            f"{label:<28} {b['completed']:>6} {_num(ttft.get('p50'), '.0f', 8)} "
            f"{_num(ttft.get('p99'), '.0f', 8)} {_num(row.get('b_ttft_p99_over_alone'), '.2f', 9)} "
            f"{_num(a.get('completed'), 'd', 6)} {_num(a.get('resource_exhausted'), 'd', 9)} "
            f"{row['tokens_per_s']:>6.1f} {errors:>6}"
        )
        for sample in b["error_samples"] + a.get("error_samples", []):
            lines.append(f"  error: {sample}")
    for key in ("capped", "uncapped"):
        ratio = fair[key]["b_ttft_p99_over_alone"]
        verdict = "?" if ratio is None else "met" if ratio <= TTFT_TARGET else "MISSED"
        lines.append(
            f"  {names[key]}: B p99 TTFT {_num(ratio, '.2f', 0)}x alone "
            f"(target <= {TTFT_TARGET:.0f}x: {verdict})"
        )
    return lines


def overload_lines(over: dict, cfg: dict) -> list[str]:
    mib = 2**20
    lines = [
        f"2. overload, {cfg['overload_seconds']:.0f} s per round: --max-batch-size "
        f"{cfg['overload_batch']} --max-queue {cfg['overload_queue']} (capacity "
        f"{over['capacity']}), {over['clients']} clients ({cfg['overload_factor']}x), "
        f"{cfg['overload_new_tokens']} new tokens; ms",
        f"{'round':<5} {'sent':>6} {'accepted':>8} {'completed':>9} {'refused':>7} "
        f"{'other err':>9} {'lost':>4} {'refusal p50':>11} {'refusal p99':>11} {'tok/s':>6} "
        f"{'RSS MiB':>7}",
    ]
    rss = over["rss_bytes"]
    for i, (row, after) in enumerate(
        zip(over["rounds"], [rss["after_round_1"], rss["after_round_2"]], strict=True), 1
    ):
        refusal = row["refusal_ms"] or {}
        lines.append(
            f"{i:<5} {row['sent']:>6} {row['accepted']:>8} {row['completed']:>9} "
            f"{row['resource_exhausted']:>7} {row['other_errors']:>9} {row['lost']:>4} "
            f"{_num(refusal.get('p50'), '.1f', 11)} {_num(refusal.get('p99'), '.1f', 11)} "
            f"{row['tokens_per_s']:>6.1f} {after / mib:>7.0f}"
        )
        for sample in row["error_samples"]:
            lines.append(f"  error: {sample}")
    ok = all(r["other_errors"] == 0 and r["lost"] == 0 for r in over["rounds"])
    lines.append(
        f"  server RSS: before {rss['before'] / mib:.0f} MiB, after round 1 "
        f"{rss['after_round_1'] / mib:.0f}, after round 2 {rss['after_round_2'] / mib:.0f} "
        f"(round 2 - round 1: {over['rss_round_2_minus_round_1_bytes'] / mib:+.1f} MiB)"
    )
    lines.append(f"  targets 0 other errors, 0 lost: {'met' if ok else 'MISSED'}")
    return lines


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]) if __doc__ else None,
    )
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
    add("--seed", type=int, default=0, help="seed of the back-off jitter")
    add("--model", help="served model (default: the embedded SmolLM2)")
    add("--home", default=os.environ.get("LORAPLEX_HOME", "~/.cache/loraplex"))
    add("--out", default="benchmarks/results/tenancy.json")
    add("--serve-args", default="", help="extra `loraplex serve` flags, for every server")
    add("--startup-timeout", type=float, default=900.0)
    add("--keep-work", action="store_true", help="keep the temporary directory")
    args = parser.parse_args(argv)
    counts = ("b_clients", "flood_clients", "a_limit", "batch", "overload_batch", "overload_queue")
    for name in (*counts, "overload_factor", "b_new_tokens", "a_new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.phase_seconds, args.overload_seconds, args.request_timeout) <= 0:
        parser.error("durations must be > 0")
    args.extra = shlex.split(args.serve_args)
    owned = {"--port", "--home", "--adapter-store", "--adapter-root", "--model", "--auth-keys"}
    owned |= {"--max-batch-size", "--max-queue"}
    clash = [a for a in args.extra if a.split("=", 1)[0] in owned]
    if clash:
        parser.error(f"set by the benchmark, not through the server's flags: {' '.join(clash)}")
    return args


def server(args: argparse.Namespace, home: Path, work: Path, flags: list[str]) -> ServerProcess:
    argv = serve_command(argparse.Namespace(model=args.model, extra=flags + args.extra), home, work)
    return ServerProcess(argv, work / "server.log")


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: servers are stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    home = Path(args.home).expanduser()
    work = Path(tempfile.mkdtemp(prefix="loraplex-tenancy-"))
    tenants = [Tenant(name, new_key()) for name in ("tenant-a", "tenant-b", "tenant-c")]
    start = time.perf_counter()
    try:
        fair, info = run_fairness(args, home, work, tenants)
        over = run_overload(args, home, work / "overload", tenants[2])
    finally:
        if args.keep_work:
            log.info("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    config = {k: v for k, v in vars(args).items() if k not in ("home", "out", "keep_work", "extra")}
    config.update(serve_args=args.extra, model_info=info, cpus=os.cpu_count())
    report = {
        "config": config,
        "fairness": fair,
        "overload": over,
        "benchmark_client_peak_rss_bytes": peak_rss_bytes(),
        "wall_seconds": time.perf_counter() - start,
    }
    sys.stdout.write(
        "\n".join([*fairness_lines(fair, config), "", *overload_lines(over, config)]) + "\n"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s (%.0f s in all)", out, report["wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
