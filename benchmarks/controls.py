"""What the generation controls cost, through the real server (default flags) and its HTTP API.

Bursts of chat completions sent at once (aiohttp, one connection each), request i on adapter
i mod --adapters (random r16 all-linear PEFT adapters), the workloads taking turns for --rounds
rounds so that each sees the same machine; per workload the median burst's output tokens per
second (from each answer's usage) over its wall time:

    plain       --requests requests, greedy, --new-tokens each (ignore_eos)
    logprobs    the same with logprobs: true, top_logprobs: 5
    json-half   the same, every other request constrained to a JSON schema
                (response_format json_schema, one of SCHEMAS); those end when the JSON does
    separate    --groups long few-shot prompts (~--context tokens), each sent 4 times as its own
                request (temperature 1, seeds s..s+3), --sample-tokens each
    n4          the same groups as one request each with n: 4 (one prefill per prompt)

Targets (issue: generation controls): json-half >= 0.9x plain, logprobs >= 0.95x plain, n4 >= 2x
separate.

    python benchmarks/controls.py [--requests 64] [--adapters 32] [--new-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import logging
import statistics
import time
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
    work_dir,
)

log = logging.getLogger("benchmark")
SCHEMAS: list[dict[str, Any]] = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "tags": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["name", "age", "tags"],
    },
    {
        "type": "object",
        "properties": {
            "sentiment": {"enum": ["positive", "negative", "neutral"]},
            "reasons": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        },
        "required": ["sentiment", "reasons"],
    },
    {
        "type": "object",
        "properties": {
            "steps": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"action": {"type": "string"}, "done": {"type": "boolean"}},
                    "required": ["action", "done"],
                },
            }
        },
        "required": ["steps"],
    },
]
FEW_SHOT = (
    "Q: What is the capital of France?\nA: Paris.\n"
    "Q: How many legs does a spider have?\nA: Eight.\n"
    "Q: What colour is a ripe banana?\nA: Yellow.\n"
)


def workload_bodies(
    name: str, models: list[str], prompts: list[str], args: Any
) -> list[dict[str, Any]]:
    """The request bodies of one burst of workload `name`."""
    if name in ("separate", "n4"):
        context = FEW_SHOT * max(1, args.context // 60)
        groups = [f"{context}Q: {prompts[g]}\nA:" for g in range(args.groups)]
        common = {"max_tokens": args.sample_tokens, "temperature": 1.0, "ignore_eos": True}
        if name == "n4":
            return [
                {"model": models[g], "messages": _user(p), "n": 4, "seed": 100 * g, **common}
                for g, p in enumerate(groups)
            ]
        return [
            {"model": models[g], "messages": _user(p), "seed": 100 * g + i, **common}
            for g, p in enumerate(groups)
            for i in range(4)
        ]
    bodies = []
    for i, (model, prompt) in enumerate(zip(models, prompts, strict=True)):
        body: dict[str, Any] = {
            "model": model,
            "messages": _user(prompt),
            "max_tokens": args.new_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        if name == "logprobs":
            body |= {"logprobs": True, "top_logprobs": 5}
        if name == "json-half" and i % 2:
            schema = SCHEMAS[i // 2 % len(SCHEMAS)]
            body |= {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": f"s{i % len(SCHEMAS)}", "schema": schema},
                },
                "ignore_eos": False,
            }
        bodies.append(body)
    return bodies


def _user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def burst(port: int, bodies: list[dict[str, Any]]) -> dict[str, Any]:
    """Send every body at once; output tokens per second over the burst's wall time."""
    import aiohttp

    async def one(session: Any, body: dict[str, Any]) -> tuple[int, str | None]:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with session.post(url, json=body) as response:
            answer = await response.json()
            if response.status != 200:
                return 0, f"HTTP {response.status}: {str(answer)[:200]}"
            return answer["usage"]["completion_tokens"], None

    async def run() -> list[tuple[int, str | None]]:
        connector = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=1800)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            return list(await asyncio.gather(*(one(session, b) for b in bodies)))

    start = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - start
    tokens = sum(t for t, _ in results)
    errors = [e for _, e in results if e]
    for error in errors[:3]:
        log.warning("%s", error)
    return {
        "requests": len(bodies),
        "completion_tokens": tokens,
        "wall_s": wall,
        "output_tokens_per_s": tokens / wall,
        "errors": len(errors),
    }


