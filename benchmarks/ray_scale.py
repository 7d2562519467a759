"""Scale-out on Ray Serve against one plain server, on this machine, in one run.

Every system serves the embedded model in NF4 with the same K random all-linear adapters
(benchmarks/harness.py), and takes the same closed-loop workload from a stock loraplex client:
--requests chat prompts of 64-128 tokens, adapters round-robin, --concurrency at once, greedy,
--new-tokens at most (the tokens received are what is counted).

    plain         `loraplex serve` (no Ray): one engine on every core
    ray 1x<C>     Ray Serve, one engine replica of all the cores, behind Ray's gRPC proxy
    ray <N>x1     Ray Serve, N replicas of one core each (the machine's cores split up)

For each it reports output tok/s (median of --repeats), requests and adapter loads per replica
(from the `x-loraplex-replica*` trailing metadata), the latency of a one-token request, and
the cost of a cold adapter: the first one-token request for an adapter just registered
(store -> host -> device on the replica that takes it) against the same request once warm. For
Ray it also times redeploying a running application with one more replica (new replicas load
the model) and a cold adapter served by a new replica.

    python benchmarks/ray_scale.py [--adapters 8] [--requests 64] [--concurrency 16]
        [--new-tokens 32] [--repeats 3] [--replicas 2] [--out benchmarks/results/ray_scale.json]
"""

from __future__ import annotations

import dataclasses
import logging
import os
import statistics
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import ray
from ray import serve

from loraplex.core.config import ModelConfig
from loraplex.server.client import LoraplexClient
from loraplex.server.config import EngineConfig, ServerConfig
from loraplex.server.ray_serve import (
    LOADS_METADATA,
    REPLICA_METADATA,
    build_app,
    proxy_options,
)
from loraplex.v1 import inference_pb2 as pb

from harness import (
    ADAPTER_PREFIX,
    add_common_args,
    in_child,
    make_adapters_and_prompts,
    make_parser,
    publish,
    register_adapters,
    server_process,
    setup_logging,
    user_message,
    work_dir,
)

log = logging.getLogger("benchmark")
PORT = 9710


@dataclasses.dataclass
class Run:
    tokens_per_s: float
    seconds: float
    tokens: int
    requests_per_replica: dict[str, int]
    loads_per_replica: dict[str, int]


def generate(client: LoraplexClient, adapter_id: str, prompt: str, new_tokens: int) -> tuple:
    request = pb.GenerateRequest(
        adapter_id=adapter_id, messages=user_message(prompt), max_new_tokens=new_tokens
    )
    response, call = client.inference.Generate.with_call(request, timeout=600)
    return response, dict(call.trailing_metadata())


