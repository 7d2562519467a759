"""loraplex beside vLLM's CPU build, through each one's real server, in one run.

The same base (the embedded SmolLM2, as the checkpoint loraplex converted it), the same random
PEFT adapters (r16, all-linear), the same prompts, N requests at once x M new tokens, end of
sequence ignored (so both do the same work), at K = 0 (the base), and each K of --adapters
(request i uses adapter i mod K):

    loraplex   `loraplex serve` with its default flags, gRPC Generate / GenerateStream
    vLLM       vLLM's OpenAI server (../shared/peers/vllm-cpu: run its setup.sh first), with the
               tcmalloc + Intel OpenMP preloads its CPU docs ask for, --max-loras set to the
               largest K, /v1/chat/completions with ignore_eos, whole or streamed (SSE)

each prompt one user message (the same chat template makes the same ids on both; the table
shows the prompt tokens each server counted), in two modes: `complete` (one answer per
request) and `stream` (a message per token). Each figure is output tokens / wall time from the
first send to the last end, the median of --repeats bursts; both servers run side by side and
take their bursts in turn (one at a time), so the shared machine's drift falls on both. vLLM
has no bitsandbytes on the CPU: it serves the base in --vllm-dtype (bf16 by default; float32
on CPUs without native bf16), loraplex in NF4.

    python benchmarks/peers.py [--requests 64] [--new-tokens 64] [--adapters 8,32]
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from loraplex.core.model import EMBEDDED_NAME
from loraplex.server.client import LoraplexClient

from harness import (
    ADAPTER_PREFIX,
    add_common_args,
    add_server_args,
    burst_requests,
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
    work_dir,
)

log = logging.getLogger("benchmark")
PEER = Path(__file__).resolve().parents[2] / "shared" / "peers" / "vllm-cpu"
MODES = ("complete", "stream")  # one answer per request; a message per token
VLLM_PYTHON = Path.home() / ".cache" / "loraplex-peers" / "vllm" / "venv" / "bin" / "python"


def loraplex_burst(
    address: str, mode: str, prompts: list[str], ids: list[str], new_tokens: int
) -> tuple[float, float]:
    """One burst through loraplex: GenerateStream (harness.burst_summary), or Generate;
    (output tokens per second, mean prompt tokens)."""
    if mode == "stream":
        summary = burst_summary(address, prompts, ids, new_tokens)
        return float(summary["output_tokens_per_s"]), float(summary["mean_prompt_tokens"])
    import grpc

    from loraplex.v1 import inference_pb2_grpc

    async def burst() -> tuple[float, float]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            requests = burst_requests(prompts, ids, new_tokens)
            start = time.perf_counter()
            replies = await asyncio.gather(*(stub.Generate(r, timeout=900) for r in requests))
            seconds = time.perf_counter() - start
        tokens = sum(r.usage.completion_tokens for r in replies)
        return tokens / seconds, sum(r.usage.prompt_tokens for r in replies) / len(replies)

    return asyncio.run(burst())


def vllm_burst(
    port: int, mode: str, prompts: list[str], ids: list[str], new_tokens: int
) -> tuple[float, float]:
    """One burst through vLLM's /v1/chat/completions (one thread per request), whole or
    streamed; (output tokens per second, mean prompt tokens)."""
    stream = mode == "stream"

    def one(i: int) -> tuple[int, int]:
        body: dict[str, Any] = {
            "model": ids[i % len(ids)] if ids else "base",
            "messages": [{"role": "user", "content": prompts[i]}],
            "max_tokens": new_tokens,
            "temperature": 0.0,
            "ignore_eos": True,
        }
        if stream:
            body |= {"stream": True, "stream_options": {"include_usage": True}}
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=900) as reply:
            if not stream:
                usage = json.load(reply)["usage"]
            else:  # Server-Sent Events; the last chunk before [DONE] carries the usage
                usage = {}
                for line in reply:
                    data = line.decode().strip().removeprefix("data: ")
                    if data and data != "[DONE]":
                        usage = json.loads(data).get("usage") or usage
            return int(usage["completion_tokens"]), int(usage["prompt_tokens"])

    start = time.perf_counter()
    with ThreadPoolExecutor(len(prompts)) as pool:
        counts = list(pool.map(one, range(len(prompts))))
    seconds = time.perf_counter() - start
    return sum(c for c, _ in counts) / seconds, sum(p for _, p in counts) / len(counts)


def start_vllm(
    python: Path, model_dir: Path, adapters: Path, ids: list[str], args: Any, work: Path
) -> tuple[subprocess.Popen[bytes], int]:
    preload = subprocess.run(
        ["bash", str(PEER / "preloads.sh")], capture_output=True, text=True, check=False
    ).stdout.strip()
    port = 8123
    env = {
        **os.environ,
        "LD_PRELOAD": preload,
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 2) - 1}",
    }
    env.pop("PYTHONPATH", None)
    argv = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--served-model-name", "base", "--dtype", args.vllm_dtype, "--max-model-len", "2048"]
    argv += ["--max-num-seqs", str(args.requests), "--host", "127.0.0.1", "--port", str(port)]
    if ids:
        argv += ["--enable-lora", "--max-loras", str(len(ids)), "--max-lora-rank", str(args.rank)]
        argv += ["--lora-modules", *(f"{i}={adapters / i}" for i in ids)]
    log.info("starting vLLM (preload %s)", preload or "none")
    with open(work / "vllm.log", "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.startup_timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited:\n{(work / 'vllm.log').read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                return proc, port
        except OSError:
            if time.monotonic() > deadline:
                proc.kill()
                raise TimeoutError("vLLM did not start") from None
            time.sleep(2)


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--adapters", default="8,32", help="distinct adapter counts (besides 0)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="bursts per figure (median)")
    parser.add_argument("--vllm-python", default=str(VLLM_PYTHON))
    parser.add_argument("--vllm-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    add_server_args(parser, "extra `loraplex serve` flags (default: none)")
    add_common_args(parser, "peers")
    args = parser.parse_args()
    extra = server_flags(parser, args.serve_args, [])
    setup_logging()
    home = Path(args.home).expanduser()
    counts = [0, *(int(k) for k in args.adapters.split(","))]
    most = max(counts)
    ids = [f"{ADAPTER_PREFIX}{i}" for i in range(most)]
    rows: list[dict] = []

    def measure(k: int, systems: dict[str, Callable[..., tuple[float, float]]]) -> None:
        """Every system at K adapters, their bursts taken in turn (loraplex, vLLM, loraplex,
        ...), so that the shared machine's drift falls on all of them alike."""
        for burst in systems.values():
            burst(MODES[0], prompts, ids[:k], args.new_tokens)  # warm-up: loads the adapters
        for mode in MODES:
            runs: dict[str, list[tuple[float, float]]] = {name: [] for name in systems}
            for _ in range(args.repeats):
                for name, burst in systems.items():
                    runs[name].append(burst(mode, prompts, ids[:k], args.new_tokens))
            for name, got in runs.items():
                rates = [rate for rate, _ in got]
                rows.append(
                    {
                        "system": name,
                        "adapters": k,
                        "mode": mode,
                        "tokens_per_s": statistics.median(rates),
                        "mean_prompt_tokens": got[0][1],
                    }
                )
                median = rows[-1]["tokens_per_s"]
                log.info("%s K=%d %s: %.1f tok/s (%s)", name, k, mode, median, rates)

    with (
        work_dir("loraplex-peers-", args.keep_work) as work,
        child_pool() as pool,
        server_process(home, work, extra, args.model) as server,
    ):
        made = pool.apply_async(
            make_adapters_and_prompts,
            (str(home), args.model, most, args.rank, args.requests, str(work / "peft")),
        )
        address = server.wait_ready(args.startup_timeout)
        prompts = made.get(args.startup_timeout)
        with LoraplexClient(address, timeout=600) as client:
            info = client.model_info()
            register_adapters(client, work / "peft", ids)
        python = Path(args.vllm_python)
        if not python.exists():
            log.warning("no vLLM peer at %s (run %s/setup.sh): loraplex only", python, PEER)
        model_dir = Path(args.model) if args.model else home / "models" / EMBEDDED_NAME
        for k in counts:  # one vLLM per K: --max-loras and the adapters it is started with
            systems: dict[str, Callable[..., tuple[float, float]]] = {
                "loraplex": partial(loraplex_burst, address)
            }
            proc = None
            if python.exists():
                proc, port = start_vllm(python, model_dir, work / "peft", ids[:k], args, work)
                systems["vLLM"] = partial(vllm_burst, port)
            try:
                measure(k, systems)
            finally:
                if proc is not None:
                    proc.terminate()
                    proc.wait(60)

    def rate(system: str, k: int, mode: str) -> float | None:
        key = (system, k, mode)
        found = [r["tokens_per_s"] for r in rows if (r["system"], r["adapters"], r["mode"]) == key]
        return found[0] if found else None

    for r in rows:
        peer = rate("vLLM", r["adapters"], r["mode"])
        r["vs_vllm"] = r["tokens_per_s"] / peer if peer else None
    cols = [
        ("system", 9, ""),
        ("adapters", 8, ""),
        ("mode", 8, ""),
        ("prompt tokens", 13, ".1f"),
        ("tok/s", 8, ".1f"),
        ("x vLLM", 7, ".2f"),
    ]
    lines = [
        f"{args.requests} requests at once x {args.new_tokens} new tokens (EOS ignored), r="
        f"{args.rank} all-linear; loraplex {info.dtype} NF4 ({info.dtype_choice}), default flags "
        f"(max_loras {info.max_loras}); vLLM {args.vllm_dtype}; median of {args.repeats}",
        *format_table(
            cols,
            [
                [r[key] for key in ("system", "adapters", "mode", "mean_prompt_tokens")]
                + [r["tokens_per_s"]]
                + [r["vs_vllm"]]
                for r in rows
            ],
        ),
    ]
    report = {"rows": rows, "config": vars(args) | {"serve_args": extra}}
    publish(report, lines, args.out, fresh_process=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
