"""What the benchmarks share; every benchmark imports it, and none imports another benchmark.

How they run: as scripts from the repository root, `python benchmarks/NAME.py [flags]` (as
`make bench` does). Python puts a script's own directory first on sys.path, so `import harness`
resolves with no path set-up, and the children a benchmark spawns (multiprocessing's "spawn")
inherit that path. benchmarks/ is not a package: `python -m benchmarks.NAME` is not supported.

This module imports only the standard library (and loraplex's light config) at its top: each
helper imports torch, PEFT, gRPC or the engine where it needs them. The gRPC benchmarks' own
process is a load generator whose peak RSS they report, and training compares two processes'
peak RSS: neither may carry libraries it does not use.

    workload     SENTENCES, bench_prompts, prompt_texts, user_message: chat prompts of a
                 token-length range (ids in process, user messages for servers)
    adapters     WEIGHTS, ADAPTER_PREFIX, RandomAdapters, make_adapters, write_adapters,
                 make_adapters_and_prompts, load_base, load_into_peft
    engine       Job, EngineBench: the engine in this process with a registry of adapters
    server       ServerDied, ServerProcess, serve_command, server_process, register_adapters,
                 StreamResult, stream_one, summarize_streams, burst_rate, burst_summary,
                 burst_requests
    statistics   percentile, latency_ms
    memory       peak_rss_bytes, peak_rss_mib
    machine      machine_facts: what every result records of the machine it ran on
    running      make_parser, add_common_args, add_server_args, SERVER_OWNED, server_flags,
                 setup_logging, exit_on_sigterm, run_main, work_dir, child_pool, in_child
    output       cell, format_table, emit_table, prepare_output, write_json, publish

`python benchmarks/harness.py` prints this machine's facts (machine_facts) as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import platform
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from multiprocessing.pool import Pool
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from loraplex.core.config import DEFAULT_HOME, HOME_ENV

if TYPE_CHECKING:
    import torch
    from peft import LoraConfig, PeftModel

    from loraplex.adapters.registry import AdapterRegistry
    from loraplex.core.model import LoadedModel
    from loraplex.core.types import AdapterVersion, AdapterWeights
    from loraplex.server.client import LoraplexClient
    from loraplex.server.config import EngineConfig
    from loraplex.server.engine.model_runner import ModelRunner
    from loraplex.server.engine.state import EngineInfo, EngineSnapshot
    from loraplex.v1 import inference_pb2, inference_pb2_grpc

log = logging.getLogger("benchmark")
RESULTS = Path(__file__).resolve().parent / "results"  # where results go, from any cwd
T = TypeVar("T")

# -- the workload ------------------------------------------------------------------------------
SENTENCES = [
    "The ocean keeps a slow rhythm against the old harbour wall.",
    "A small robot sorts letters in the back room of the post office.",
    "Coffee tastes better when the morning is cold and quiet.",
    "The library smells of paper, dust and rain on the windows.",
    "Trains cross the valley twice an hour, always a little late.",
    "In winter the garden sleeps under a thin blanket of frost.",
    "Music drifts from an open window above the bakery.",
    "The mountains turn pink for a few minutes after sunset.",
    "A cat watches the street from the top of a parked car.",
    "Stars are easier to see far from the lights of the city.",
    "Fresh bread cools on the counter while the soup simmers.",
    "Time moves differently on long summer afternoons.",
]


def bench_prompts(
    tokenizer: Any, n: int, min_tokens: int = 64, max_tokens: int = 128, seed: int = 0
) -> list[list[int]]:
    """n chat prompts (token ids, chat template applied) of min_tokens..max_tokens tokens."""
    return [ids for _, ids in _chat_prompts(tokenizer, n, min_tokens, max_tokens, seed)]


def prompt_texts(tokenizer: Any, n: int, min_tokens: int = 64, max_tokens: int = 128) -> list[str]:
    """bench_prompts as the user's text, for servers: sent as one user message (user_message,
    or a peer's chat API), whose chat template makes it bench_prompts' ids again. (As a raw
    prompt the template's control tokens would be text: loraplex tokenizes raw prompts so.)"""
    return [text for text, _ in _chat_prompts(tokenizer, n, min_tokens, max_tokens)]


def user_message(text: str) -> list[Any]:
    """A GenerateRequest's `messages` for one user turn."""
    from loraplex.v1 import inference_pb2

    return [inference_pb2.ChatMessage(role="user", content=text)]


def _chat_prompts(
    tokenizer: Any, n: int, min_tokens: int, max_tokens: int, seed: int = 0
) -> list[tuple[str, list[int]]]:
    """n (user text, its chat-templated ids) of min_tokens..max_tokens tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        target = rng.randint(min_tokens, max_tokens)
        sentences = [
            f"Summarise the following notes in a short paragraph (request {rng.random():.6f})."
        ]
        ids: list[int] = []
        text = ""
        while True:
            sentences.append(rng.choice(SENTENCES))
            candidate = _chat_ids(tokenizer, " ".join(sentences))
            if len(candidate) > max_tokens:
                break
            ids, text = candidate, " ".join(sentences)
            if len(ids) >= target:
                break
        if len(ids) < min_tokens:
            raise ValueError(f"cannot build a prompt of {min_tokens}..{max_tokens} tokens")
        out.append((text, ids))
    return out


def _chat_ids(tokenizer: Any, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return list(tokenizer(rendered, add_special_tokens=False).input_ids)


# -- random adapters in PEFT's format ----------------------------------------------------------
WEIGHTS = "adapter_model.safetensors"
ADAPTER_PREFIX = "bench-"  # the names make_adapters gives: bench-0, bench-1, ...


class RandomAdapters:
    """Random LoRA adapters in stock PEFT's format under `out`: PEFT lays out one (`template`,
    wrapping `model` in place), the others are written with its config and fresh random weights
    (adding adapters to one PeftModel one by one is quadratic)."""

    def __init__(
        self, model: torch.nn.Module, config: LoraConfig, out: Path, template: str, seed: int
    ) -> None:
        import torch
        from peft import get_peft_model
        from safetensors.torch import load_file

        get_peft_model(model, config, adapter_name=template).save_pretrained(str(out))
        self.out = out
        self.template = out / template
        self.shapes = {name: t.shape for name, t in load_file(self.template / WEIGHTS).items()}
        self.generator = torch.Generator().manual_seed(seed)

    def random_weights(self) -> dict[str, torch.Tensor]:
        """The template's tensors, random: A scaled like PEFT's init, B random too (PEFT's zero
        B would make every adapter a no-op)."""
        import torch

        return {
            name: torch.randn(shape, generator=self.generator)
            * (shape[1] ** -0.5 if "lora_A" in name else 0.02)
            for name, shape in self.shapes.items()
        }

    def write(self, name: str, tensors: dict[str, torch.Tensor]) -> Path:
        """The adapter `name` (a directory under `out`) with the template's config."""
        from safetensors.torch import save_file

        path = self.out / name
        path.mkdir(parents=True, exist_ok=True)
        if path != self.template:
            shutil.copy(self.template / "adapter_config.json", path / "adapter_config.json")
        save_file(tensors, path / WEIGHTS)
        return path


