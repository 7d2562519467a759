"""The GPU path in one command (about 8 minutes on one GPU): its tests, its kernels against
torch's ops, and serving with both LoRA backends on a Llama-3-8B-shaped NF4 model.

    1. tests     `pytest -m gpu`: the CUDA-only tests (compiled kernels, CUDA graphs, the
                 sampler's single sync); their summary line
    2. kernels   median time of (a) one layer's fused q/k/v LoRA (4096 -> 4096 | 1024 | 1024,
                 r16) over 64 decode tokens on 32 adapters and over a 256-token prompt of one
                 adapter: the Triton shrink/expand (two launches) against torch's ops
                 (lora_ops.add_lora); (b) paged attention of 64 decode tokens over 1024 tokens
                 each (32 query heads, 8 KV heads, 128 dims, blocks of 16): the Triton kernel
                 against the float32 torch reference
    3. serving   a random model with Llama-3-8B's shapes (32 layers, hidden 4096, MLP 14336,
                 32/8 heads; the embedded tokenizer's 49,152 tokens so outputs detokenize),
                 quantized to NF4 as it is built (no download), in the engine (EngineBench):
                 --batches requests at once of 128 prompt tokens x --new-tokens each, on 0, 8
                 and 32 adapters (r16 all-linear, request i on adapter i mod K), --kernels torch
                 and triton, and triton with --cuda-graphs: output tokens/s, and the time
                 until every request of a batch has its first token (TTFT, the last of them)

    4. vLLM      where it is installed (and CUDA is there): the same random model saved as an
                 HF checkpoint with its NF4 weights dequantized to bf16 (vLLM's fastest
                 configuration), the same adapters as PEFT directories, its OpenAI server
                 with --enable-lora and no prefix caching (loraplex runs without), the same
                 batches and adapters (/v1/completions on the prompt ids, streamed): tokens/s
                 and the last first token of a batch (inside the timed burst, where
                 loraplex's TTFT is a burst of its own), and loraplex's ratio to it at the
                 largest batch on the most adapters. loraplex's rows are written before vLLM
                 starts; vLLM's failure is reported, not raised (--skip-vllm: none of it)
Without CUDA the same program runs the kernels in Triton's interpreter on small shapes and
serves a 2-layer model on the CPU: a check that it runs, not figures.

    python benchmarks/gpu.py [--batches 1,8,32,64] [--adapters 0,8,32] [--new-tokens 32]

Where one command may run 10 minutes at most, run `--skip-vllm`, then `--vllm-only` (vLLM's
rows alone: its start and the 16 GB checkpoint take a few minutes of their own).
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CUDA = torch.cuda.is_available()
if not CUDA:  # Triton's interpreter, chosen before any kernel module is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from loraplex.core.model import LoadedModel  # noqa: E402
from loraplex.core.types import AdapterVersion, AdapterWeights  # noqa: E402
from loraplex.server.config import EngineConfig  # noqa: E402

from harness import (  # noqa: E402
    EngineBench,
    Job,
    add_common_args,
    make_parser,
    publish,
    run_main,
    setup_logging,
    work_dir,
)

log = logging.getLogger("benchmark")

LLAMA3_8B = {"layers": 32, "hidden": 4096, "mlp": 14336, "heads": 32, "kv_heads": 8}
SMOKE = {"layers": 2, "hidden": 256, "mlp": 512, "heads": 4, "kv_heads": 2}
PROMPT_TOKENS = 128
RANK = 16


# -- 1. tests ------------------------------------------------------------------------------------
def gpu_tests() -> str:
    """`pytest -m gpu`'s summary line."""
    try:
        result = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "tests"],
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired:
        return "pytest -m gpu did not finish in 10 minutes"
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return lines[-1] if lines else f"pytest exited with {result.returncode}"


