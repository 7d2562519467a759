"""What one user sees: a stream's tokens/s and inter-token latency at low concurrency.

Through each system's real server with its default flags, the same prompts (chat, 64-128
tokens), greedy, end of sequence ignored, --new-tokens per request. At each concurrency C of
--concurrency, C requests are sent at once (for C = 1, --single-runs of them one after another),
on the base and on one adapter (a random r16 all-linear PEFT adapter), and at the highest C on
--mixed adapters at once (request i on adapter i mod K):

    loraplex    `loraplex serve`, gRPC GenerateStream (adapter_id)
    llama.cpp   `llama-server -t <threads> -np <max C>` on the embedded model's own Q4_1 GGUF,
                the adapters converted with llama.cpp's convert_lora_to_gguf.py and chosen per
                request (`lora`: scale 1 for its adapter, 0 for the others); built by
                ../shared/peers/llama-cpp/setup.sh (or --llama-server / --llama-src)

Per row: stream tok/s (median over the streams of (tokens - 1) / (end - first token)),
aggregate tok/s (all tokens / wall time), inter-token latency p50 / p99, TTFT p50.

    python benchmarks/latency.py [--concurrency 1,4,16,64] [--new-tokens 128] [--mixed 8]
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from loraplex.core.model import EMBEDDED_NAME, embedded_gguf
from loraplex.server.client import LoraplexClient

from harness import (
    ADAPTER_PREFIX,
    StreamResult,
    add_common_args,
    add_server_args,
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
    stream_one,
    summarize_streams,
    user_message,
    work_dir,
)

log = logging.getLogger("benchmark")
LLAMA_SETUP = Path(__file__).resolve().parents[2] / "shared" / "peers" / "llama-cpp" / "setup.sh"
SYSTEMS = ("loraplex", "llama.cpp")


def loraplex_streams(
    address: str, prompts: list[str], adapters: list[str], new_tokens: int
) -> list[StreamResult]:
    """len(prompts) GenerateStream calls sent at once, prompt i on adapters[i] ("" for the
    base)."""
    import grpc

    from loraplex.v1 import inference_pb2, inference_pb2_grpc

    async def run() -> list[StreamResult]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            requests = [
                inference_pb2.GenerateRequest(
                    adapter_id=adapter,
                    messages=user_message(p),
                    max_new_tokens=new_tokens,
                    temperature=0.0,
                    ignore_eos=True,
                )
                for p, adapter in zip(prompts, adapters, strict=True)
            ]
            return list(await asyncio.gather(*(stream_one(stub, r, 900.0) for r in requests)))

    return asyncio.run(run())


def llama_stream(port: int, prompt: str, scales: list[float], new_tokens: int) -> StreamResult:
    """One streamed /v1/chat/completions call to llama-server (one token per SSE chunk), with
    each loaded adapter at its scale (every one named: an empty list applies them all)."""
    body = {
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": new_tokens,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "lora": [{"id": i, "scale": scale} for i, scale in enumerate(scales)],
    }
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    start = time.perf_counter()
    result = StreamResult("adapter" if any(scales) else "", start)
    last: float | None = None
    try:
        with urllib.request.urlopen(request, timeout=900) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                now = time.perf_counter()
                if chunk.get("usage"):
                    result.usage_tokens = chunk["usage"].get("completion_tokens")
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens")
                for choice in chunk.get("choices", []):
                    if choice.get("delta", {}).get("content"):
                        if last is None:
                            result.ttft = now - start
                        else:
                            result.itls.append(now - last)
                        last = now
                        result.tokens += 1
                    if choice.get("finish_reason"):
                        result.finish_reason = choice["finish_reason"]
        result.e2e = time.perf_counter() - start
    except OSError as exc:
        result.error = str(exc)
    return result


def llama_streams(
    port: int, loaded: list[str], prompts: list[str], adapters: list[str], new_tokens: int
) -> list[StreamResult]:
    """Prompt i on adapters[i] ("" for the base) of the `loaded` ones, all at once."""
    with ThreadPoolExecutor(len(prompts)) as pool:
        jobs = [
            pool.submit(llama_stream, port, p, [float(a == name) for name in loaded], new_tokens)
            for p, a in zip(prompts, adapters, strict=True)
        ]
        return [j.result() for j in jobs]


def summarize(results: list[StreamResult]) -> dict[str, Any]:
    """harness.summarize_streams' figures, plus each stream's own decode rate."""
    summary = summarize_streams(results)
    per_stream = [
        (r.tokens - 1) / (r.e2e - r.ttft)
        for r in results
        if r.error is None and r.ttft is not None and r.e2e is not None and r.e2e > r.ttft
        and r.tokens > 1
    ]  # fmt: skip
    itl, ttft = summary["itl_ms"] or {}, summary["ttft_ms"] or {}
    return {
        "requests": summary["requests"],
        "errors": summary["errors"],
        "tokens": summary["completion_tokens"],
        "stream_tokens_per_s": statistics.median(per_stream) if per_stream else None,
        "aggregate_tokens_per_s": summary["output_tokens_per_s"],
        "itl_p50_ms": itl.get("p50"),
        "itl_p99_ms": itl.get("p99"),
        "ttft_p50_ms": ttft.get("p50"),
    }


def measure(
    system: str,
    run: Any,
    prompts: list[str],
    adapters: list[str],
    on: str,
    levels: list[int],
    args: Any,
    rows: list[dict[str, Any]],
) -> None:
    """Each level's burst, request i on adapters[i % len(adapters)]; `on` names the case."""
    run(prompts[: len(adapters)], adapters, 8)  # warm-up (and the adapters' loads)
    for c in levels:
        if c == 1:
            results = [
                r
                for i in range(args.single_runs)
                for r in run([prompts[i]], adapters[:1], args.new_tokens)
            ]
        else:
            wanted = [adapters[i % len(adapters)] for i in range(c)]
            results = run(prompts[:c], wanted, args.new_tokens)
        row = {
            "system": system,
            "on": on,
            "adapter": any(adapters),
            "concurrency": c,
            **summarize(results),
        }
        rows.append(row)
        log.info("%s", row)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def llama_paths(args: Any) -> tuple[Path, Path] | None:
    """(llama-server, llama.cpp source dir): the flags, else what setup.sh built (or builds)."""
    if args.llama_server and args.llama_src:
        return Path(args.llama_server), Path(args.llama_src)
    if not LLAMA_SETUP.exists():
        return None
    out = subprocess.run(["bash", str(LLAMA_SETUP)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        log.warning("llama.cpp setup failed:\n%s", out.stderr[-2000:])
        return None
    binary, src = out.stdout.split()[-2:]
    return Path(binary), Path(src)


def start_llama(
    binary: Path, loras: list[Path], slots: int, context: int, threads: int, log_path: Path
) -> tuple[subprocess.Popen[bytes], int]:
    """llama-server with every adapter in one comma-separated --lora (a repeated --lora keeps
    only the last)."""
    port = free_port()
    argv = [
        str(binary), "-m", str(embedded_gguf()), "-t", str(threads), "-np", str(slots),
        "-c", str(context), "--jinja", "--lora", ",".join(str(p) for p in loras),
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, port
        except OSError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("llama-server was not healthy within 300 s")


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--concurrency", default="1,4,16,64")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--single-runs", type=int, default=3, help="requests at concurrency 1")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--llama-server", help="a llama-server binary (default: setup.sh's)")
    parser.add_argument("--llama-src", help="its llama.cpp source (convert_lora_to_gguf.py)")
    parser.add_argument("--skip-llama", action="store_true")
    parser.add_argument(
        "--mixed", type=int, default=8, help="adapters mixed at the highest C (0: none)"
    )
    add_server_args(parser, "extra `loraplex serve` flags (default: none)")
    add_common_args(parser, "latency")
    args = parser.parse_args()
    extra = server_flags(parser, args.serve_args, [])
    setup_logging()
    home = Path(args.home).expanduser()
    levels = [int(c) for c in args.concurrency.split(",")]
    wanted = max(max(levels), args.single_runs)
    names = [f"{ADAPTER_PREFIX}{i}" for i in range(max(1, args.mixed))]
    adapter = names[0]
    cases = [([""], "base", levels), ([adapter], "adapter", levels)]
    if args.mixed > 1:
        cases.append((names, f"{args.mixed} mixed", [max(levels)]))
    rows: list[dict[str, Any]] = []
    with work_dir("loraplex-latency-", args.keep_work) as work:
        with child_pool() as pool, server_process(home, work, extra, args.model) as server:
            made = pool.apply_async(
                make_adapters_and_prompts,
                (str(home), args.model, len(names), args.rank, wanted, str(work / "peft")),
            )
            address = server.wait_ready(args.startup_timeout)
            prompts = made.get(args.startup_timeout)
            with LoraplexClient(address, timeout=600) as client:
                info = client.model_info()
                register_adapters(client, work / "peft", names)

            def run_loraplex(ps: list[str], a: list[str], n: int) -> list[StreamResult]:
                return loraplex_streams(address, ps, a, n)

            for adapters, on, at in cases:
                measure("loraplex", run_loraplex, prompts, adapters, on, at, args, rows)
        paths = None if args.skip_llama or args.model else llama_paths(args)
        if paths is not None:
            binary, src = paths
            loras = [work / f"{name}.gguf" for name in names]
            for name, lora in zip(names, loras, strict=True):
                subprocess.run(
                    [sys.executable, str(src / "convert_lora_to_gguf.py"), "--base",
                     str(home / "models" / EMBEDDED_NAME), "--outtype", "f16", "--outfile",
                     str(lora), str(work / "peft" / name)],
                    check=True, capture_output=True,
                )  # fmt: skip
            # Each slot gets context / slots tokens: room for a prompt and its new tokens.
            slots = max(levels)
            context = slots * (160 + args.new_tokens)
            proc, port = start_llama(
                binary, loras, slots, context, args.threads, work / "llama.log"
            )
            try:

                def run_llama(ps: list[str], a: list[str], n: int) -> list[StreamResult]:
                    return llama_streams(port, names, ps, a, n)

                for adapters, on, at in cases:
                    measure("llama.cpp", run_llama, prompts, adapters, on, at, args, rows)
            finally:
                proc.terminate()
                proc.wait(60)
        elif not args.skip_llama:
            log.warning("no llama.cpp peer (run %s): loraplex only", LLAMA_SETUP)

    def peer(row: dict[str, Any], key: str) -> float | None:
        for r in rows:
            if (r["system"], r["on"], r["concurrency"]) == (
                "llama.cpp",
                row["on"],
                row["concurrency"],
            ):
                return r[key]
        return None

    for r in rows:
        for key in ("stream_tokens_per_s", "aggregate_tokens_per_s"):
            other = peer(r, key)
            r[f"{key}_vs_llama"] = r[key] / other if other and r[key] else None
    cols = [
        ("system", 9, ""), ("on", 8, ""), ("C", 3, ""), ("stream tok/s", 12, ".1f"),
        ("x llama", 7, ".2f"), ("total tok/s", 11, ".1f"), ("x llama", 7, ".2f"),
        ("ITL p50 ms", 10, ".1f"), ("ITL p99 ms", 10, ".1f"), ("TTFT p50 ms", 11, ".0f"),
    ]  # fmt: skip
    table = [
        [r["system"], r["on"], r["concurrency"],
         r["stream_tokens_per_s"], r["stream_tokens_per_s_vs_llama"],
         r["aggregate_tokens_per_s"], r["aggregate_tokens_per_s_vs_llama"],
         r["itl_p50_ms"], r["itl_p99_ms"], r["ttft_p50_ms"]]
        for r in rows
    ]  # fmt: skip
    lines = [
        f"C requests at once x {args.new_tokens} new tokens (EOS ignored), greedy; loraplex "
        f"{info.dtype} NF4, default flags; llama.cpp Q4_1, {args.threads} threads; C=1: "
        f"{args.single_runs} requests one after another",
        *format_table(cols, table),
    ]
    report = {"rows": rows, "config": vars(args) | {"serve_args": extra}}
    publish(report, lines, args.out, fresh_process=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