def run_load(client: LoraplexClient, ids: list[str], prompts: list[str], args) -> Run:
    """--requests requests, --concurrency at once; output tokens per second of wall time."""
    work = [(ids[i % len(ids)], prompts[i % len(prompts)]) for i in range(args.requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        replies = list(pool.map(lambda w: generate(client, *w, args.new_tokens), work))
    seconds = time.perf_counter() - started
    tokens = sum(response.usage.completion_tokens for response, _ in replies)
    requests: Counter[str] = Counter()
    loads: dict[str, int] = {}
    for _, trailing in replies:
        replica = trailing.get(REPLICA_METADATA, "plain")
        requests[replica] += 1
        loads[replica] = max(loads.get(replica, 0), int(trailing.get(LOADS_METADATA, 0)))
    return Run(tokens / seconds, seconds, tokens, dict(requests), loads)


def one_token_ms(client: LoraplexClient, adapter_id: str, prompt: str) -> tuple[float, str]:
    started = time.perf_counter()
    _, trailing = generate(client, adapter_id, prompt, 1)
    return (time.perf_counter() - started) * 1e3, trailing.get(REPLICA_METADATA, "plain")


def cold_adapters(
    client: LoraplexClient, source: Path, prompt: str, n: int, tag: str
) -> dict[str, object]:
    """Register n fresh adapters (copies of `source`) and time each one's first and second
    one-token request: cold (store -> host -> device on whichever replica takes it) vs warm."""
    cold, warm, where = [], [], []
    for i in range(n):
        name = f"cold-{tag}-{i}"
        client.register(name, str(source))
        ms, replica = one_token_ms(client, name, prompt)
        cold.append(ms)
        where.append(replica)
        warm.append(one_token_ms(client, name, prompt)[0])
    return {
        "cold_ms": statistics.median(cold),
        "warm_ms": statistics.median(warm),
        "extra_ms": statistics.median(c - w for c, w in zip(cold, warm, strict=True)),
        "replicas": dict(Counter(where)),
    }


def measure(
    address: str, ids: list[str], prompts: list[str], source: Path, tag: str, args
) -> dict[str, object]:
    with LoraplexClient(address, timeout=600) as client:
        for adapter_id in ids:  # warm: every adapter once (a replica loads it)
            generate(client, adapter_id, prompts[0], 2)
        runs = [run_load(client, ids, prompts, args) for _ in range(args.repeats)]
        latency = [one_token_ms(client, ids[0], prompts[0])[0] for _ in range(9)]
        cold = cold_adapters(client, source, prompts[0], args.cold, tag)
    best = sorted(runs, key=lambda r: r.tokens_per_s)[len(runs) // 2]
    return {
        "tokens_per_s": best.tokens_per_s,
        "runs_tokens_per_s": [r.tokens_per_s for r in runs],
        "requests_per_replica": best.requests_per_replica,
        "loads_per_replica": best.loads_per_replica,
        "one_token_ms": statistics.median(latency),
        "cold_adapter": cold,
    }


@contextmanager
def plain_server(home: Path, work: Path, args) -> Iterator[str]:
    flags = ["--max-loras", str(args.max_loras), "--max-batch-size", str(args.concurrency)]
    flags += ["--merge-policy", "off"]
    store = work / "store-plain"
    with server_process(home, work, flags, store=store, log_name="plain.log") as server:
        yield server.wait_ready(900)


@contextmanager
def ray_cluster(cpus: int) -> Iterator[None]:
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    serve.start(**proxy_options(PORT))
    try:
        yield
    finally:
        serve.shutdown()
        ray.shutdown()


def deploy(config: ServerConfig, replicas: int, cpus: float) -> float:
    """(Re)deploy the application; seconds until it is running."""
    started = time.perf_counter()
    serve.run(build_app(config, replicas, cpus), name="loraplex")
    return time.perf_counter() - started


def register(address: str, ids: list[str], work: Path) -> None:
    with LoraplexClient(address, timeout=600) as client:
        register_adapters(client, work / "peft", ids)


def table(report: dict) -> str:
    rows = report["systems"]
    base = rows["plain"]["tokens_per_s"]
    lines = [
        "| system | tok/s (median) | x plain | requests per replica | adapter loads per "
        "replica | 1-token ms | cold adapter ms | warm ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in rows.items():
        cold = row["cold_adapter"]
        lines.append(
            f"| {name} | {row['tokens_per_s']:.1f} | {row['tokens_per_s'] / base:.2f} | "
            f"{sorted(row['requests_per_replica'].values())} | "
            f"{sorted(row['loads_per_replica'].values())} | {row['one_token_ms']:.0f} | "
            f"{cold['cold_ms']:.0f} | {cold['warm_ms']:.0f} |"
        )
    grow = report.get("scale_up")
    if grow:
        lines.append("")
        lines.append(
            f"Redeploying the running 1-replica application with 2: {grow['seconds']:.1f} s "
            f"until running (the old replica {'kept' if grow['old_replica_kept'] else 'replaced'}"
            f"); a cold adapter on a new replica: {grow['cold_ms']:.0f} ms "
            f"(warm {grow['warm_ms']:.0f} ms)."
        )
    return "\n".join(lines)


def scale_up(config: ServerConfig, args, address: str, source: Path, prompt: str) -> dict:
    """Redeploy a running 1-replica application with 2 replicas (Ray replaces the replicas of
    an application redeployed from Python; a config-file update of num_replicas only adds
    one) and time a cold adapter on a new replica (fresh adapters until one lands on a
    replica other than the old one)."""
    with LoraplexClient(address, timeout=600) as client:
        _, old = one_token_ms(client, "", prompt)
        seconds = deploy(config, 2, 1.0)
        kept = any(name.endswith(f"#{old}") for name in engine_replicas())
        for i in range(16):
            name = f"cold-new-replica-{i}"
            client.register(name, str(source))
            cold, replica = one_token_ms(client, name, prompt)
            if replica != old:
                warm = statistics.median(one_token_ms(client, name, prompt)[0] for _ in range(3))
                return {
                    "seconds": seconds,
                    "old_replica_kept": kept,
                    "cold_ms": cold,
                    "warm_ms": warm,
                    "tries": i + 1,
                }
    raise RuntimeError("no fresh adapter landed on the new replica in 16 tries")


def engine_replicas() -> list[str]:
    actors = ray.util.list_named_actors(all_namespaces=True)
    return [a["name"] for a in actors if "#EngineReplica#" in a["name"]]


def main(argv: list[str] | None = None) -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cold", type=int, default=5, help="fresh adapters timed cold and warm")
    parser.add_argument("--replicas", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--max-loras", type=int, default=8)
    add_common_args(parser, "ray_scale")
    args = parser.parse_args(argv)
    setup_logging()
    home = Path(args.home).expanduser()
    cpus = os.cpu_count() or 2
    ids = [f"{ADAPTER_PREFIX}{i}" for i in range(args.adapters)]
    report: dict = {"config": vars(args) | {"cpus": cpus}, "systems": {}}
    with work_dir("loraplex-ray-scale-") as work:
        peft = str(work / "peft")
        prompts = in_child(
            make_adapters_and_prompts, str(home), None, args.adapters, args.rank, 64, peft
        )
        source = work / "peft" / ids[0]
        with plain_server(home, work, args) as address:
            register(address, ids, work)
            report["systems"]["plain"] = measure(address, ids, prompts, source, "plain", args)
        config = ServerConfig(
            adapter_roots=(work,),
            adapter_store=work / "store-ray",
            model=ModelConfig(home=home),
            engine=EngineConfig(max_loras=args.max_loras, max_batch_size=args.concurrency),
            insecure=True,  # no API keys, like the plain server it is compared with
        )
        address = f"127.0.0.1:{PORT}"
        layouts: list[tuple[str, int, float]] = [
            (f"ray 1x{cpus}", 1, float(cpus)),
            (f"ray {args.replicas}x{cpus / args.replicas:g}", args.replicas, cpus / args.replicas),
        ]
        with ray_cluster(cpus):
            for i, (name, replicas, per_replica) in enumerate(layouts):
                if i:
                    serve.delete("loraplex")
                started = deploy(config, replicas, per_replica)
                log.info("%s running after %.1f s", name, started)
                if i == 0:
                    register(address, ids, work)
                report["systems"][name] = measure(address, ids, prompts, source, f"r{i}", args)
            serve.delete("loraplex")
            deploy(config, 1, 1.0)
            report["scale_up"] = scale_up(config, args, address, source, prompts[0])
    # The machine as a fresh process sees it, as the plain server started (Ray's replicas log
    # their own torch threads).
    publish(report, table(report), args.out, fresh_process=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