# -- 2. kernels ----------------------------------------------------------------------------------
def median_ms(fn: Callable[[], object], repeats: int) -> float:
    """Median milliseconds of fn() after a warm-up call (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def lora_kernels(device: torch.device, hidden: int, repeats: int) -> list[dict[str, Any]]:
    from loraplex.server.engine.lora import LoraGroup
    from loraplex.server.engine.lora_ops import Segment, add_lora, plan_lora
    from loraplex.server.engine.triton_lora import LoraTiles, add_lora_triton

    dtype = torch.bfloat16 if CUDA else torch.float32  # the interpreter's bf16 dot is wrong
    outs = [hidden, hidden // 4, hidden // 4]
    slots_n = 32
    group = LoraGroup(hidden, outs, slots_n, RANK, dtype, device)
    generator = torch.Generator().manual_seed(0)
    for slot in range(slots_n):
        for member, out in enumerate(outs):
            a = torch.randn(RANK, hidden, generator=generator) / hidden**0.5
            group.set_slot(slot, member, a, torch.randn(out, RANK, generator=generator) * 0.02)
    ranks = [RANK] * slots_n
    rows = []
    for name, slots in (("64 decode tokens, 32 adapters", sorted(i % 32 for i in range(64))),
                        ("256-token prompt, 1 adapter", [3] * 256)):  # fmt: skip
        n = len(slots)
        x = torch.randn(n, hidden, device=device, dtype=dtype)
        y = [torch.zeros(n, out, device=device, dtype=dtype) for out in outs]
        prompt = len(set(slots)) == 1  # one adapter's prompt run, else decode tokens
        if prompt:
            plan = plan_lora([], [Segment(slots[0], 0, n)], ranks, device)
        else:
            plan = plan_lora(slots, [], ranks, device)
        tiles = LoraTiles(n, slots_n, device)
        tiles.update(slots, ranks)
        torch_ms = median_ms(lambda: add_lora(y, x, group, plan), repeats)  # noqa: B023
        triton_ms = median_ms(lambda: add_lora_triton(y, x, group, tiles), repeats)  # noqa: B023
        rows.append({"kernel": f"LoRA q/k/v, {name}", "torch_ms": torch_ms, "triton_ms": triton_ms})
    return rows


def attention_kernel(device: torch.device, shape: dict[str, int], seqs: int, length: int,
                     repeats: int) -> dict[str, Any]:  # fmt: skip
    from loraplex.server.engine.paged_attention import PagedQueries, paged_attention_reference
    from loraplex.server.engine.triton_attention import paged_attention_triton

    dtype = torch.bfloat16 if CUDA else torch.float32
    heads, kv_heads, d, block = shape["heads"], shape["kv_heads"], 128 if CUDA else 64, 16
    per_seq = -(-length // block)
    pool = (seqs * per_seq, block, kv_heads, d)
    keys = torch.randn(pool, device=device, dtype=dtype)
    values = torch.randn(pool, device=device, dtype=dtype)
    tables = torch.arange(seqs * per_seq, dtype=torch.int32, device=device).view(seqs, per_seq)
    queries = PagedQueries.build(list(range(seqs)), [length - 1] * seqs, heads // kv_heads, device)
    q = torch.randn(seqs, heads, d, device=device, dtype=dtype)
    scale = d**-0.5
    args = (q, keys, values, tables, queries, scale)
    return {
        "kernel": f"paged attention, {seqs} decode tokens x {length} keys",
        "torch_ms": median_ms(lambda: paged_attention_reference(*args), repeats),
        "triton_ms": median_ms(lambda: paged_attention_triton(*args), repeats),
    }


# -- 3. serving ----------------------------------------------------------------------------------
def random_nf4_llama(shape: dict[str, int], device: torch.device, home: Path) -> LoadedModel:
    """A random Llama with `shape`, its decoder's linear layers quantized to NF4 (double
    quantized, bf16 compute: as `loraplex serve` loads a model) one by one as they are made,
    so the full-precision model never exists."""
    import bitsandbytes as bnb
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from loraplex.core.model import embedded_model_dir

    tokenizer = AutoTokenizer.from_pretrained(embedded_model_dir(home))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden"],
        intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=8192,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    generator = torch.Generator(device=device).manual_seed(0)

    def randn(*size: int, std: float) -> torch.Tensor:
        return torch.randn(size, generator=generator, device=device, dtype=torch.bfloat16) * std

    for layer in model.model.layers:
        for parent, names in ((layer.self_attn, ("q_proj", "k_proj", "v_proj", "o_proj")),
                              (layer.mlp, ("gate_proj", "up_proj", "down_proj"))):  # fmt: skip
            for name in names:
                dense = getattr(parent, name)
                linear = bnb.nn.Linear4bit(
                    dense.in_features, dense.out_features, bias=False,
                    compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                    device="meta",
                )  # fmt: skip
                weight = randn(dense.out_features, dense.in_features, std=dense.in_features**-0.5)
                linear.weight = bnb.nn.Params4bit(
                    weight, requires_grad=False, compress_statistics=True, quant_type="nf4"
                ).to(device)
                setattr(parent, name, linear)
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight = torch.nn.Parameter(torch.ones(shape["hidden"], device=device,
                                                        dtype=torch.bfloat16))  # fmt: skip
    inner = model.model
    inner.embed_tokens.weight = torch.nn.Parameter(randn(len(tokenizer), shape["hidden"], std=0.02))
    inner.norm.weight = torch.nn.Parameter(
        torch.ones(shape["hidden"], device=device, dtype=torch.bfloat16)
    )
    model.lm_head.weight = torch.nn.Parameter(randn(len(tokenizer), shape["hidden"], std=0.02))
    inner.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    model.eval()
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id="random-llama-3-8b-shaped",
        device=device,
        dtype=torch.bfloat16,
        quantization="bnb-nf4-double-quant",
        fingerprint="random-llama-3-8b-shaped",
    )


class RandomModelBench(EngineBench):
    """EngineBench over a random model built in place instead of the embedded one."""

    def __init__(self, config: EngineConfig, home: Path, work: Path,
                 make: Callable[[], LoadedModel]) -> None:  # fmt: skip
        self._make = make
        super().__init__(config, home, work)

    def _make_runner(self) -> Any:
        from loraplex.server.engine.model_runner import ModelRunner

        return ModelRunner.from_config(self._make(), self.config)


def random_adapters(shapes: dict[str, tuple[int, int]], k: int) -> list[Job]:
    """k random r16 all-linear adapters (weights and versions, nothing on disk)."""
    generator = torch.Generator().manual_seed(1)
    jobs = []
    for i in range(k):
        modules = {
            name: (
                torch.randn(RANK, d_in, generator=generator) / d_in**0.5,
                torch.randn(d_out, RANK, generator=generator) * 0.01,
            )
            for name, (d_in, d_out) in shapes.items()
        }
        targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in modules}))
        weights = AdapterWeights(modules, RANK, 2.0 * RANK, targets)
        version = AdapterVersion(
            adapter_id=f"gpu-{i}", version=1, digest=f"random:{i}", rank=RANK,
            lora_alpha=2.0 * RANK, target_modules=targets, size_bytes=weights.nbytes,
            created_at="", source="benchmark", base_model_fingerprint="",
        )  # fmt: skip
        jobs.append(Job([], version, weights))
    return jobs


@dataclass
class ServeRow:
    kernels: str
    batch: int
    adapters: int
    tokens_per_s: float
    ttft_ms: float


def serve(args: Any, device: torch.device, shape: dict[str, int], kernels: str,
          work: Path, graphs: bool = False) -> list[ServeRow]:  # fmt: skip
    batches = [int(b) for b in args.batches.split(",")]
    counts = [int(k) for k in args.adapters.split(",")]
    length = PROMPT_TOKENS + args.new_tokens
    config = EngineConfig(
        max_batch_size=max(batches),
        max_loras=max(max(counts), 1) + 1,
        max_lora_rank=RANK,
        max_model_len=length,
        kv_cache_bytes=(max(batches) + 1) * length * kv_bytes_per_token(shape),
        kernels=kernels,
        prefix_cache=False,
        cuda_graphs=graphs,
    )
    label = kernels + ("+graphs" if graphs else "")
    home = Path(args.home)
    bench = RandomModelBench(config, home, work, lambda: random_nf4_llama(shape, device, home))
    rows = []
    with bench:
        info = bench.start()
        adapters = random_adapters(dict(info.target_shapes), max(counts))
        generator = torch.Generator().manual_seed(2)
        vocab = 49152

        def prompt() -> list[int]:
            return torch.randint(100, vocab - 100, (PROMPT_TOKENS,), generator=generator).tolist()

        bench.run([Job(prompt())], 2)  # warm-up: kernels built, buffers grown
        for k in counts:
            for batch in batches:
                jobs = [
                    Job(prompt(), adapters[i % k].adapter, adapters[i % k].weights) if k else
                    Job(prompt())
                    for i in range(batch)
                ]  # fmt: skip
                bench.run(jobs[:1], 1)  # adapters loaded into their slots first
                bench.run(jobs, 1)
                first, _ = bench.run(jobs, 1)  # time to every request's first token
                seconds, outputs = bench.run(jobs, args.new_tokens)
                tokens = sum(len(o) for o in outputs)
                rows.append(ServeRow(label, batch, k, tokens / seconds, first * 1e3))
                log.info("%s: batch %d, %d adapters: %.1f tok/s, TTFT %.0f ms", label, batch,
                         k, tokens / seconds, first * 1e3)  # fmt: skip
    return rows


# -- 4. vLLM beside it ----------------------------------------------------------------------------
def save_for_vllm(loaded: LoadedModel, adapters: list[Job], out: Path) -> tuple[Path, list[str]]:
    """The random model as an HF checkpoint vLLM loads (its NF4 weights dequantized to bf16:
    the same function in vLLM's fastest configuration) and the adapters as PEFT directories;
    returns the model directory and the adapters' names."""
    import json

    import bitsandbytes.functional as bnbf
    from safetensors.torch import save_file

    model = loaded.model
    model_dir = out / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    shard: dict[str, torch.Tensor] = {}
    index: dict[str, str] = {}
    count = 0

    def flush() -> None:
        nonlocal shard, count
        if shard:
            name = f"model-{count:05d}.safetensors"
            save_file(shard, str(model_dir / name))
            index.update(dict.fromkeys(shard, name))
            shard, count = {}, count + 1

    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor):  # the model, its containers, the rotary
            continue
        if hasattr(weight, "quant_state") and weight.quant_state is not None:
            dense = bnbf.dequantize_4bit(weight.data, weight.quant_state).to(torch.bfloat16)
        else:
            dense = weight.detach().to(torch.bfloat16)
        shard[f"{name}.weight"] = dense.cpu().contiguous()
        if sum(t.numel() for t in shard.values()) * 2 > 2 << 30:  # 2 GiB shards
            flush()
    flush()
    (model_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index})
    )
    model.config.torch_dtype = "bfloat16"
    model.config.architectures = ["LlamaForCausalLM"]  # what vLLM reads to pick the model
    model.config.save_pretrained(model_dir)
    loaded.tokenizer.save_pretrained(model_dir)
    names = []
    for job in adapters:
        assert job.adapter is not None and job.weights is not None
        name = job.adapter.adapter_id
        adapter_dir = out / "adapters" / name
        adapter_dir.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for module, (a, b) in job.weights.modules.items():
            # the weights' B is scaled (alpha / r) already: alpha = r keeps PEFT's scale at 1
            tensors[f"base_model.model.{module}.lora_A.weight"] = a.to(torch.bfloat16)
            tensors[f"base_model.model.{module}.lora_B.weight"] = b.to(torch.bfloat16)
        save_file(tensors, str(adapter_dir / "adapter_model.safetensors"))
        (adapter_dir / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": RANK,
            "target_modules": sorted(job.weights.target_modules), "bias": "none",
            "base_model_name_or_path": str(model_dir),
        }))  # fmt: skip
        names.append(name)
    return model_dir, names


