"""Ops one decode step issues, per layer: aten ops and Triton kernel launches, per backend.

What a GPU pays per op (a dispatch and a kernel launch) decides whether a step is bound by the
host, and a CUDA graph can capture a step only once it has no host syncs. This counts, for one
decode step of --batch rows spread over --adapters adapters (all-linear, rank --rank), the aten
ops that reach the dispatcher (TorchDispatchMode; a custom op such as bitsandbytes' 4-bit
matmul counts once) and the Triton launches, on the embedded model (NF4, its first --layers
layers) as each backend runs it:

    cpu          the engine on a CPU: loraplex's native kernels (every 4-bit layer on its
                 native kernel, not a measured choice), the step eager
    cpu program  the same with the decode step replayed as a captured program (the default)
    torch        torch's ops and bitsandbytes' 4-bit matmul (no native kernels) over the paged
                 KV cache: the CUDA path with --kernels torch
    triton       the same with the Triton LoRA and paged-attention kernels (--kernels triton;
                 here in Triton's interpreter, whose own tensor copies inside a launch are not
                 counted)

Counts, not times: the machine's load does not move them, but its measured compute dtype
does (`--dtype auto`).

    python benchmarks/op_count.py [--batch 8] [--adapters 4] [--layers 4]
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available():
    # Triton's interpreter, chosen before any kernel is imported (a CPU-only machine)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.utils._python_dispatch import TorchDispatchMode

from loraplex.core.model import LoadedModel
from loraplex.core.types import AdapterWeights
from loraplex.server.engine import cpu_kernels
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.model_runner import DecodeWork, ModelRunner, PrefillWork

from harness import add_common_args, make_parser, publish, run_main, setup_logging

log = logging.getLogger("benchmark")

PROMPT_TOKENS = 24


class _Launches(Counter[str]):
    """Triton launches by kernel, and whether one is running now (its interpreter's own
    tensor work is not the step's)."""

    running = 0


class _AtenCounter(TorchDispatchMode):
    """Every op that reaches the dispatcher outside a Triton launch, by name."""

    def __init__(self, launches: _Launches) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.launches = launches

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.launches.running:
            self.ops[str(func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _triton_launches() -> Iterator[_Launches]:
    """Triton kernel launches while inside, by kernel (the interpreter's or the GPU's)."""
    counts = _Launches()
    patched: list[tuple[type, Callable[..., Any]]] = []
    try:
        import triton.runtime.interpreter as interpreter
        import triton.runtime.jit as jit

        classes: list[type] = [jit.JITFunction, interpreter.InterpretedFunction]
    except ImportError:
        classes = []
    for cls in classes:
        original = cls.run  # type: ignore[attr-defined]

        def run(self: Any, *args: Any, __original: Any = original, **kwargs: Any) -> Any:
            counts[getattr(self, "__name__", type(self).__name__)] += 1
            counts.running += 1
            try:
                return __original(self, *args, **kwargs)
            finally:
                counts.running -= 1

        patched.append((cls, original))
        cls.run = run  # type: ignore[attr-defined]
    try:
        yield counts
    finally:
        for cls, original in patched:
            cls.run = original  # type: ignore[attr-defined]


@dataclass
class StepCount:
    path: str
    aten_ops: int
    launches: int
    layers: int
    top: list[tuple[str, int]]

    @property
    def per_layer(self) -> float:
        return (self.aten_ops + self.launches) / self.layers


def embedded_layers(home: str, layers: int) -> LoadedModel:
    """The embedded model (NF4) cut to its first `layers` decoder layers."""
    from loraplex.core.config import ModelConfig
    from loraplex.core.model import load_model

    loaded = load_model(ModelConfig(home=Path(home).expanduser()))
    inner = loaded.model.model
    inner.layers = inner.layers[:layers]
    loaded.model.config.num_hidden_layers = layers
    return loaded


def random_adapter(runner: ModelRunner, rank: int, seed: int) -> AdapterWeights:
    generator = torch.Generator().manual_seed(seed)
    modules = {
        name: (
            torch.randn(rank, d_in, generator=generator) / d_in**0.5,
            torch.randn(d_out, rank, generator=generator) * 0.02,
        )
        for name, (d_in, d_out) in runner.target_shapes.items()
    }
    targets = tuple(sorted({name.rsplit(".", 1)[-1] for name in modules}))
    return AdapterWeights(modules, rank, 2.0 * rank, targets)


def count_decode_step(
    loaded: LoadedModel, path: str, batch: int, adapters: int, rank: int
) -> StepCount:
    """Build the runner as `path` runs, prefill `batch` rows, run one decode step to warm up
    (programs captured, tile buffers grown), and count the next one."""
    native = path.startswith("cpu")
    kernels = "triton" if path == "triton" else "torch"
    load = cpu_kernels.load
    if not native:
        cpu_kernels.load = lambda directory=None: None  # type: ignore[assignment]
    try:
        runner = ModelRunner(
            loaded,
            num_slots=max(adapters, 1),
            max_rank=rank,
            max_rows=batch,
            compile=path == "cpu program",
            kernels=kernels,
            base_kernel="nf4" if native else "bitsandbytes",
            dense_cache_bytes=None if native else 0,
            kv_layout="rows" if native else "paged",  # the CUDA paths read blocks
        )
    finally:
        cpu_kernels.load = load
    for slot in range(adapters):
        runner.load_adapter(slot, random_adapter(runner, rank, seed=slot))
    slots = [i % adapters if adapters else NO_ADAPTER for i in range(batch)]
    rows = [runner.cache.allocate(PROMPT_TOKENS + 4) for _ in range(batch)]
    prompt = [(7 * i) % 4000 + 1 for i in range(PROMPT_TOKENS)]
    runner.step([], [PrefillWork(r, s, prompt, 0, True) for r, s in zip(rows, slots, strict=True)])

    def decodes(position: int) -> list[DecodeWork]:
        return [DecodeWork(r, s, 5, position) for r, s in zip(rows, slots, strict=True)]

    runner.step(decodes(PROMPT_TOKENS), [])
    with _triton_launches() as launches, _AtenCounter(launches) as aten:
        runner.step(decodes(PROMPT_TOKENS + 1), [])
    layers = len(runner.forward.layers)
    return StepCount(
        path, sum(aten.ops.values()), sum(launches.values()), layers, aten.ops.most_common(8)
    )


def main() -> int:
    parser = make_parser(__doc__)
    parser.add_argument("--batch", default="1,8", help="decode rows, comma-separated")
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--no-triton", action="store_true", help="skip the triton path")
    add_common_args(parser, "op_count")
    args = parser.parse_args()
    setup_logging()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    paths = ["cpu", "cpu program", "torch"] if device.type == "cpu" else ["torch"]
    if not args.no_triton:
        paths.append("triton")
    counts: list[tuple[int, StepCount]] = []
    for batch in (int(b) for b in args.batch.split(",")):
        for path in paths:
            loaded = embedded_layers(args.home, args.layers)  # fresh: a runner changes it
            count = count_decode_step(loaded, path, batch, args.adapters, args.rank)
            log.info("%d rows, %s: %d aten ops, %d launches; most: %s", batch, path,
                     count.aten_ops, count.launches, count.top)  # fmt: skip
            counts.append((batch, count))
    header = f"{'rows':>5} {'path':>12} {'aten ops':>9} {'launches':>9} {'per layer':>10}"
    lines = [
        f"one decode step over {args.adapters} adapters (r{args.rank}, all-linear), the "
        f"embedded model's first {args.layers} layers, on {device.type}",
        header,
        *(
            f"{b:>5} {c.path:>12} {c.aten_ops:>9} {c.launches:>9} {c.per_layer:>10.1f}"
            for b, c in counts
        ),
    ]
    report = {
        "config": vars(args),
        "rows": [
            {
                "rows": b,
                "path": c.path,
                "aten_ops": c.aten_ops,
                "launches": c.launches,
                "layers": c.layers,
                "per_layer": c.per_layer,
                "most_common": c.top,
            }
            for b, c in counts
        ],
    }
    publish(report, lines, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