def make_adapters(model: torch.nn.Module, k: int, rank: int, out: Path) -> list[Path]:
    """k random all-linear rank-`rank` adapters bench-0..k-1 under out/ (wraps `model`)."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
    adapters = RandomAdapters(model, config, out, f"{ADAPTER_PREFIX}0", seed=0)
    return [adapters.write(f"{ADAPTER_PREFIX}{i}", adapters.random_weights()) for i in range(k)]


def load_base(home: str, model: str | None = None) -> LoadedModel:
    """The base model, in a child process (logging set up as in the parent)."""
    from loraplex.core.config import ModelConfig
    from loraplex.core.model import load_model

    setup_logging()
    return load_model(ModelConfig(model=model, home=Path(home)))


def write_adapters(home: str, k: int, rank: int, out: str) -> list[str]:
    """In a child process (`in_child`): make_adapters on its own copy of the base model, which
    never counts in the parent's peak RSS; the adapter directories."""
    return [str(p) for p in make_adapters(load_base(home).model, k, rank, Path(out))]


def make_adapters_and_prompts(
    home: str, model: str | None, k: int, rank: int, n_prompts: int, out: str
) -> list[str]:
    """In a child process: k adapters under out/ (none when k is 0) and n_prompts prompt texts
    (prompt_texts) for the server."""
    loaded = load_base(home, model)
    if k:
        log.info("making %d random r=%d all-linear adapters in %s", k, rank, out)
        make_adapters(loaded.model, k, rank, Path(out))
    return prompt_texts(loaded.tokenizer, n_prompts)


def load_into_peft(model: torch.nn.Module, dirs: Sequence[Path]) -> PeftModel:
    """Stock PEFT holding every adapter of `dirs` (named by directory), for the baselines."""
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(model, dirs[0], adapter_name=dirs[0].name)
    for path in dirs[1:]:
        peft_model.load_adapter(path, adapter_name=path.name)
    peft_model.eval()
    return peft_model