def vllm_serve(args: Any, model_dir: Path, names: list[str], work: Path,
               prompts: list[list[int]]) -> list[ServeRow]:  # fmt: skip
    """vLLM's OpenAI server on the GPU (--enable-lora, the largest K of --adapters), the same
    batches and adapters as loraplex's rows: output tokens/s, and the last first token of a
    batch (streamed) as TTFT."""
    import json
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    batches = [int(b) for b in args.batches.split(",")]
    counts = [int(k) for k in args.adapters.split(",")]
    port = 8124
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir)]
    argv += ["--served-model-name", "base", "--dtype", "bfloat16", "--port", str(port)]
    argv += ["--max-model-len", str(PROMPT_TOKENS + args.new_tokens + 16)]
    argv += ["--max-num-seqs", str(max(batches)), "--host", "127.0.0.1"]
    argv += ["--no-enable-prefix-caching"]  # the bursts repeat prompts; loraplex's cache is off
    free, total = torch.cuda.mem_get_info()
    share = min(0.9, free / total - 0.02)  # what this process leaves (its context among it)
    log.info("vLLM gets %.2f of the GPU (%.1f of %.1f GiB free)", share, free / 2**30,
             total / 2**30)  # fmt: skip
    argv += ["--gpu-memory-utilization", f"{share:.2f}"]
    if max(counts):
        argv += ["--enable-lora", "--max-loras", str(max(counts)), "--max-lora-rank", str(RANK)]
        argv += ["--lora-modules", *(f"{n}={work / 'adapters' / n}" for n in names)]
    with open(work / "vllm.log", "wb") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )  # its own process group: its engine's process goes with it
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"vLLM exited:\n{(work / 'vllm.log').read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("vLLM did not start in 5 minutes") from None
                time.sleep(2)

        def one(prompt: list[int], model: str, start: float) -> tuple[int, float]:
            body = {"model": model, "prompt": prompt, "max_tokens": args.new_tokens,
                    "temperature": 0.0, "ignore_eos": True, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/completions", data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )  # fmt: skip
            first, tokens = 0.0, 0
            chunks = 0
            with urllib.request.urlopen(request, timeout=180) as reply:
                for line in reply:
                    data = line.decode().strip().removeprefix("data: ")
                    if not data or data == "[DONE]":
                        continue
                    chunk = json.loads(data)
                    if chunk.get("choices"):
                        chunks += 1
                        first = first or time.perf_counter() - start
                    tokens = (chunk.get("usage") or {}).get("completion_tokens", tokens)
            return tokens or chunks, first  # without a usage chunk: one token a chunk

        def burst(batch: int, k: int) -> tuple[float, float]:
            models = [names[i % k] if k else "base" for i in range(batch)]
            start = time.perf_counter()
            with ThreadPoolExecutor(batch) as pool:
                done = list(pool.map(lambda i: one(prompts[i], models[i], start), range(batch)))
            seconds = time.perf_counter() - start
            return sum(t for t, _ in done) / seconds, max(f for _, f in done) * 1e3

        rows = []
        burst(1, 0)  # warm-up
        for k in counts:
            for batch in batches:
                burst(batch, k)  # adapters loaded, graphs captured for this size
                tokens_per_s, ttft = burst(batch, k)
                rows.append(ServeRow("vLLM bf16", batch, k, tokens_per_s, ttft))
                log.info("vLLM: batch %d, %d adapters: %.1f tok/s, TTFT %.0f ms", batch, k,
                         tokens_per_s, ttft)  # fmt: skip
        return rows
    finally:
        os.killpg(proc.pid, 15)  # SIGTERM to the group
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)


