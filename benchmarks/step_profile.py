"""Where a decode step goes, through the real server: py-spy samples of its engine thread.

`loraplex serve` with its default flags but a larger KV cache (extra ones in --serve-args); at each
concurrency C of --concurrency, C streams at once (greedy, end of sequence ignored), on the base,
then on one adapter (a random r16 all-linear PEFT adapter), and with --mixed K on K adapters at
once (stream i on adapter i mod K). Once every stream has its first token, the steps' time is taken
unprofiled for a few seconds, then py-spy (native frames, idle time included) samples the server
for --seconds, and the streams are cancelled. The engine thread's samples are sorted into the parts
of a step by the frames on their stacks (the first rule that matches, in the order of PARTS), and
each part is given as its share of the engine's time and in ms per decode step (share x the window
/ the steps the streams saw in it). Each sample pauses the server to read its native stacks, which
slows its steps (at 100 samples a second a one-row step took 18 ms against 7.7 unprofiled, the
weights read cold after every pause): keep the rate low and compare shares.

    python benchmarks/step_profile.py [--concurrency 1,16] [--seconds 10] [--mixed 32]
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from loraplex.server.client import LoraplexClient

from harness import (
    ADAPTER_PREFIX,
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
    user_message,
    work_dir,
)

log = logging.getLogger("benchmark")

ENGINE_THREAD = "loraplex-engine"
# The KV cache the server is given: larger than the default, so that a window's streams fit on
# a slow CPU (its size changes where the cache's rows sit, not what a step computes).
KV_CACHE_MB = 4096
# new tokens a request: more than a window holds (the streams are cancelled after it), few
# enough that every stream is admitted at once (C x this within the KV cache's budget, whose
# entries take the compute dtype's bytes: half as many tokens fit in float32)
STREAM_TOKENS = {"bfloat16": 96_000, "float16": 96_000, "float32": 48_000}
UNPROFILED_S = 3.0  # the steps' time measured before sampling, for comparison
# (part, substrings of a stack: any one matches, unless one of the last ones is there too).
# Native frames are the C kernels' own names (server/engine/csrc/cpu_kernels.c), MKL's /
# oneDNN's / bitsandbytes' for the base's matmuls. The forward's own parts are matched below
# DecoderForward.__call__: the LM head is called from it directly, the layers under its
# program's run or its eager path.
ATTENTION = "attention (rope, KV write, attention)"
PARTS: list[tuple[str, tuple[str, ...], tuple[str, ...]]] = [
    ("waiting for work", ("Scheduler.wait (",), ()),
    ("merge policy, merge preparation", ("merging.py",), ()),
    ("sampling", ("sampling.py", "logprobs.py", "controls.py", "structured.py"), ()),
    ("output emission", ("output.py", "emitter.py", "Engine._advance (", "Engine._retire ("),
     ()),
    ("LM head, final norm", ("DecoderForward.__call__",),
     ("DecodeProgram.run", "DecoderForward.eager")),
    ("LoRA", ("lora_add", "lora_shrink", "lora_expand", "lora_ops.py", "triton_lora",
              ";_add_lora ("), ()),
    (ATTENTION, ("decode_attention", "attend_", "rope_qk", "kv_write", "paged_attention",
                 "triton_attention", "_prefill_attention"), ()),
    ("base linears", ("nf4_linear", "rows_", "gemm", "dnnl", "linear.py", "bitsandbytes"), ()),
    (ATTENTION, ("._attention (", "_decode_attention", "_rope_and_write"), ()),
    ("norms, silu * up", ("add_rms_norm", "silu_mul", "_Norm.", "._mlp ("), ()),
    ("captured program's own loops", ("run_step (",), ()),
    ("step inputs, embedding", ("model_runner.py", "forward.py", "step_program.py"), ()),
    ("scheduling, bookkeeping", ("engine.py",), ()),
]  # fmt: skip
OTHER = "other"


def classify(stack: str) -> str:
    """The part of a step one engine-thread stack belongs to: the first rule of PARTS that
    matches it."""
    for part, needles, unless in PARTS:
        if any(n in stack for n in needles) and not any(u in stack for u in unless):
            return part
    return OTHER


def parse_raw(text: str, thread: str) -> tuple[Counter[str], dict[str, Counter[str]]]:
    """py-spy's raw output (`stack count` per line, frames ';'-separated, the thread first):
    the named thread's sample counts by part, and by part its innermost frames' counts."""
    parts: Counter[str] = Counter()
    leaves: dict[str, Counter[str]] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if len(frames) < 2 or thread not in frames[0]:
            continue
        part = classify(stack)
        parts[part] += int(count)
        leaves.setdefault(part, Counter())[frames[-1][:120]] += int(count)
    return parts, leaves


async def profile_streams(
    address: str,
    prompts: list[str],
    adapters: list[str],
    pid: int,
    seconds: float,
    rate: int,
    out: Path,
    stream_tokens: int,
) -> tuple[float, list[int], float]:
    """len(prompts) streams at once, stream i on adapters[i % len(adapters)] ("" for the
    base); once each has a token, py-spy samples the
    server (pid) for `seconds` into `out`; then the streams are cancelled. Returns (the
    sampling window's seconds, the tokens each stream received inside it, the ms a step took
    in the UNPROFILED_S before it). The streams share `stream_tokens` new tokens."""
    import grpc

    from loraplex.v1 import inference_pb2, inference_pb2_grpc

    new_tokens = min(3000, stream_tokens // len(prompts))
    span = max(1, round(seconds))  # py-spy takes whole seconds
    times: list[list[float]] = [[] for _ in prompts]
    started = [asyncio.Event() for _ in prompts]
    errors: list[BaseException] = []

    async def stream(stub: Any, i: int, prompt: str) -> None:
        request = inference_pb2.GenerateRequest(
            adapter_id=adapters[i % len(adapters)],
            messages=user_message(prompt),
            max_new_tokens=new_tokens,
            temperature=0.0,
            ignore_eos=True,
        )
        try:
            async for chunk in stub.GenerateStream(request):  # no deadline: cancelled
                now = time.perf_counter()
                times[i].extend([now] * len(chunk.token_ids))
                if chunk.token_ids:
                    started[i].set()
        except grpc.aio.AioRpcError as exc:
            errors.append(exc)
            started[i].set()

    async with grpc.aio.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        tasks = [asyncio.ensure_future(stream(stub, i, p)) for i, p in enumerate(prompts)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 600)
        if errors:
            raise RuntimeError(f"a stream failed: {errors[0]}")
        await asyncio.sleep(1.0)  # every prompt done, decode only
        a = time.perf_counter()
        await asyncio.sleep(UNPROFILED_S)
        b = time.perf_counter()
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        argv = [spy, "record", "--native", "--idle", "--threads", "--format", "raw", "-r",
                str(rate), "-d", str(span), "-o", str(out), "--pid", str(pid)]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        _, err = await proc.communicate()
        # py-spy samples for `seconds` once it has attached (reading symbols takes a while):
        # the window is the last `seconds` before it exits
        t1 = time.perf_counter()
        t0 = t1 - span
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    if proc.returncode != 0:
        raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
    if errors or any(len(ts) >= new_tokens for ts in times):
        raise RuntimeError(f"a stream failed or ended inside the window: {errors[:1]}")
    inside = [sum(1 for t in ts if t0 <= t <= t1) for ts in times]
    before = statistics.median(sum(1 for t in ts if a <= t <= b) for ts in times)
    return t1 - t0, inside, 1000 * (b - a) / max(before, 1)


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--seconds", type=float, default=10.0, help="sampling window")
    parser.add_argument(
        "--rate", type=int, default=25, help="samples a second (each pauses the server)"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--mixed", type=int, default=0, help="also K adapters mixed (stream i on i mod K)"
    )
    add_server_args(parser, "extra `loraplex serve` flags (default: none)")
    add_common_args(parser, "step_profile")
    args = parser.parse_args()
    # a --kv-cache-mb in --serve-args comes later and wins
    extra = ["--kv-cache-mb", str(KV_CACHE_MB), *server_flags(parser, args.serve_args, [])]
    setup_logging()
    home = Path(args.home).expanduser()
    levels = [int(c) for c in args.concurrency.split(",")]
    names = [f"{ADAPTER_PREFIX}{i}" for i in range(max(1, args.mixed))]
    cases = [("base", [""]), ("adapter", names[:1])]
    if args.mixed > 1:
        cases.append((f"{args.mixed} mixed", names))
    rows: list[dict[str, Any]] = []
    with (
        work_dir("loraplex-step-profile-", args.keep_work) as work,
        child_pool() as pool,
        server_process(home, work, extra, args.model) as server,
    ):
        made = pool.apply_async(
            make_adapters_and_prompts,
            (str(home), args.model, len(names), args.rank, max(levels), str(work / "peft")),
        )
        address = server.wait_ready(args.startup_timeout)
        prompts = made.get(args.startup_timeout)
        with LoraplexClient(address, timeout=600) as client:
            register_adapters(client, work / "peft", names)
            stream_tokens = STREAM_TOKENS[client.model_info().dtype]
        for on, adapters in cases:
            for c in levels:
                raw = work / f"spy-{on}-{c}.txt"
                window, inside, plain = asyncio.run(
                    profile_streams(
                        address, prompts[:c], adapters, server.pid, args.seconds,
                        args.rate, raw, stream_tokens,
                    )
                )  # fmt: skip
                parts, leaves = parse_raw(raw.read_text(), ENGINE_THREAD)
                total = sum(parts.values())
                if not total:
                    raise RuntimeError(f"no samples of the {ENGINE_THREAD} thread")
                steps = statistics.median(inside)
                step_ms = 1000 * window / max(steps, 1)
                row = {
                    "on": on,
                    "concurrency": c,
                    "window_s": window,
                    "steps": steps,
                    "step_ms": step_ms,
                    "unprofiled_step_ms": plain,
                    "samples": total,
                    "parts": {
                        part: {
                            "share": n / total,
                            "ms_per_step": step_ms * n / total,
                            "top_frames": dict(leaves[part].most_common(5)),
                        }
                        for part, n in parts.most_common()
                    },
                }
                log.info("%s C=%d: %.0f steps in %.1f s, %.2f ms a step (%.2f unprofiled), "
                         "%d samples", on, c, steps, window, step_ms, plain, total)  # fmt: skip
                rows.append(row)
    part_names = [*dict.fromkeys(p for p, _, _ in PARTS), OTHER]
    cols = [("part of the step", 38, "")] + [
        (f"{r['on']} C={r['concurrency']} ms", 18, ".2f") for r in rows
    ]
    body = [
        [name] + [r["parts"].get(name, {}).get("ms_per_step") for r in rows]
        for name in part_names
        if any(name in r["parts"] for r in rows)
    ]
    body.append(["step (window / steps)"] + [r["step_ms"] for r in rows])
    body.append(["step, unprofiled (before the window)"] + [r["unprofiled_step_ms"] for r in rows])
    table = format_table(cols, body)
    publish({"rows": rows, "serve_flags": extra}, table, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