# -- the engine, offline -----------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One request for EngineBench.run: prompt ids, the adapter (None: the base model) and its
    weights (None: the engine reads them from the registry's store)."""

    prompt: list[int]
    adapter: AdapterVersion | None = None
    weights: AdapterWeights | None = None


class EngineBench:
    """The engine in this process (`config`, the model from `home`), and a registry of adapters
    in a store under `work` from which the engine reads the weights of a request that brings
    none, as the server's runtime does. All tensor work runs on the engine's thread (one
    torch thread: see Engine)."""

    def __init__(self, config: EngineConfig, home: Path, work: Path) -> None:
        from loraplex.server.engine.engine import Engine

        self.config = config
        self.home = home
        self.work = work
        self._registry: AdapterRegistry | None = None
        self.engine = Engine(self._make_runner, config, self._load_weights)
        self.longest_gap_s = 0.0  # of the last run: the longest wait of a job between outputs

    def start(self) -> EngineInfo:
        """Load the model on the engine thread; then the registry, for its fingerprint."""
        from loraplex.adapters.registry import AdapterRegistry
        from loraplex.adapters.store import AdapterStore
        from loraplex.core.types import BaseModelSpec

        info = self.engine.start()
        spec = BaseModelSpec(
            linear_shapes=info.target_shapes,
            max_rank=self.config.max_lora_rank,
            fingerprint=info.fingerprint,
        )
        self._registry = AdapterRegistry(AdapterStore(self.work / "store"), spec, [self.work])
        return info

    @property
    def registry(self) -> AdapterRegistry:
        if self._registry is None:
            raise RuntimeError("start the engine first")
        return self._registry

    def on_engine(self, fn: Callable[[], T]) -> T:
        """Run `fn` on the engine thread (between two steps) and wait for its result."""
        return self.engine.call(fn).result()

    def register(self, dirs: Sequence[str | Path]) -> list[AdapterVersion]:
        """Register adapter directories (named by directory), on the engine thread: validating
        the weights is tensor work."""
        registry = self.registry
        return self.on_engine(lambda: [registry.register(Path(d).name, str(d))[0] for d in dirs])

    def load_weights(self, version: AdapterVersion) -> AdapterWeights:
        """A registered version's weights from the store (read on the engine thread)."""
        return self.on_engine(lambda: self.registry.load_weights(version))

    def snapshot(self) -> EngineSnapshot:
        return self.engine.snapshot().result()

    def run(
        self, jobs: Sequence[Job], new_tokens: int, ignore_eos: bool = True, salt: str = ""
    ) -> tuple[float, list[list[int]]]:
        """Submit every job at once, with `salt` as their cache_salt (a fresh one: no prefix
        cached by earlier runs is read); (seconds until the last one finished, each job's tokens).
        ignore_eos: every job generates new_tokens (the same work whatever the model says)."""
        from loraplex.server.engine.request import EngineRequest, RequestOutput, SamplingParams

        outputs: list[list[int]] = [[] for _ in jobs]
        emitted: list[list[float]] = [[] for _ in jobs]  # when each output came
        remaining = len(jobs)
        done = threading.Event()
        lock = threading.Lock()
        errors: list[BaseException] = []

        def emitter(i: int) -> Callable[[RequestOutput | BaseException], None]:
            def emit(item: RequestOutput | BaseException) -> None:
                nonlocal remaining
                if isinstance(item, BaseException):
                    errors.append(item)
                    done.set()
                    return
                outputs[i].extend(item.token_ids)
                emitted[i].append(time.perf_counter())
                if item.finish_reason is not None:
                    with lock:
                        remaining -= 1
                        if remaining == 0:
                            done.set()

            return emit

        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=ignore_eos)
        start = time.perf_counter()
        for i, job in enumerate(jobs):
            request = EngineRequest(
                request_id=f"bench-{i}",
                prompt_ids=job.prompt,
                params=params,
                adapter=job.adapter,
                emit=emitter(i),
                weights=job.weights,
                cache_salt=salt,
            )
            self.engine.submit(request)
        if not done.wait(3600) or errors:
            raise RuntimeError(f"the engine failed: {errors[:1] or 'no answer within an hour'}")
        seconds = time.perf_counter() - start
        self.longest_gap_s = max(
            (b - a for times in emitted for a, b in itertools.pairwise(times)),
            default=0.0,
        )
        return seconds, outputs

    def stop(self) -> None:
        self.engine.stop()

    def __enter__(self) -> EngineBench:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _make_runner(self) -> ModelRunner:
        from loraplex.core.config import ModelConfig
        from loraplex.core.model import load_model
        from loraplex.server.engine.model_runner import ModelRunner

        return ModelRunner.from_config(load_model(ModelConfig(home=self.home)), self.config)

    def _load_weights(self, version: AdapterVersion) -> AdapterWeights:
        return self.registry.load_weights(version)