def kv_bytes_per_token(shape: dict[str, int]) -> int:
    head_dim = shape["hidden"] // shape["heads"]
    return 2 * shape["layers"] * shape["kv_heads"] * head_dim * 2  # keys and values, bf16


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--batches", default="1,8,32,64")
    parser.add_argument("--adapters", default="0,8,32")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--keep-work", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true", help="no vLLM rows")
    parser.add_argument(
        "--vllm-only", action="store_true", help="vLLM's rows alone (a second command)"
    )
    add_common_args(parser, "gpu")
    args = parser.parse_args()
    setup_logging()
    device = torch.device("cuda" if CUDA else "cpu")
    shape = LLAMA3_8B if CUDA else SMOKE
    if not CUDA:
        log.warning("no CUDA: a smoke run (Triton's interpreter, a 2-layer model): no figures")
        args.batches, args.adapters, args.new_tokens = "1,4", "0,2", 4
    report: dict[str, Any] = {"config": vars(args), "device": str(device), "shape": shape}
    lines = [f"on {torch.cuda.get_device_name() if CUDA else 'CPU (smoke run)'}"]
    if args.vllm_only:
        args.skip_tests = True
    if not args.skip_tests:
        report["tests"] = gpu_tests()
        lines.append(f"gpu tests: {report['tests']}")
    repeats = 20 if CUDA else 2
    kernels = [] if args.vllm_only else lora_kernels(device, shape["hidden"], repeats)
    if not args.vllm_only:
        kernels.append(attention_kernel(device, shape, 64 if CUDA else 4,
                                        1024 if CUDA else 64, repeats))  # fmt: skip
    report["kernels"] = kernels
    lines.append(f"{'kernel':<52} {'torch ms':>9} {'triton ms':>10} {'x':>6}")
    lines += [
        f"{k['kernel']:<52} {k['torch_ms']:>9.3f} {k['triton_ms']:>10.3f} "
        f"{k['torch_ms'] / k['triton_ms']:>6.2f}"
        for k in kernels
    ]
    rows: list[ServeRow] = []
    with work_dir("loraplex-gpu-", args.keep_work) as work:
        for backend in ("torch", "triton") if not args.vllm_only else ():
            rows += serve(args, device, shape, backend, work / backend)
        if CUDA and not args.vllm_only:  # decode steps replayed as CUDA graphs
            rows += serve(args, device, shape, "triton", work / "graphs", graphs=True)
    report["serving"] = [vars(r) for r in rows]
    lines.append(f"{'kernels':>14} {'batch':>6} {'adapters':>9} {'tok/s':>9} {'last TTFT ms':>13}")
    lines += [
        f"{r.kernels:>14} {r.batch:>6} {r.adapters:>9} {r.tokens_per_s:>9.1f} {r.ttft_ms:>13.0f}"
        for r in rows
    ]
    vllm = importlib.util.find_spec("vllm") is not None
    report["vllm"] = "not installed" if not vllm else "no CUDA: not run"
    if args.skip_vllm:
        report["vllm"] = "skipped (--skip-vllm)"
    if vllm and CUDA and not args.skip_vllm:
        publish(report, lines, args.out)  # loraplex's rows kept, whatever vLLM does
        try:
            vllm_rows = run_vllm(args, shape, device)
        except Exception as exc:  # reported, not raised: the rows above stand
            log.exception("vLLM failed")
            report["vllm"] = f"failed: {type(exc).__name__}: {exc}"[:2000]
            vllm_rows = []
        lines += vllm_lines(args, rows, vllm_rows)
        if vllm_rows:
            report["vllm"] = "bf16 weights (vLLM's fastest), --enable-lora, no prefix caching"
            report["serving"] += [vars(r) for r in vllm_rows]
    lines.append(f"vLLM: {report['vllm']}")
    publish(report, lines, args.out)
    return 0


