"""The same mixed-adapter workload over gRPC and over the OpenAI-compatible HTTP API, one server.

`loraplex serve` with its default flags; --requests chat requests (64-128 token prompts) sent
at once, request i on adapter i mod --adapters (random r16 all-linear PEFT adapters), greedy,
--new-tokens each whatever the model says, streamed:

    grpc    GenerateStream (grpc.aio, one channel)
    http    POST /v1/chat/completions with stream: true and stream_options.include_usage
            (aiohttp, one connection per request), Server-Sent Events

The protocols take turns, --rounds bursts each (grpc, http, grpc, http, ...), so both see the
same machine; per protocol the median burst. Output tokens per second (from the usage each
stream ends with), TTFT p50 / p99, inter-chunk latency p50, and where the time goes: CPU
seconds per 1000 tokens of the server process and of this client; HTTP's as a ratio of gRPC's.

    python benchmarks/protocols.py [--requests 64] [--adapters 32] [--new-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from loraplex.server.client import LoraplexClient

from harness import (
    ADAPTER_PREFIX,
    StreamResult,
    add_common_args,
    add_server_args,
    burst_summary,
    child_pool,
    format_table,
    make_adapters_and_prompts,
    make_parser,
    publish,
    register_adapters,
    run_main,
    server_flags,
    server_process,
    setup_logging,
    summarize_streams,
    work_dir,
)

log = logging.getLogger("benchmark")
PROTOCOLS = ("grpc", "http")


async def http_stream(session: Any, url: str, body: dict[str, Any]) -> StreamResult:
    """One streamed chat completion. TTFT is the first chunk with content; the completion
    tokens are the usage chunk's (a chunk may hold more than one token)."""
    start = time.perf_counter()
    result = StreamResult(body["model"], start)
    last: float | None = None
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:200]}"
                return result
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.usage_tokens = chunk["usage"]["completion_tokens"]
                    result.prompt_tokens = chunk["usage"]["prompt_tokens"]
                for choice in chunk.get("choices", []):
                    if choice["delta"].get("content"):
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.itls.append(now - last)
                        last = now
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
        result.e2e = time.perf_counter() - start
        result.tokens = result.usage_tokens or 0
    except OSError as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


def http_burst(
    port: int, model_ids: list[str], prompts: list[str], new_tokens: int
) -> dict[str, Any]:
    """len(prompts) streamed chat completions sent at once, prompt i on model_ids[i]."""
    import aiohttp

    async def burst() -> list[StreamResult]:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=900)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            bodies = [
                {
                    "model": model,
                    "messages": [{"role": "user", "content": p}],
                    "max_tokens": new_tokens,
                    "temperature": 0,
                    "ignore_eos": True,
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
                for p, model in zip(prompts, model_ids, strict=True)
            ]
            return list(await asyncio.gather(*(http_stream(session, url, b) for b in bodies)))

    return summarize_streams(asyncio.run(burst()))


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def median_of(bursts: list[dict[str, Any]], *keys: str) -> float | None:
    values = []
    for burst in bursts:
        value: Any = burst
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(float(value))
    return statistics.median(values) if values else None


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="bursts per protocol")
    parser.add_argument("--rank", type=int, default=16)
    add_server_args(parser, "extra `loraplex serve` flags (default: none)")
    add_common_args(parser, "protocols")
    args = parser.parse_args()
    extra = server_flags(parser, args.serve_args, [], owned=("--http-port",))
    setup_logging()
    home = Path(args.home).expanduser()
    names = [f"{ADAPTER_PREFIX}{i}" for i in range(args.adapters)]
    bursts: dict[str, list[dict[str, Any]]] = {p: [] for p in PROTOCOLS}
    with (
        work_dir("loraplex-protocols-", args.keep_work) as work,
        child_pool() as pool,
        server_process(home, work, extra, args.model) as server,
    ):
        made = pool.apply_async(
            make_adapters_and_prompts,
            (str(home), args.model, len(names), args.rank, args.requests, str(work / "peft")),
        )
        address = server.wait_ready(args.startup_timeout)
        prompts = made.get(args.startup_timeout)
        with LoraplexClient(address, timeout=600) as client:
            register_adapters(client, work / "peft", names)
            base = client.model_info().model_id
        ids = [names[i % len(names)] for i in range(args.requests)] if names else []
        models = ids or [base] * args.requests
        burst_summary(address, prompts, names, 8)  # warm: every adapter loaded once
        for round_ in range(args.rounds):
            for protocol in PROTOCOLS:
                cpu = cpu_seconds(server.pid), cpu_seconds()
                if protocol == "grpc":
                    summary = burst_summary(address, prompts, names, args.new_tokens)
                else:
                    summary = http_burst(server.http_port, models, prompts, args.new_tokens)
                # Where the time goes: the server's CPU (engine and front end) and the
                # client's own, per 1000 tokens; both share the machine's cores.
                tokens = summary["completion_tokens"] / 1000
                summary["server_cpu_s_per_1k_tokens"] = (cpu_seconds(server.pid) - cpu[0]) / tokens
                summary["client_cpu_s_per_1k_tokens"] = (cpu_seconds() - cpu[1]) / tokens
                bursts[protocol].append(summary)
                log.info(
                    "round %d %s: %.1f tok/s, TTFT p50 %.0f ms",
                    round_ + 1,
                    protocol,
                    summary["output_tokens_per_s"],
                    (summary["ttft_ms"] or {}).get("p50", float("nan")),
                )
    rows = []
    for protocol in PROTOCOLS:
        rows.append(
            {
                "protocol": protocol,
                "output_tokens_per_s": median_of(bursts[protocol], "output_tokens_per_s"),
                "ttft_p50_ms": median_of(bursts[protocol], "ttft_ms", "p50"),
                "ttft_p99_ms": median_of(bursts[protocol], "ttft_ms", "p99"),
                "itl_p50_ms": median_of(bursts[protocol], "itl_ms", "p50"),
                "server_cpu_s_per_1k": median_of(bursts[protocol], "server_cpu_s_per_1k_tokens"),
                "client_cpu_s_per_1k": median_of(bursts[protocol], "client_cpu_s_per_1k_tokens"),
                "errors": sum(b["errors"] for b in bursts[protocol]),
            }
        )
    grpc_row, http_row = rows
    ratios = {
        key: (http_row[key] / grpc_row[key]) if http_row[key] and grpc_row[key] else None
        for key in ("output_tokens_per_s", "ttft_p50_ms", "ttft_p99_ms", "itl_p50_ms")
    }
    cols = [("protocol", 8, "s"), ("tok/s", 8, ".1f"), ("TTFT p50", 9, ".0f"),
            ("TTFT p99", 9, ".0f"), ("ITL p50", 8, ".1f"), ("srv CPU/1k", 10, ".2f"),
            ("cli CPU/1k", 10, ".2f"), ("errors", 6, "d")]  # fmt: skip
    table = format_table(
        cols,
        [
            [r["protocol"], r["output_tokens_per_s"], r["ttft_p50_ms"], r["ttft_p99_ms"],
             r["itl_p50_ms"], r["server_cpu_s_per_1k"], r["client_cpu_s_per_1k"], r["errors"]]
            for r in rows
        ],
    )  # fmt: skip
    table.append(
        "http/grpc: "
        + ", ".join(f"{k} {v:.3f}x" for k, v in ratios.items() if v is not None)
        + f"  ({args.requests} requests over {args.adapters} adapters, median of "
        f"{args.rounds} bursts each)"
    )
    report = {"args": vars(args), "rows": rows, "ratios": ratios, "bursts": bursts}
    publish(report, table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