# -- the server subprocess ---------------------------------------------------------------------
class ServerDied(RuntimeError):
    """The server subprocess exited (its log's last lines are in the message)."""


class ServerProcess:
    """`loraplex serve` (`argv`, see serve_command), its log in a file; stopped (TERM, then
    KILL) when the `with` block ends."""

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
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

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

    @property
    def http_port(self) -> int:
        """The port of the server's OpenAI-compatible HTTP API (once wait_ready returned)."""
        match = re.search(r"HTTP API \S+ on [^\s]+:(\d+)", self.log_path.read_text("utf-8"))
        if match is None:
            raise RuntimeError("the server serves no HTTP API (--no-http?)")
        return int(match.group(1))

    @property
    def metrics_port(self) -> int:
        """The port of the server's Prometheus /metrics (once wait_ready returned)."""
        match = re.search(
            r"metrics on http://[^\s:]+:(\d+)/metrics", self.log_path.read_text("utf-8")
        )
        if match is None:
            raise RuntimeError("the server serves no metrics (--metrics-port?)")
        return int(match.group(1))

    def gc_pauses(self) -> dict[str, dict[str, float]]:
        """Per garbage-collector generation ("0", "1", "2"), the collections so far and the
        seconds they stopped the server for (its loraplex_gc_pause_seconds; {} when it serves
        no metrics)."""
        try:
            url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        except RuntimeError:
            return {}
        with urllib.request.urlopen(url, timeout=10) as reply:
            text = reply.read().decode()
        found: dict[str, dict[str, float]] = {}
        for name, generation, value in re.findall(
            r'^loraplex_gc_pause_seconds_(count|sum)\{generation="(\d)"\} (\S+)$', text, re.M
        ):
            found.setdefault(generation, {})["collections" if name == "count" else "seconds"] = (
                float(value)
            )
        return found

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


def serve_command(
    home: Path,
    work: Path,
    flags: Sequence[str] = (),
    model: str | None = None,
    store: Path | None = None,
) -> list[str]:
    """`loraplex serve` on free ports (gRPC, HTTP and metrics), its adapter store `store`
    (default work/store), adapters registered from under `work`; `flags` last, so they
    override."""
    script = Path(sys.executable).parent / "loraplex"
    base = [str(script)] if script.exists() else [sys.executable, "-m", "loraplex.server.cli"]
    argv = [*base, "serve", "--port", "0", "--http-port", "0", "--metrics-port", "0"]
    argv += ["--home", str(home)]
    argv += ["--adapter-store", str(store or work / "store"), "--adapter-root", str(work)]
    if model:
        argv += ["--model", model]
    return argv + list(flags)


def server_process(
    home: Path,
    work: Path,
    flags: Sequence[str] = (),
    model: str | None = None,
    store: Path | None = None,
    log_name: str = "server.log",
) -> ServerProcess:
    """ServerProcess of serve_command (same arguments), logging to work/log_name."""
    return ServerProcess(serve_command(home, work, flags, model, store), work / log_name)


def register_adapters(client: LoraplexClient, root: Path, ids: Sequence[str]) -> None:
    """Register each adapter id from the directory of that name under `root`."""
    for adapter_id in ids:
        client.register(adapter_id, str(root / adapter_id))
    log.info("registered %d adapters", len(ids))


@dataclass
class StreamResult:
    """One streamed GenerateStream call, as the client saw it."""

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
    request_id: str | None = None,
) -> StreamResult:
    """Stream one request. TTFT is the first chunk carrying tokens; a chunk may carry several
    tokens, so each gets an inter-token latency of (gap since the last chunk) / (its tokens)."""
    import grpc

    start = time.perf_counter()
    result = StreamResult(request.adapter_id, start)
    last: float | None = None
    try:
        metadata = (("x-request-id", request_id),) if request_id else None
        async for chunk in stub.GenerateStream(request, timeout=timeout, metadata=metadata):
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