def run_vllm(args: Any, shape: dict[str, int], device: torch.device) -> list[ServeRow]:
    """The model and adapters saved for vLLM (the model built again, then freed), and its
    rows."""
    from loraplex.core.model import lora_target_shapes

    with work_dir("loraplex-gpu-vllm-", args.keep_work) as work:
        loaded = random_nf4_llama(shape, device, Path(args.home))
        counts = [int(k) for k in args.adapters.split(",")]
        adapters = random_adapters(lora_target_shapes(loaded.model), max(counts))
        model_dir, names = save_for_vllm(loaded, adapters, work)
        del loaded, adapters
        gc.collect()  # the engines' cycles too: the GPU is vLLM's now
        torch.cuda.empty_cache()
        generator = torch.Generator().manual_seed(2)
        largest = max(int(b) for b in args.batches.split(","))
        prompts = [
            torch.randint(100, 49152 - 100, (PROMPT_TOKENS,), generator=generator).tolist()
            for _ in range(largest)
        ]
        return vllm_serve(args, model_dir, names, work, prompts)


def vllm_lines(args: Any, rows: list[ServeRow], vllm_rows: list[ServeRow]) -> list[str]:
    """vLLM's rows as the table shows them, and loraplex's ratio at the largest batch on
    the most adapters."""
    lines = [
        f"{r.kernels:>14} {r.batch:>6} {r.adapters:>9} {r.tokens_per_s:>9.1f} {r.ttft_ms:>13.0f}"
        for r in vllm_rows
    ]
    largest = max(int(b) for b in args.batches.split(","))
    most = max(int(k) for k in args.adapters.split(","))
    ours = {(r.kernels, r.batch, r.adapters): r.tokens_per_s for r in rows}
    for r in vllm_rows:
        if (r.batch, r.adapters) != (largest, most) or not r.tokens_per_s:
            continue
        for label in ("triton", "triton+graphs"):
            mine = ours.get((label, largest, most))
            if mine:
                lines.append(
                    f"loraplex {label} / vLLM, {most} adapters at batch {largest}: "
                    f"{mine / r.tokens_per_s:.2f}x"
                )
    return lines


if __name__ == "__main__":
    sys.exit(run_main(main))
