"""Online latency under open-loop load, through the real gRPC server.

Starts `loraplex serve` as a subprocess (temporary adapter store, port 0), registers K random
all-linear LoRA adapters made with PEFT (benchmarks/harness.py), and streams chat prompts of
64-128 tokens (greedy, --new-tokens at most; EOS may end some early: the tokens actually
received are what is counted), adapters round-robin:

    unloaded   requests one at a time: the latency floor (TTFT, ITL, e2e)
    burst      --burst requests at once: the capacity (output tok/s, requests/s)
    load X     Poisson arrivals (seeded exponential gaps) at X x the burst capacity in
               requests/s, --requests requests each, open loop from one asyncio event loop

TTFT is the first streamed chunk carrying tokens; a chunk may carry several tokens, so each
of them gets an inter-token latency of (gap since the previous chunk) / (tokens in the chunk).
The table ends with the server's peak RSS (VmHWM of the subprocess) and this process' own.

    python benchmarks/online.py [--adapters 32] [--requests 64] [--rates 0.3,0.5,0.7,0.9]
        [--new-tokens 64] [--serve-args="--max-batch-size 64 --max-loras 32"]

Engine flags reach the server through --serve-args (one shell-quoted string) or --server-arg
(repeatable, one word each); write them with `=` (`--server-arg=--max-loras=32`) so they are
not taken for this script's own options. The adapters are made in a child process, so this
process' peak RSS is that of the load generator alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import grpc

from loraplex.server.client import LoraplexClient
from loraplex.v1 import inference_pb2, inference_pb2_grpc

from harness import (
    ADAPTER_PREFIX,
    StreamResult,
    add_common_args,
    add_server_args,
    child_pool,
    format_table,
    make_adapters_and_prompts,
    make_parser,
    peak_rss_bytes,
    percentile,
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

TTFT_TARGET = 3.0  # p99 TTFT at 0.7 load within 3x the unloaded TTFT
TARGET_LOAD = 0.7


# -- the phases --------------------------------------------------------------------------------
@dataclass
class Workload:
    prompts: list[str]
    adapter_ids: list[str]
    """Round-robin over these ("" = the base model when there are no adapters)."""
    new_tokens: int
    timeout: float
    counter: int = 0

    def next_request(self, max_new_tokens: int | None = None) -> inference_pb2.GenerateRequest:
        i = self.counter
        self.counter += 1
        return inference_pb2.GenerateRequest(
            adapter_id=self.adapter_ids[i % len(self.adapter_ids)],
            messages=user_message(self.prompts[i % len(self.prompts)]),
            max_new_tokens=max_new_tokens or self.new_tokens,
            temperature=0.0,
        )


async def run_phases(address: str, work: Workload, args: argparse.Namespace) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(
            request: inference_pb2.GenerateRequest, request_id: str | None = None
        ) -> StreamResult:
            return await stream_one(stub, request, work.timeout, request_id)

        # Warm-up: every adapter once (loaded from the store), then the sequential path.
        log.info("warm-up: %d short requests", len(work.adapter_ids) + 2)
        warm = [work.next_request(2) for _ in work.adapter_ids]
        summarize_streams(await asyncio.gather(*(one(r) for r in warm)))
        for _ in range(2):
            summarize_streams([await one(work.next_request(2))])

        log.info("unloaded: %d requests one at a time", args.unloaded)
        unloaded = summarize_streams(
            [await one(work.next_request(), f"unloaded-{i}") for i in range(args.unloaded)]
        )
        log_phase("unloaded", unloaded)

        log.info("burst: %d requests at once", args.burst)
        burst = summarize_streams(
            await asyncio.gather(*(one(work.next_request()) for _ in range(args.burst)))
        )
        log_phase("burst", burst)
        capacity = burst["requests_per_s"]

        loads = []
        for i, fraction in enumerate(args.rates):
            rate = fraction * capacity
            rng = random.Random(args.seed + i)
            gaps = [0.0] + [rng.expovariate(rate) for _ in range(args.requests - 1)]
            offsets = list(accumulate(gaps))
            log.info(
                "load %.2f: %d Poisson arrivals at %.3f req/s (%.1f s of arrivals)",
                fraction,
                args.requests,
                rate,
                offsets[-1],
            )
            await asyncio.sleep(args.pause)
            tasks = []
            t0 = time.perf_counter()
            for offset in offsets:
                delay = t0 + offset - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                name = f"load{fraction:g}-{len(tasks)}"
                tasks.append(asyncio.create_task(one(work.next_request(), name)))
            arrivals = time.perf_counter() - t0
            row = summarize_streams(list(await asyncio.gather(*tasks)))
            unloaded_ttft = unloaded["ttft_ms"]["p50"] if unloaded["ttft_ms"] else None
            row.update(
                load=fraction,
                offered_rps=rate,
                arrival_rps=(args.requests - 1) / arrivals if arrivals > 0 else None,
                ttft_p99_over_unloaded=(
                    row["ttft_ms"]["p99"] / unloaded_ttft
                    if row["ttft_ms"] and unloaded_ttft
                    else None
                ),
            )
            log_phase(f"load {fraction:.2f}", row)
            loads.append(row)
    return {"unloaded": unloaded, "burst": burst, "loads": loads}


def log_phase(name: str, row: dict) -> None:
    ttft = row["ttft_ms"] or {}
    itl = row["itl_ms"] or {}
    log.info(
        "%s: %.1f out tok/s, %.3f req/s, TTFT p50 %.0f ms p99 %.0f ms, ITL p50 %.1f ms, %d errors",
        name,
        row["output_tokens_per_s"],
        row["requests_per_s"],
        ttft.get("p50", math.nan),
        ttft.get("p99", math.nan),
        itl.get("p50", math.nan),
        row["errors"],
    )


# -- the report --------------------------------------------------------------------------------
COLS = [
    ("phase", 10, "s"),
    ("offered", 8, ".3f"),
    ("req/s", 7, ".3f"),
    ("tok/s", 8, ".1f"),
    ("TTFT p50", 9, ".0f"),
    ("TTFT p99", 9, ".0f"),
    ("ITL p50", 8, ".1f"),
    ("ITL p99", 8, ".1f"),
    ("e2e p50", 8, ".0f"),
    ("e2e p99", 8, ".0f"),
    ("p99/unl", 8, ".2f"),
    ("err", 4, "d"),
]


def table_row(name: str, row: dict, offered: float | None, ratio: float | None) -> list[object]:
    ttft, itl, e2e = (row[k] or {} for k in ("ttft_ms", "itl_ms", "e2e_ms"))
    return [
        name,
        offered,
        row["requests_per_s"],
        row["output_tokens_per_s"],
        ttft.get("p50"),
        ttft.get("p99"),
        itl.get("p50"),
        itl.get("p99"),
        e2e.get("p50"),
        e2e.get("p99"),
        ratio,
        row["errors"],
    ]


def table(report: dict) -> str:
    cfg = report["config"]
    info = cfg.get("model_info", {})
    head = (
        f"{cfg['adapters']} adapters (r={cfg['rank']} all-linear, round-robin), "
        f"{cfg['new_tokens']} new tokens max, greedy; {cfg['requests']} requests per load; "
        f"server: {info.get('device', '?')}, max_batch_size {info.get('max_batch_size', '?')}, "
        f"max_loras {info.get('max_loras', '?')}; times in ms, offered/req/s in requests/s"
    )
    rows = [
        table_row("unloaded", report["unloaded"], None, None),
        table_row(f"burst {report['burst']['requests']}", report["burst"], None, None),
    ]
    for row in report["loads"]:
        ratio = row["ttft_p99_over_unloaded"]
        rows.append(table_row(f"load {row['load']:.2f}", row, row["offered_rps"], ratio))
    lines = [head, *format_table(COLS, rows)]
    target = next((r for r in report["loads"] if math.isclose(r["load"], TARGET_LOAD)), None)
    if target and target["ttft_p99_over_unloaded"] is not None:
        ok = target["ttft_p99_over_unloaded"] <= TTFT_TARGET
        lines.append(
            f"p99 TTFT at {TARGET_LOAD} load = {target['ttft_p99_over_unloaded']:.2f}x unloaded "
            f"(target <= {TTFT_TARGET:.0f}x: {'met' if ok else 'MISSED'})"
        )
    trace = report.get("ttft_trace") or {}
    parts = [p.removesuffix("_s") for p in TRACE_PARTS]
    if trace:
        lines.append("where TTFT goes (server request log), ms: p50 / p99 of each part")
        lines += format_table(
            [("phase", 10, "s"), *((p, 13, "s") for p in parts)],
            [[phase, *(_p50_p99(v.get(p)) for p in TRACE_PARTS)] for phase, v in trace.items()],
        )
    for phase, slowest in (report.get("ttft_slowest") or {}).items():
        lines.append(
            f"slowest first tokens at {phase}, ms: "
            + "; ".join(
                f"{r['ttft_ms']:.0f} ("
                + ", ".join(f"{p} {r[p]:.0f}" for p in parts if r.get(p, 0) >= 1)
                + ")"
                for r in slowest
            )
        )
    gc_pauses = report.get("gc_pauses") or {}
    if gc_pauses:
        lines.append(
            "server garbage collections during the phases: "
            + ", ".join(
                f"generation {g}: {int(v.get('collections', 0))} "
                f"({v.get('seconds', 0) * 1e3:.0f} ms in all)"
                for g, v in sorted(gc_pauses.items())
            )
        )
    mem = report["memory"]

    def mib(n: int | None) -> str:
        return f"{n / 2**20:.0f} MiB" if n else "?"

    lines.append(
        f"peak RSS: server {mib(mem['server_peak_rss_bytes'])}, "
        f"benchmark client {mib(mem['bench_peak_rss_bytes'])}"
    )
    return "\n".join(lines) + "\n"


def _p50_p99(part: dict[str, float] | None) -> str:
    return f"{part['p50']:.0f} / {part['p99']:.0f}" if part else "-"


TRACE_PARTS = ("prepare_s", "queue_s", "load_s", "wait_s", "prefill_s", "deliver_s")


def ttft_trace(server_log: Path) -> dict[str, dict[str, dict[str, float]]]:
    """Per phase (the request ids' prefix: unloaded, load0.7, ...), p50 and p99 in ms of each
    part of the TTFT the server's request log gives (runtime/telemetry.ttft_breakdown)."""
    parts: dict[str, dict[str, list[float]]] = {}
    for phase, entry in _logged_requests(server_log):
        for name, value in (entry.get("ttft_breakdown") or {}).items():
            if value is not None:
                parts.setdefault(phase, {}).setdefault(name, []).append(value * 1e3)
    return {
        phase: {
            name: {"p50": percentile(values, 50), "p99": percentile(values, 99)}
            for name, values in found.items()
        }
        for phase, found in parts.items()
    }


def ttft_slowest(server_log: Path, n: int = 3) -> dict[str, list[dict[str, object]]]:
    """Per load phase, the `n` requests slowest to their first token (as the server saw it),
    each with its TTFT breakdown in ms: what a p99 is made of."""
    found: dict[str, list[dict[str, object]]] = {}
    for phase, entry in _logged_requests(server_log):
        if phase.startswith("load") and entry.get("ttft_s") is not None:
            breakdown = entry.get("ttft_breakdown") or {}
            found.setdefault(phase, []).append(
                {
                    "request_id": entry["request_id"],
                    "ttft_ms": entry["ttft_s"] * 1e3,
                    **{
                        k.removesuffix("_s"): v * 1e3 for k, v in breakdown.items() if v is not None
                    },
                }
            )
    return {
        phase: sorted(rows, key=lambda r: -float(r["ttft_ms"]))[:n]  # type: ignore[arg-type]
        for phase, rows in found.items()
    }


def _logged_requests(server_log: Path) -> Iterator[tuple[str, dict]]:
    """(phase, entry) for each request of a measured phase in the server's JSON request log."""
    for line in server_log.read_text(errors="replace").splitlines():
        if not line.startswith("{") or '"ttft_breakdown"' not in line:
            continue
        entry = json.loads(line)
        phase = str(entry.get("request_id", "")).rsplit("-", 1)[0]
        if phase == "unloaded" or phase.startswith("load"):
            yield phase, entry


def gc_delta(
    before: dict[str, dict[str, float]], after: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """The garbage collections (and their seconds) between two reads of the server's
    loraplex_gc_pause_seconds, per generation."""
    return {
        generation: {
            key: value - before.get(generation, {}).get(key, 0.0) for key, value in now.items()
        }
        for generation, now in after.items()
    }


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = make_parser(__doc__)
    parser.add_argument("--adapters", type=int, default=32, help="distinct adapters (0 = base)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64, help="requests per load level")
    parser.add_argument(
        "--rates",
        default="0.3,0.5,0.7,0.9",
        help="load levels: fractions of the burst capacity in requests/s",
    )
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--unloaded", type=int, default=8, help="requests sent one at a time")
    parser.add_argument("--burst", type=int, default=64, help="requests sent at once")
    parser.add_argument("--seed", type=int, default=0, help="seed of the arrival times")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds idle between phases")
    add_common_args(parser, "online")
    add_server_args(parser, 'extra `loraplex serve` flags, e.g. "--max-loras 32"')
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one extra `loraplex serve` word (repeatable): --server-arg=--max-loras=32",
    )
    parser.add_argument("--request-timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    try:
        args.rates = [float(x) for x in args.rates.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--rates: comma-separated numbers, got {args.rates!r}")
    if not args.rates or any(r <= 0 for r in args.rates):
        parser.error("--rates: give positive fractions of the capacity")
    for name in ("requests", "new_tokens", "unloaded", "burst", "rank"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.adapters < 0:
        parser.error("--adapters must be >= 0")
    args.extra = server_flags(parser, args.serve_args, args.server_arg)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    home = Path(args.home).expanduser()
    n_prompts = max(args.requests, args.burst, args.unloaded, 1)
    with (
        work_dir("loraplex-online-", args.keep_work) as work,
        child_pool() as pool,  # leaving it terminates the child
        # JSON logs: the request log's lines carry each request's TTFT breakdown
        server_process(home, work, [*args.extra, "--log-format", "json"], args.model) as server,
    ):
        # The child makes the adapters while the server loads the model.
        made = pool.apply_async(
            make_adapters_and_prompts,
            (str(home), args.model, args.adapters, args.rank, n_prompts, str(work / "peft")),
        )
        address = server.wait_ready(args.startup_timeout)
        prompts = made.get(args.startup_timeout)
        pool.close()  # the child exits, and the base model it loaded with it
        pool.join()
        ids = [f"{ADAPTER_PREFIX}{i}" for i in range(args.adapters)]
        with LoraplexClient(address, timeout=600) as client:
            info = client.model_info()
            register_adapters(client, work / "peft", ids)
        if info.max_loras < args.adapters:
            log.warning(
                "the server holds %d adapters in slots at once, fewer than the %d in use: "
                "expect slot swaps (raise it with --serve-args='--max-loras %d')",
                info.max_loras,
                args.adapters,
                args.adapters,
            )
        workload = Workload(prompts, ids or [""], args.new_tokens, args.request_timeout)
        gc_before = server.gc_pauses()
        phases = asyncio.run(run_phases(address, workload, args))
        phases["gc_pauses"] = gc_delta(gc_before, server.gc_pauses())
        server_rss = server.peak_rss_bytes()
        phases["ttft_trace"] = ttft_trace(work / "server.log")
        phases["ttft_slowest"] = ttft_slowest(work / "server.log")
    report = {
        "config": {
            "adapters": args.adapters,
            "rank": args.rank,
            "requests": args.requests,
            "burst": args.burst,
            "unloaded": args.unloaded,
            "new_tokens": args.new_tokens,
            "rates": args.rates,
            "seed": args.seed,
            "serve_args": args.extra,
            "model_info": {
                "model_id": info.model_id,
                "device": info.device,
                "dtype": info.dtype,
                "quantization": info.quantization,
                "max_batch_size": info.max_batch_size,
                "max_loras": info.max_loras,
                "max_lora_rank": info.max_lora_rank,
                "version": info.version,
            },
            "cpus": os.cpu_count(),
        },
        **phases,
        "capacity": {
            "requests_per_s": phases["burst"]["requests_per_s"],
            "output_tokens_per_s": phases["burst"]["output_tokens_per_s"],
        },
        "memory": {
            "server_peak_rss_bytes": server_rss,
            "bench_peak_rss_bytes": peak_rss_bytes(),
        },
    }
    # The machine as a fresh process sees it, as the server started (this one has no torch).
    publish(report, table(report), args.out, fresh_process=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
