"""Online latency under open-loop load, through the real gRPC server.

Starts `loraplex serve` as a subprocess (temporary adapter store, port 0), registers K random
all-linear LoRA adapters made with PEFT (benchmarks/common.py), and streams chat prompts of
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
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from multiprocessing import get_context
from pathlib import Path
from types import FrameType, TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.server.client import LoraplexClient
from loraplex.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger("benchmark")

ADAPTER_PREFIX = "bench-"  # the names common.make_adapters gives
TTFT_TARGET = 3.0  # p99 TTFT at 0.7 load within 3x the unloaded TTFT
TARGET_LOAD = 0.7


# -- set-up: adapters and prompts (in a child process) -----------------------------------------
def prepare(home: str, model: str | None, k: int, rank: int, n_prompts: int, out: str) -> list[str]:
    """Make k adapters under out/ and return n_prompts prompt texts (chat template applied).
    Runs in a child process: the base model it loads never weighs on the load generator."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import bench_prompts, make_adapters

    from loraplex.core.config import ModelConfig
    from loraplex.core.model import load_model

    loaded = load_model(ModelConfig(model=model, home=Path(home)))
    if k:
        log.info("making %d random r=%d all-linear adapters in %s", k, rank, out)
        make_adapters(loaded.model, k, rank, Path(out))
    tokenizer = loaded.tokenizer
    # The server tokenizes prompt text as is: the decoded template keeps its special tokens.
    return [tokenizer.decode(ids) for ids in bench_prompts(tokenizer, n_prompts)]


class ServerDied(RuntimeError):
    """The server subprocess exited (its log's last lines are in the message)."""