def summarize_streams(results: list[StreamResult]) -> dict[str, Any]:
    """Counts, throughput (from the first send to the last end) and TTFT, ITL and e2e latency
    of a set of streams; raises when every one failed."""
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


def burst_rate(
    address: str, prompts: Sequence[str], ids: Sequence[str], new_tokens: int, salt: str = ""
) -> float:
    """len(prompts) GenerateStream calls sent at once (greedy, end of sequence ignored; request
    i for adapter ids[i % len(ids)], the base without ids); output tokens per second from the
    first send to the last end. A fresh `salt` (the requests' cache_salt) keeps the burst from
    reading prefixes that earlier bursts cached."""
    return float(burst_summary(address, prompts, ids, new_tokens, salt)["output_tokens_per_s"])


def burst_summary(
    address: str, prompts: Sequence[str], ids: Sequence[str], new_tokens: int, salt: str = ""
) -> dict[str, Any]:
    """burst_rate's burst, summarized (summarize_streams)."""
    import asyncio

    import grpc

    from loraplex.v1 import inference_pb2_grpc

    async def burst() -> list[StreamResult]:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            requests = burst_requests(prompts, ids, new_tokens, salt)
            return await asyncio.gather(*(stream_one(stub, r, 900.0) for r in requests))

    return summarize_streams(asyncio.run(burst()))


def burst_requests(
    prompts: Sequence[str], ids: Sequence[str], new_tokens: int, salt: str = ""
) -> list[Any]:
    """A burst's GenerateRequests: prompt i as one user message, for adapter ids[i % len(ids)]
    (the base without ids), greedy, new_tokens each whatever the model says, with `salt` as
    their cache_salt."""
    from loraplex.v1 import inference_pb2

    return [
        inference_pb2.GenerateRequest(
            adapter_id=ids[i % len(ids)] if ids else "",
            messages=user_message(p),
            max_new_tokens=new_tokens,
            temperature=0.0,
            ignore_eos=True,
            cache_salt=salt,
        )
        for i, p in enumerate(prompts)
    ]


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
    """p50, p90, p99, mean and max of latencies in seconds, in ms (None: no values)."""
    if not values:
        return None
    return {
        "p50": percentile(values, 50) * 1e3,
        "p90": percentile(values, 90) * 1e3,
        "p99": percentile(values, 99) * 1e3,
        "mean": sum(values) / len(values) * 1e3,
        "max": max(values) * 1e3,
    }


# -- memory ------------------------------------------------------------------------------------
def peak_rss_bytes(pid: int | str = "self") -> int | None:
    """VmHWM (peak resident set) of a process, from /proc; None where there is no /proc."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def peak_rss_mib() -> float:
    """This process' peak RSS in MiB (getrusage where there is no /proc; Linux counts KiB)."""
    peak = peak_rss_bytes()
    if peak is not None:
        return peak / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- the machine -------------------------------------------------------------------------------
def machine_facts(fresh_process: bool = False) -> dict[str, Any]:
    """What every result records of the machine it ran on: CPUs, torch's threads and the
    instruction set of its CPU kernels (torch.backends.cpu.get_cpu_capability(): AVX512,
    AVX2, ...), versions. fresh_process: read in a new Python process with this one's
    environment (what a server subprocess starts with), so that this process never imports
    torch (the gRPC benchmarks' client)."""
    if fresh_process:
        done = subprocess.run(
            [sys.executable, str(Path(__file__).resolve())],
            capture_output=True,
            text=True,
            check=True,
            timeout=600,
        )
        return json.loads(done.stdout.strip().splitlines()[-1])
    import torch

    from loraplex.core.machine import cpu_model

    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "cpus": os.cpu_count(),
        "usable_cpus": len(affinity(0)) if affinity else os.cpu_count(),
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


