"""Offline throughput: the loraplex engine against its baselines, all measured in one run.

N requests (chat prompts) x M new tokens each (EOS ignored, so every system does the same
work), with K distinct all-linear LoRA adapters spread round-robin over the requests:

    loraplex mixed       the engine, requests for K adapters batched together
    loraplex base        the engine, no adapter
    HF generate base     transformers generate on one left-padded batch, no adapter
    PEFT mixed batch     PEFT generate(adapter_names=...) on one batch
    PEFT one at a time   set_adapter + generate per request (a sample, extrapolated)

The machine is shared and noisy: each figure is the median of --repeats runs, and the table
gives ratios to loraplex base-only and to the PEFT mixed batch from the same run.

    python benchmarks/throughput.py [--requests 16] [--new-tokens 32] [--adapters 1,4,16]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
from functools import partial
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model

from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.validate import BaseModelSpec
from loraplex.server.config import EngineConfig, ModelConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.model_runner import ModelRunner
from loraplex.server.engine.request import EngineRequest, RequestOutput, SamplingParams
from loraplex.server.model_loader import load_model

log = logging.getLogger("benchmark")

TOPICS = [
    "the ocean",
    "a robot",
    "the moon",
    "coffee",
    "a library",
    "trains",
    "winter",
    "a garden",
    "music",
    "mountains",
    "the city",
    "a cat",
    "rain",
    "bread",
    "stars",
    "time",
]


def prompts(tokenizer: object, n: int) -> list[list[int]]:
    out = []
    for i in range(n):
        text = tokenizer.apply_chat_template(  # type: ignore[attr-defined]
            [{"role": "user", "content": f"Write a short paragraph about {TOPICS[i % 16]}."}],
            tokenize=False,
            add_generation_prompt=True,
        )
        out.append(tokenizer(text, add_special_tokens=False).input_ids)  # type: ignore[operator]
    return out


def make_adapters(model: torch.nn.Module, k: int, rank: int, out: Path) -> PeftModel:
    """k random all-linear LoRA adapters made with PEFT on `model` (in place), saved to out/."""
    names = [f"bench-{i}" for i in range(k)]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    peft_model = get_peft_model(model, config, adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for pname, p in peft_model.named_parameters():
            if "lora_B" in pname:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    peft_model.save_pretrained(out, selected_adapters=names)
    peft_model.eval()
    return peft_model


def run_engine(engine: Engine, requests: list[tuple[list[int], object]], new_tokens: int) -> float:
    """Submit every request at once; seconds until the last one finished."""
    remaining = len(requests)
    done = threading.Event()
    lock = threading.Lock()

    def emit(item: RequestOutput | BaseException) -> None:
        nonlocal remaining
        if isinstance(item, BaseException):
            raise item
        if item.finish_reason is not None:
            with lock:
                remaining -= 1
                if remaining == 0:
                    done.set()

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, (ids, adapter) in enumerate(requests):
        engine.submit(EngineRequest(f"b{i}", ids, params, adapter, emit))  # type: ignore[arg-type]
    if not done.wait(3600):
        raise TimeoutError("the engine did not finish")
    return time.perf_counter() - start


def hf_batch(
    model: PeftModel,
    batch: list[list[int]],
    new_tokens: int,
    pad: int,
    adapter_names: list[str] | None,
) -> float:
    """One left-padded generate() over the whole batch; seconds."""
    t = max(map(len, batch))
    ids = torch.tensor([[pad] * (t - len(p)) + p for p in batch])
    mask = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in batch])
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
    )
    start = time.perf_counter()
    with torch.inference_mode():
        if adapter_names is None:
            model.generate(**kwargs)
        else:
            model.generate(**kwargs, adapter_names=adapter_names)
    return time.perf_counter() - start


def peft_one_at_a_time(
    model: PeftModel, batch: list[list[int]], names: list[str], new_tokens: int, pad: int
) -> float:
    start = time.perf_counter()
    with torch.inference_mode():
        for ids, name in zip(batch, names, strict=True):
            model.set_adapter(name)
            model.generate(
                input_ids=torch.tensor([ids]),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=pad,
            )
    return time.perf_counter() - start


def median_time(fn, repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--adapters", default="1,4,16", help="distinct adapter counts to run")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--single-sample",
        type=int,
        default=4,
        help="requests PEFT one-at-a-time actually runs (then extrapolated)",
    )
    parser.add_argument("--home", default=os.environ.get("LORAPLEX_HOME", "~/.cache/loraplex"))
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    counts = [int(k) for k in args.adapters.split(",")]
    n, m = args.requests, args.new_tokens
    home = Path(args.home).expanduser()

    config = EngineConfig(
        max_batch_size=n,
        max_loras=max(counts),
        max_lora_rank=args.rank,
        max_prefill_tokens=n * 512,
    )
    # Every system runs its tensor work on the engine's thread (one torch thread: see Engine).
    engine = Engine(
        lambda: ModelRunner(load_model(ModelConfig(home=home)), config.max_loras, args.rank),
        config,
    )
    runner = engine.start()

    def on_engine(fn):
        return engine.call(fn).result()

    tokenizer = runner.loaded.tokenizer
    pad = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
    batch = prompts(tokenizer, n)
    work = tempfile.mkdtemp(prefix="loraplex-bench-")
    plain = on_engine(lambda: load_model(ModelConfig(home=home)).model)  # HF, no PEFT wrapping
    peft_model = on_engine(
        lambda: make_adapters(
            load_model(ModelConfig(home=home)).model, max(counts), args.rank, Path(work) / "peft"
        )
    )
    spec = BaseModelSpec(runner.target_shapes, config.max_lora_rank, runner.loaded.fingerprint)
    registry = AdapterRegistry(AdapterStore(Path(work) / "store"), spec, [Path(work)])
    versions = on_engine(
        lambda: [
            registry.register(f"bench-{i}", f"{work}/peft/bench-{i}")[0] for i in range(max(counts))
        ]
    )
    engine.load_weights = registry.load_weights
    run_engine(engine, [(batch[0], None)], 2)  # warm-up

    tokens = n * m
    rows: list[dict] = []

    def record(system: str, k: int, seconds: float, note: str = "") -> None:
        rows.append(
            {
                "system": system,
                "adapters": k,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
                "note": note,
            }
        )
        log.info("%-22s K=%-3d %8.1f tok/s %s", system, k, tokens / seconds, note)

    record(
        "loraplex base",
        0,
        median_time(lambda: run_engine(engine, [(p, None) for p in batch], m), args.repeats),
    )
    record(
        "HF generate base",
        0,
        median_time(lambda: on_engine(lambda: hf_batch(plain, batch, m, pad, None)), args.repeats),
    )
    for k in counts:
        mix = [(p, versions[i % k]) for i, p in enumerate(batch)]
        run_engine(engine, mix, 2)  # loads the adapters into their slots
        record(
            "loraplex mixed",
            k,
            median_time(lambda mix=mix: run_engine(engine, mix, m), args.repeats),
        )
        names = [f"bench-{i % k}" for i in range(n)]
        record(
            "PEFT mixed batch",
            k,
            median_time(
                lambda names=names: on_engine(partial(hf_batch, peft_model, batch, m, pad, names)),
                args.repeats,
            ),
        )
        s = min(args.single_sample, n)
        sample = on_engine(partial(peft_one_at_a_time, peft_model, batch[:s], names[:s], m, pad))
        record("PEFT one at a time", k, sample * n / s, f"{s} of {n} run, extrapolated")
    engine.stop()

    base = next(r for r in rows if r["system"] == "loraplex base")["tokens_per_s"]
    for r in rows:
        peft_mixed = next(
            (
                x["tokens_per_s"]
                for x in rows
                if x["system"] == "PEFT mixed batch" and x["adapters"] == r["adapters"]
            ),
            None,
        )
        r["vs_loraplex_base"] = r["tokens_per_s"] / base
        r["vs_peft_mixed"] = r["tokens_per_s"] / peft_mixed if peft_mixed else None
    header = f"{'system':<22}{'adapters':>9}{'tok/s':>10}{'x base':>9}{'x PEFT mix':>12}  note"
    lines = [
        f"{n} requests x {m} new tokens, r={args.rank} all-linear, "
        f"median of {args.repeats}, torch threads {torch.get_num_threads()}",
        header,
    ]
    for r in rows:
        vs_peft = f"{r['vs_peft_mixed']:.2f}" if r["vs_peft_mixed"] else "-"
        lines.append(
            f"{r['system']:<22}{r['adapters']:>9}{r['tokens_per_s']:>10.1f}"
            f"{r['vs_loraplex_base']:>9.2f}{vs_peft:>12}  {r['note']}"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "requests": n,
                "new_tokens": m,
                "rank": args.rank,
                "repeats": args.repeats,
                "rows": rows,
            },
            indent=2,
        )
    )
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
