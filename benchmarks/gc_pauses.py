"""What a full garbage collection costs a loaded server, with its heap frozen (the default since
start-up freezes it: server/runtime/heap.py) and unfrozen (as before).

Runs the server in this process with its default engine flags and the embedded model, registers
--adapters random r16 all-linear adapters and serves a burst of chat requests over gRPC on them
(so the heap holds what serving builds), then times --repeats full collections (gc.collect())
each way. A full collection holds the GIL: every thread of the server, the engine's included,
stops for as long as it takes, which is what a request waiting for its first token sees.

    python benchmarks/gc_pauses.py [--adapters 32] [--requests 64] [--repeats 5]
"""

from __future__ import annotations

import asyncio
import gc
import logging
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from loraplex.core.config import ModelConfig
from loraplex.server.app import LoraplexServer
from loraplex.server.client import LoraplexClient
from loraplex.server.config import ServerConfig

from harness import (
    ADAPTER_PREFIX,
    add_common_args,
    burst_summary,
    child_pool,
    format_table,
    make_adapters_and_prompts,
    make_parser,
    publish,
    register_adapters,
    run_main,
    setup_logging,
    work_dir,
)

log = logging.getLogger("benchmark")


def parse_args(argv: list[str] | None = None) -> Any:
    parser = make_parser(__doc__)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64, help="the burst served first")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="full collections timed per heap")
    add_common_args(parser, "gc_pauses")
    return parser.parse_args(argv)


def full_collections(repeats: int) -> dict[str, float]:
    """`repeats` timed gc.collect() calls: the objects a full collection walks, and the pause's
    median and longest milliseconds."""
    walked = len(gc.get_objects())
    pauses = []
    for _ in range(repeats):
        start = time.perf_counter()
        gc.collect()
        pauses.append((time.perf_counter() - start) * 1e3)
    return {"walked": walked, "p50_ms": statistics.median(pauses), "max_ms": max(pauses)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging()
    home = Path(args.home).expanduser()
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()

    def call(coro: Any, timeout: float = 600) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    with work_dir("loraplex-gc-") as work, child_pool() as pool:
        made = pool.apply_async(
            make_adapters_and_prompts,
            (str(home), None, args.adapters, 16, args.requests, str(work / "peft")),
        )
        config = ServerConfig(
            port=0,
            http_port=None,
            metrics_port=None,
            adapter_store=work / "store",
            adapter_roots=(work,),
            model=ModelConfig(home=home),
        )
        server = LoraplexServer(config)
        call(server.start())
        call(server.wait_ready())
        address = f"127.0.0.1:{server.port}"
        prompts = made.get(600)
        pool.close()
        pool.join()
        ids = [f"{ADAPTER_PREFIX}{i}" for i in range(args.adapters)]
        with LoraplexClient(address, timeout=600) as client:
            register_adapters(client, work / "peft", ids)
        served = burst_summary(address, prompts, ids or [""], args.new_tokens)
        log.info("served %d requests, %d errors", served["requests"], served["errors"])
        frozen_count = gc.get_freeze_count()
        frozen = full_collections(args.repeats)
        gc.unfreeze()
        unfrozen = full_collections(args.repeats)
        gc.freeze()  # as the server had it
        call(server.stop(1.0))
    loop.call_soon_threadsafe(loop.stop)
    report = {
        "config": {"adapters": args.adapters, "requests": args.requests, "repeats": args.repeats},
        "frozen_objects": frozen_count,
        "frozen": frozen,
        "unfrozen": unfrozen,
        "pause_ratio": unfrozen["p50_ms"] / frozen["p50_ms"],
    }
    cols = [
        ("heap", 22, "s"),
        ("objects walked", 15, "d"),
        ("p50 ms", 8, ".1f"),
        ("max ms", 8, ".1f"),
    ]
    rows = [
        [name, int(r["walked"]), r["p50_ms"], r["max_ms"]]
        for name, r in (("frozen (the default)", frozen), ("unfrozen", unfrozen))
    ]
    lines = [
        f"a full garbage collection in a loaded server ({args.adapters} adapters, "
        f"{args.requests} requests served), {args.repeats} each:",
        *format_table(cols, rows),
        f"unfrozen / frozen pause: {report['pause_ratio']:.1f}x "
        f"({frozen_count} objects frozen at start-up)",
    ]
    publish(report, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