# -- the server subprocess ---------------------------------------------------------------------
class ServerProcess:
    """`loraplex serve` on a free port, its log in a file; stopped (TERM, then KILL) on exit."""

    def __init__(self, argv: list[str], log_path: Path) -> None:
        self.argv = argv
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def __enter__(self) -> ServerProcess:
        log.info("starting %s", shlex.join(self.argv))
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT
            )
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, KeyboardInterrupt | SystemExit | ServerDied):
            log.error("server log (last lines):\n%s", self.log_tail())
        self.stop()

    def _check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise ServerDied(
                f"the server exited with status {self.proc.returncode}:\n{self.log_tail()}"
            )

    def wait_ready(self, timeout: float) -> str:
        """The server's address, once its health says SERVING (model loaded, warmed up)."""
        deadline = time.monotonic() + timeout
        port = None
        while port is None:
            self._check_alive()
            match = re.search(r"listening on [^\s:]+:(\d+)", self.log_path.read_text("utf-8"))
            if match:
                port = int(match.group(1))
            elif time.monotonic() > deadline:
                raise TimeoutError(f"the server did not bind within {timeout:.0f}s")
            else:
                time.sleep(0.2)
        self.address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(self.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while True:
                self._check_alive()
                try:
                    reply = health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the server was not SERVING within {timeout:.0f}s")
                time.sleep(0.5)
        log.info("server pid %d ready on %s", self.pid, self.address)
        return self.address

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def peak_rss_bytes(self) -> int | None:
        return peak_rss_bytes(self.pid)

    def stop(self, grace: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)  # the server drains in-flight RPCs, then exits
        try:
            self.proc.wait(grace)
        except subprocess.TimeoutExpired:
            log.warning("the server ignored SIGTERM for %.0fs: killing it", grace)
            self.proc.kill()
            self.proc.wait()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text("utf-8", errors="replace")
        except OSError:
            return "(no server log)"
        return "\n".join(text.splitlines()[-lines:])


def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """VmHWM (peak resident set) of a process, from /proc; None where there is no /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


# -- one streamed request ----------------------------------------------------------------------
@dataclass
class Result:
    adapter_id: str
    sent: float
    """perf_counter when the request was sent."""
    ttft: float | None = None
    e2e: float | None = None
    itls: list[float] = field(default_factory=list)
    """One inter-token latency per token after the first chunk (seconds)."""
    tokens: int = 0
    """Completion tokens received (token ids over all chunks)."""
    usage_tokens: int | None = None
    prompt_tokens: int | None = None
    finish_reason: str = ""
    error: str | None = None


async def stream_one(
    stub: inference_pb2_grpc.InferenceStub,
    request: inference_pb2.GenerateRequest,
    timeout: float,
) -> Result:
    start = time.perf_counter()
    result = Result(request.adapter_id, start)
    last: float | None = None
    try:
        async for chunk in stub.GenerateStream(request, timeout=timeout):
            now = time.perf_counter()
            n = len(chunk.token_ids)
            if n:
                if last is None:
                    result.ttft = now - start
                else:
                    result.itls.extend([(now - last) / n] * n)
                last = now
                result.tokens += n
            if chunk.finish_reason:
                result.finish_reason = chunk.finish_reason
                result.usage_tokens = chunk.usage.completion_tokens
                result.prompt_tokens = chunk.usage.prompt_tokens
        result.e2e = time.perf_counter() - start
        if not result.finish_reason:
            result.error = "stream ended without a finish reason"
    except grpc.aio.AioRpcError as exc:
        result.error = f"{exc.code().name}: {exc.details()}"
    return result


# -- statistics --------------------------------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        raise ValueError("no values")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def latency_ms(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "p50": percentile(values, 50) * 1e3,
        "p90": percentile(values, 90) * 1e3,
        "p99": percentile(values, 99) * 1e3,
        "mean": sum(values) / len(values) * 1e3,
        "max": max(values) * 1e3,
    }


def summarize(results: list[Result]) -> dict:
    ok = [r for r in results if r.error is None]
    errors = [r.error for r in results if r.error is not None]
    if errors:
        log.warning("%d of %d requests failed, e.g. %s", len(errors), len(results), errors[0])
    if not ok:
        raise RuntimeError(f"every request failed, e.g. {errors[0] if errors else '?'}")
    first = min(r.sent for r in results)
    seconds = max(r.sent + (r.e2e or 0.0) for r in ok) - first
    tokens = sum(r.tokens for r in ok)
    mismatched = sum(1 for r in ok if r.usage_tokens is not None and r.usage_tokens != r.tokens)
    if mismatched:
        log.warning("%d streams carried fewer/more token ids than their usage says", mismatched)
    return {
        "requests": len(results),
        "errors": len(errors),
        "error_samples": sorted(set(errors))[:3],
        "seconds": seconds,
        "completion_tokens": tokens,
        "mean_completion_tokens": tokens / len(ok),
        "mean_prompt_tokens": sum(r.prompt_tokens or 0 for r in ok) / len(ok),
        "finish_reasons": {
            reason: sum(1 for r in ok if r.finish_reason == reason)
            for reason in sorted({r.finish_reason for r in ok})
        },
        "output_tokens_per_s": tokens / seconds,
        "requests_per_s": len(ok) / seconds,
        "ttft_ms": latency_ms([r.ttft for r in ok if r.ttft is not None]),
        "itl_ms": latency_ms([x for r in ok for x in r.itls]),
        "e2e_ms": latency_ms([r.e2e for r in ok if r.e2e is not None]),
    }


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
            prompt=self.prompts[i % len(self.prompts)],
            max_new_tokens=max_new_tokens or self.new_tokens,
            temperature=0.0,
        )


async def run_phases(address: str, work: Workload, args: argparse.Namespace) -> dict:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)

        async def one(request: inference_pb2.GenerateRequest) -> Result:
            return await stream_one(stub, request, work.timeout)

        # Warm-up: every adapter once (loaded from the store), then the sequential path.
        log.info("warm-up: %d short requests", len(work.adapter_ids) + 2)
        warm = [work.next_request(2) for _ in work.adapter_ids]
        summarize(await asyncio.gather(*(one(r) for r in warm)))
        for _ in range(2):
            summarize([await one(work.next_request(2))])

        log.info("unloaded: %d requests one at a time", args.unloaded)
        unloaded = summarize([await one(work.next_request()) for _ in range(args.unloaded)])
        log_phase("unloaded", unloaded)

        log.info("burst: %d requests at once", args.burst)
        burst = summarize(
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
                tasks.append(asyncio.create_task(one(work.next_request())))
            arrivals = time.perf_counter() - t0
            row = summarize(list(await asyncio.gather(*tasks)))
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
def table(report: dict) -> str:
    cols = [
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

    def fmt(value: object, width: int, spec: str) -> str:
        if value is None:
            return f"{'-':>{width}}"
        return f"{value:>{width}{spec}}"

    def line(name: str, row: dict, offered: float | None, ratio: float | None) -> str:
        ttft, itl, e2e = (row[k] or {} for k in ("ttft_ms", "itl_ms", "e2e_ms"))
        values = [
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
        return " ".join(fmt(v, w, s) for v, (_, w, s) in zip(values, cols, strict=True))

    cfg = report["config"]
    info = cfg.get("model_info", {})
    head = (
        f"{cfg['adapters']} adapters (r={cfg['rank']} all-linear, round-robin), "
        f"{cfg['new_tokens']} new tokens max, greedy; {cfg['requests']} requests per load; "
        f"server: {info.get('device', '?')}, max_batch_size {info.get('max_batch_size', '?')}, "
        f"max_loras {info.get('max_loras', '?')}; times in ms, offered/req/s in requests/s"
    )
    lines = [head, " ".join(f"{name:>{w}}" for name, w, _ in cols)]
    lines.append(line("unloaded", report["unloaded"], None, None))
    lines.append(line(f"burst {report['burst']['requests']}", report["burst"], None, None))
    for row in report["loads"]:
        lines.append(
            line(f"load {row['load']:.2f}", row, row["offered_rps"], row["ttft_p99_over_unloaded"])
        )
    target = next((r for r in report["loads"] if math.isclose(r["load"], TARGET_LOAD)), None)
    if target and target["ttft_p99_over_unloaded"] is not None:
        ok = target["ttft_p99_over_unloaded"] <= TTFT_TARGET
        lines.append(
            f"p99 TTFT at {TARGET_LOAD} load = {target['ttft_p99_over_unloaded']:.2f}x unloaded "
            f"(target <= {TTFT_TARGET:.0f}x: {'met' if ok else 'MISSED'})"
        )
    mem = report["memory"]

    def mib(n: int | None) -> str:
        return f"{n / 2**20:.0f} MiB" if n else "?"

    lines.append(
        f"peak RSS: server {mib(mem['server_peak_rss_bytes'])}, "
        f"benchmark client {mib(mem['bench_peak_rss_bytes'])}"
    )
    return "\n".join(lines) + "\n"


# -- main --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.split("\n")[2:]) if __doc__ else None,
    )
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
    parser.add_argument("--model", help="served model (default: the embedded SmolLM2)")
    parser.add_argument("--home", default=os.environ.get("LORAPLEX_HOME", "~/.cache/loraplex"))
    parser.add_argument("--out", default="benchmarks/results/online.json")
    parser.add_argument(
        "--serve-args", default="", help='extra `loraplex serve` flags, e.g. "--max-loras 32"'
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one extra `loraplex serve` word (repeatable): --server-arg=--max-loras=32",
    )
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--request-timeout", type=float, default=900.0)
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary directory")
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
    args.extra = shlex.split(args.serve_args) + args.server_arg
    owned = {"--port", "--home", "--adapter-store", "--model"}
    clash = [a for a in args.extra if a.split("=", 1)[0] in owned]
    if clash:
        parser.error(f"set by the benchmark, not through the server's flags: {' '.join(clash)}")
    return args


def serve_command(args: argparse.Namespace, home: Path, work: Path) -> list[str]:
    script = Path(sys.executable).parent / "loraplex"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "loraplex.server.cli"]
    argv = [
        *base,
        "serve",
        "--port",
        "0",
        "--metrics-port",
        "0",
        "--home",
        str(home),
        "--adapter-store",
        str(work / "store"),
        "--adapter-root",
        str(work),
    ]
    if args.model:
        argv += ["--model", args.model]
    return argv + args.extra


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks: the server is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    signal.signal(signal.SIGTERM, _terminate)
    home = Path(args.home).expanduser()
    work = Path(tempfile.mkdtemp(prefix="loraplex-online-"))
    n_prompts = max(args.requests, args.burst, args.unloaded, 1)
    try:
        with (
            get_context("spawn").Pool(1) as pool,  # leaving it terminates the child
            ServerProcess(serve_command(args, home, work), work / "server.log") as server,
        ):
            # The child makes the adapters while the server loads the model.
            made = pool.apply_async(
                prepare,
                (str(home), args.model, args.adapters, args.rank, n_prompts, str(work / "peft")),
            )
            address = server.wait_ready(args.startup_timeout)
            prompts = made.get(args.startup_timeout)
            pool.close()  # the child exits, and the base model it loaded with it
            pool.join()
            with LoraplexClient(address, timeout=600) as client:
                info = client.model_info()
                ids = [f"{ADAPTER_PREFIX}{i}" for i in range(args.adapters)]
                for adapter_id in ids:
                    client.register(adapter_id, str(work / "peft" / adapter_id))
                log.info("registered %d adapters", len(ids))
            if info.max_loras < args.adapters:
                log.warning(
                    "the server holds %d adapters in slots at once, fewer than the %d in use: "
                    "expect slot swaps (raise it with --serve-args='--max-loras %d')",
                    info.max_loras,
                    args.adapters,
                    args.adapters,
                )
            workload = Workload(prompts, ids or [""], args.new_tokens, args.request_timeout)
            phases = asyncio.run(run_phases(address, workload, args))
            server_rss = server.peak_rss_bytes()
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
    finally:
        if args.keep_work:
            log.info("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)
    sys.stdout.write(table(report))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", out)
    return 0


def run(entry: Callable[[], int] | None = None) -> int:
    """Run a benchmark's main (this one's by default): a failure is one logged line and
    status 1, not a traceback."""
    try:
        return (entry or main)()
    except (RuntimeError, TimeoutError, OSError, grpc.RpcError) as exc:
        if isinstance(exc, grpc.RpcError):
            message = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
        else:
            message = f"{type(exc).__name__}: {exc}"
        log.error("benchmark failed: %s", message)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(run())
