"""The prefix cache through the real server: `loraplex serve` with its default flags (the cache
on) against the same with --no-prefix-cache, both up in one run and driven in turns over the
OpenAI HTTP API, --adapters random r16 all-linear adapters.

    shared      a system prompt of about --system-tokens tokens, then one short question; each
                adapter's system prompt sent once before (so later requests hit):
                  ttft    one request at a time, streamed: time to the first chunk, median
                  burst   --requests requests at once (request i on adapter i mod --adapters),
                          --new-tokens each (EOS ignored): output tokens per second
                  cold    the same burst under a fresh cache_salt each round, so nothing it
                          asks for is cached when it arrives: output tokens per second, and
                          the prompt tokens its later requests found that its earlier ones
                          computed (each adapter's system prompt computed once, not once a
                          request)
    chat        --conversations conversations of --turns turns (each on its own adapter): the
                next turn's messages are the previous ones, its answer (--turn-tokens new
                tokens) and a new question; prompt tokens computed = prompt tokens - cached

Targets (issue: prefix cache): TTFT on a hit at most 0.2x cache-off, burst throughput at least
2x cache-off, chat prompt tokens computed at least 4x fewer.

    python benchmarks/prefix_cache.py [--adapters 8] [--system-tokens 1000] [--rounds 3]
"""

from __future__ import annotations

import asyncio
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

from loraplex.server.client import LoraplexClient

from harness import (
    ADAPTER_PREFIX,
    SENTENCES,
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
QUESTIONS = [
    "What is the first thing to check?",
    "How long does it take?",
    "Who should I call?",
    "Is there a cheaper option?",
    "What could go wrong?",
    "Can it wait until Monday?",
    "What do I need to bring?",
    "Is it covered by the warranty?",
]


def system_prompt(tokens: int) -> str:
    """About `tokens` tokens of instructions (SENTENCES average 12.5 tokens of SmolLM2's)."""
    sentences = [SENTENCES[i % len(SENTENCES)] for i in range(max(1, round(tokens / 12.5)))]
    return "You are a careful assistant. Use these notes: " + " ".join(sentences)


def chat_body(model: str, messages: list[dict[str, str]], new_tokens: int, **extra: Any) -> dict:
    return {
        "model": model,
        "messages": messages,
        "max_tokens": new_tokens,
        "temperature": 0,
        "ignore_eos": True,
        **extra,
    }


async def post(session: Any, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=body) as response:
        answer: dict[str, Any] = await response.json()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {json.dumps(answer)[:300]}")
        return answer


async def first_chunk_s(session: Any, url: str, body: dict[str, Any]) -> float:
    """Seconds to the first streamed chunk with content."""
    start = time.perf_counter()
    async with session.post(url, json=body | {"stream": True}) as response:
        async for raw in response.content:
            line = raw.strip()
            if (
                line.startswith(b"data: {")
                and b'"content":"' in line
                and b'"content":""' not in line
            ):
                return time.perf_counter() - start
    raise RuntimeError("the stream ended without content")


def run_async(coro: Any) -> Any:
    return asyncio.run(coro)


def session() -> Any:
    import aiohttp

    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=1800)
    )


def ttft(port: int, models: list[str], system: str) -> float:
    """Median TTFT of one request at a time, each a cache hit where the cache is on."""

    async def run() -> list[float]:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with session() as s:
            times = []
            for i, question in enumerate(QUESTIONS):
                model = models[i % len(models)]
                messages = [
                    {"role": "system", "content": system},
                    {"role": "user", "content": question},
                ]
                times.append(await first_chunk_s(s, url, chat_body(model, messages, 4)))
            return times

    return statistics.median(run_async(run()))