WORKLOADS = ("plain", "logprobs", "json-half", "separate", "n4")
RATIOS = {"logprobs": "plain", "json-half": "plain", "n4": "separate"}
TARGETS = {"logprobs": 0.95, "json-half": 0.9, "n4": 2.0}


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--groups", type=int, default=8, help="prompts of the n workloads")
    parser.add_argument("--context", type=int, default=1000, help="their tokens, about")
    parser.add_argument("--sample-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3, help="bursts per workload")
    parser.add_argument("--rank", type=int, default=16)
    add_server_args(parser, "extra `loraplex serve` flags (default: none)")
    add_common_args(parser, "controls")
    args = parser.parse_args()
    extra = server_flags(parser, args.serve_args, [], owned=("--http-port",))
    setup_logging()
    home = Path(args.home).expanduser()
    names = [f"{ADAPTER_PREFIX}{i}" for i in range(args.adapters)]
    bursts: dict[str, list[dict[str, Any]]] = {w: [] for w in WORKLOADS}
    with (
        work_dir("loraplex-controls-", args.keep_work) as work,
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
        models = [names[i % len(names)] if names else base for i in range(args.requests)]
        warm = workload_bodies("plain", models, prompts, args)
        burst(server.http_port, [b | {"max_tokens": 4} for b in warm])  # every adapter loaded
        for round_ in range(args.rounds):
            for name in WORKLOADS:
                summary = burst(server.http_port, workload_bodies(name, models, prompts, args))
                bursts[name].append(summary)
                log.info(
                    "round %d %s: %.1f tok/s (%d tokens, %.1f s, %d errors)",
                    round_ + 1,
                    name,
                    summary["output_tokens_per_s"],
                    summary["completion_tokens"],
                    summary["wall_s"],
                    summary["errors"],
                )
    rows = []
    for name in WORKLOADS:
        rows.append(
            {
                "workload": name,
                "output_tokens_per_s": statistics.median(
                    b["output_tokens_per_s"] for b in bursts[name]
                ),
                "completion_tokens": statistics.median(
                    b["completion_tokens"] for b in bursts[name]
                ),
                "errors": sum(b["errors"] for b in bursts[name]),
            }
        )
    by_name = {r["workload"]: r for r in rows}
    ratios = {
        name: by_name[name]["output_tokens_per_s"] / by_name[ref]["output_tokens_per_s"]
        for name, ref in RATIOS.items()
    }
    cols = [("workload", 10, "s"), ("tok/s", 8, ".1f"), ("tokens", 7, ".0f"), ("vs", 9, "s"),
            ("ratio", 7, ".3f"), ("target", 7, "s"), ("errors", 6, "d")]  # fmt: skip
    table = format_table(
        cols,
        [
            [r["workload"], r["output_tokens_per_s"], r["completion_tokens"],
             RATIOS.get(r["workload"], ""), ratios.get(r["workload"]),
             f">={TARGETS[r['workload']]}x" if r["workload"] in TARGETS else "", r["errors"]]
            for r in rows
        ],
    )  # fmt: skip
    table.append(
        f"median of {args.rounds} bursts each; {args.requests} requests over {args.adapters} "
        f"adapters; n workloads: {args.groups} prompts of ~{args.context} tokens x 4 samples"
    )
    report = {"args": vars(args), "rows": rows, "ratios": ratios, "bursts": bursts}
    publish(report, table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