# -- running a benchmark -----------------------------------------------------------------------
def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first line and whose epilog is the rest."""
    lines = (doc or "").split("\n")
    return argparse.ArgumentParser(
        description=lines[0] or None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(lines[2:]) or None,
    )


def add_common_args(parser: argparse.ArgumentParser, name: str) -> None:
    """--home (the model cache) and --out (benchmarks/results/<name>.json, wherever the
    benchmark is run from)."""
    parser.add_argument("--home", default=os.environ.get(HOME_ENV, str(DEFAULT_HOME)))
    parser.add_argument("--out", default=str(RESULTS / f"{name}.json"))


def add_server_args(
    parser: argparse.ArgumentParser, serve_help: str = "extra `loraplex serve` flags"
) -> None:
    """The flags of a benchmark that starts `loraplex serve` subprocesses: --model,
    --serve-args (one shell-quoted string: see server_flags), --startup-timeout, --keep-work."""
    parser.add_argument("--model", help="served model (default: the embedded SmolLM2)")
    parser.add_argument("--serve-args", default="", help=serve_help)
    parser.add_argument("--startup-timeout", type=float, default=900.0)
    parser.add_argument("--keep-work", action="store_true", help="keep the temporary directory")


SERVER_OWNED = ("--port", "--home", "--adapter-store", "--adapter-root", "--model")
"""`loraplex serve` flags a benchmark sets itself (serve_command), never through --serve-args."""


def server_flags(
    parser: argparse.ArgumentParser,
    serve_args: str,
    words: Sequence[str] = (),
    owned: Iterable[str] = (),
) -> list[str]:
    """The extra `loraplex serve` words: --serve-args split as a shell would, then `words`;
    a parser error for any flag the benchmark sets itself (SERVER_OWNED and `owned`)."""
    extra = shlex.split(serve_args) + list(words)
    taken = {*SERVER_OWNED, *owned}
    clash = [a for a in extra if a.split("=", 1)[0] in taken]
    if clash:
        parser.error(f"set by the benchmark, not through the server's flags: {' '.join(clash)}")
    return extra


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")


def _exit_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """SIGTERM raises SystemExit, which unwinds through the `with` blocks and `finally`
    clauses: server subprocesses are stopped and temporary directories removed."""
    signal.signal(signal.SIGTERM, _exit_on_signal)


def run_main(main: Callable[[], int]) -> int:
    """Run a benchmark's main (SIGTERM handled: exit_on_sigterm): a failure is one logged line
    and status 1, not a traceback; an interrupt, status 130."""
    import grpc

    exit_on_sigterm()
    try:
        return main()
    except (RuntimeError, TimeoutError, OSError, grpc.RpcError) as exc:
        if isinstance(exc, grpc.RpcError):
            message = f"{exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
        else:
            message = f"{type(exc).__name__}: {exc}"
        log.error("benchmark failed: %s", message)
        return 1
    except KeyboardInterrupt:
        return 130


@contextmanager
def work_dir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """A temporary directory, removed at the end unless `keep`."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield work
    finally:
        if keep:
            log.info("kept %s", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


def child_pool() -> Pool:
    """One spawned child process (a fresh interpreter: what it loads never weighs on this
    process' memory); leaving its `with` block terminates it."""
    return get_context("spawn").Pool(1)


def in_child(fn: Callable[..., T], *args: Any) -> T:
    """fn(*args) in a spawned child process, which exits afterwards (fn must be a module-level
    function: the child imports it)."""
    with child_pool() as pool:
        result = pool.apply(fn, args)
        pool.close()
        pool.join()
    return result


# -- output ------------------------------------------------------------------------------------
def cell(value: object, spec: str, width: int = 0) -> str:
    """`value` formatted by `spec`, right-aligned in `width`; "-" for None."""
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_table(
    cols: Sequence[tuple[str, int, str]], rows: Iterable[Sequence[object]]
) -> list[str]:
    """A header of the column names, then a line per row: columns (name, width, format spec),
    right-aligned, one space apart; None shows as "-"."""
    lines = [" ".join(f"{name:>{width}}" for name, width, _ in cols)]
    for row in rows:
        lines.append(" ".join(cell(v, s, w) for v, (_, w, s) in zip(row, cols, strict=True)))
    return lines


def emit_table(table: str | Sequence[str]) -> None:
    """A benchmark's final table (text, or its lines) on stdout; everything else is logged."""
    text = table if isinstance(table, str) else "\n".join(table)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")


def prepare_output(path: str | Path) -> Path:
    """`path`, its directory made."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def write_json(path: str | Path, data: Any) -> Path:
    """A benchmark's results as JSON (indented) at `path`."""
    out = prepare_output(path)
    out.write_text(json.dumps(data, indent=2) + "\n")
    log.info("wrote %s", out)
    return out


def publish(
    report: dict[str, Any], table: str | Sequence[str], out: str | Path, fresh_process: bool = False
) -> Path:
    """A benchmark's end: the machine's facts into report["machine"] (machine_facts; read after
    any peak RSS, since they may import torch here), the table on stdout, the report as JSON
    at `out`."""
    report["machine"] = machine_facts(fresh_process)
    emit_table(table)
    return write_json(out, report)


if __name__ == "__main__":
    sys.stdout.write(json.dumps(machine_facts()) + "\n")