def burst(
    port: int,
    models: list[str],
    system: str,
    requests: int,
    new_tokens: int,
    salt: str | None = None,
) -> tuple[float, int]:
    """Output tokens per second of `requests` requests sent at once (under `salt`, their
    cache_salt, if given), and the prompt tokens they found cached."""

    async def run() -> tuple[int, int]:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with session() as s:
            bodies = [
                chat_body(
                    models[i % len(models)],
                    [
                        {"role": "system", "content": system},
                        {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"},
                    ],
                    new_tokens,
                    **({"cache_salt": salt} if salt is not None else {}),
                )
                for i in range(requests)
            ]
            answers = await asyncio.gather(*(post(s, url, b) for b in bodies))
            usage = [a["usage"] for a in answers]
            return (
                sum(u["completion_tokens"] for u in usage),
                sum(u.get("prompt_tokens_details", {}).get("cached_tokens", 0) for u in usage),
            )

    start = time.perf_counter()
    tokens, cached = run_async(run())
    return tokens / (time.perf_counter() - start), cached


def conversations(
    port: int, models: list[str], prompts: list[str], turns: int, turn_tokens: int
) -> dict[str, int]:
    """Prompt tokens and cached tokens over every turn of every conversation (in parallel)."""

    async def one(s: Any, url: str, model: str, opening: str) -> tuple[int, int]:
        messages = [{"role": "user", "content": opening}]
        prompt = cached = 0
        for turn in range(turns):
            answer = await post(s, url, chat_body(model, messages, turn_tokens))
            usage = answer["usage"]
            prompt += usage["prompt_tokens"]
            cached += usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
            messages += [
                {"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                {"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]},
            ]
        return prompt, cached

    async def run() -> list[tuple[int, int]]:
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        async with session() as s:
            return list(
                await asyncio.gather(
                    *(one(s, url, models[i % len(models)], p) for i, p in enumerate(prompts))
                )
            )

    results = run_async(run())
    prompt = sum(p for p, _ in results)
    cached = sum(c for _, c in results)
    return {"prompt_tokens": prompt, "cached_tokens": cached, "computed_tokens": prompt - cached}


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--adapters", type=int, default=8)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=8)
    parser.add_argument("--turn-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    add_server_args(parser, "extra `loraplex serve` flags for both servers (default: none)")
    add_common_args(parser, "prefix_cache")
    args = parser.parse_args()
    extra = server_flags(parser, args.serve_args, [], owned=("--http-port", "--no-prefix-cache"))
    setup_logging()
    home = Path(args.home).expanduser()
    names = [f"{ADAPTER_PREFIX}{i}" for i in range(args.adapters)]
    system = system_prompt(args.system_tokens)
    results: dict[str, dict[str, list[float]]] = {"on": {}, "off": {}}
    chats: dict[str, dict[str, int]] = {}
    with (
        work_dir("loraplex-prefix-", args.keep_work) as work,
        child_pool() as pool,
        server_process(home, work, extra, args.model, log_name="on.log") as on,
        server_process(
            home, work, [*extra, "--no-prefix-cache"], args.model, log_name="off.log"
        ) as off,
    ):
        made = pool.apply_async(
            make_adapters_and_prompts,
            (str(home), args.model, len(names), args.rank, args.conversations, str(work / "peft")),
        )
        servers = {"on": on, "off": off}
        for server in servers.values():
            server.wait_ready(args.startup_timeout)
        openings = made.get(args.startup_timeout)
        for server in servers.values():
            with LoraplexClient(server.address, timeout=600) as client:
                register_adapters(client, work / "peft", names)
        models = names
        for server in servers.values():  # each adapter's system prompt once, and warm-up
            burst(server.http_port, models, system, len(models), 2)
        for round_ in range(args.rounds):
            for name, server in servers.items():
                port = server.http_port
                entry = results[name]
                entry.setdefault("ttft_s", []).append(ttft(port, models, system))
                rate, _ = burst(port, models, system, args.requests, args.new_tokens)
                entry.setdefault("tok_s", []).append(rate)
                log.info(
                    "round %d cache %s: TTFT %.0f ms, %.1f tok/s",
                    round_ + 1,
                    name,
                    entry["ttft_s"][-1] * 1e3,
                    rate,
                )
        # after the warm rounds: a cold burst's blocks push the warm ones out of the pool
        for round_ in range(args.rounds):
            for name, server in servers.items():
                salt = f"cold-{round_}"
                rate, cached = burst(
                    server.http_port, models, system, args.requests, args.new_tokens, salt
                )
                results[name].setdefault("cold_tok_s", []).append(rate)
                results[name].setdefault("cold_cached", []).append(cached)
                log.info(
                    "cold round %d cache %s: %.1f tok/s, %d tokens cached", round_ + 1, name,
                    rate, cached,
                )  # fmt: skip
        for name, server in servers.items():
            chats[name] = conversations(
                server.http_port, models, openings, args.turns, args.turn_tokens
            )
            log.info("chat, cache %s: %s", name, chats[name])
    rows: list[dict[str, Any]] = []
    for name in ("on", "off"):
        rows.append(
            {
                "prefix_cache": name,
                "ttft_ms": statistics.median(results[name]["ttft_s"]) * 1e3,
                "tok_s": statistics.median(results[name]["tok_s"]),
                "cold_tok_s": statistics.median(results[name]["cold_tok_s"]),
                "cold_cached": statistics.median(results[name]["cold_cached"]),
                **chats[name],
            }
        )
    on_row, off_row = rows
    ratios = {
        "ttft_on_over_off": on_row["ttft_ms"] / off_row["ttft_ms"],
        "throughput_on_over_off": on_row["tok_s"] / off_row["tok_s"],
        "cold_throughput_on_over_off": on_row["cold_tok_s"] / off_row["cold_tok_s"],
        "chat_computed_off_over_on": off_row["computed_tokens"] / max(1, on_row["computed_tokens"]),
    }
    cols = [("cache", 6, "s"), ("TTFT ms", 8, ".0f"), ("tok/s", 7, ".1f"),
            ("cold tok/s", 10, ".1f"), ("cold cached", 11, ".0f"),
            ("chat prompt", 11, "d"), ("cached", 7, "d"), ("computed", 8, "d")]  # fmt: skip
    table = format_table(
        cols,
        [
            [r["prefix_cache"], r["ttft_ms"], r["tok_s"], r["cold_tok_s"], r["cold_cached"],
             r["prompt_tokens"], r["cached_tokens"], r["computed_tokens"]]
            for r in rows
        ],
    )  # fmt: skip
    table.append(
        f"TTFT on/off {ratios['ttft_on_over_off']:.3f}x (target <= 0.2x), throughput on/off "
        f"{ratios['throughput_on_over_off']:.2f}x (>= 2x), cold burst on/off "
        f"{ratios['cold_throughput_on_over_off']:.2f}x, chat prompt tokens computed off/on "
        f"{ratios['chat_computed_off_over_on']:.2f}x (>= 4x); system prompt ~{args.system_tokens}"
        f" tokens, {args.adapters} adapters, median of {args.rounds} rounds"
    )
    report = {"args": vars(args), "rows": rows, "ratios": ratios, "rounds": results}
    publish(report, table, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
