"""The base model's linear layers: one 4-bit weight, several ways to multiply by it, and the
fastest chosen per layer shape and batch size by measuring them on this machine.

    bitsandbytes  the 4-bit module itself: on a CPU with AVX512-BF16 a packed kernel, fast for
                  a few rows; elsewhere it dequantizes the whole weight at every call
    lut           dequantize by table lookup, then one matmul: two bytes of NF4 codes index a
                  65536 x 4 table, and the double-quantized block scales are expanded to float32
                  once at load (about 4x cheaper than bitsandbytes' scalar fallback on AVX2)
    nf4           loraplex's native kernel (cpu_kernels.py): multiplies straight from the codes
                  and those scales, a quarter of a bf16 copy's bytes; the fastest for a few rows,
                  where a step is bound by memory (CPUs, with a C compiler at first start)
    dense         a dense copy of the weight in the compute dtype, kept in memory: the fastest
                  wherever memory allows, a cache under `--dense-cache-mb`, never the only copy
    packed        the dense copy in oneDNN's blocked layout, reordered once at load (a CPU
                  matmul otherwise re-blocks the weight at every call: up to 2x faster for a
                  few rows, about 1.15x at 64); CPUs with oneDNN, bf16 or float32

The 4-bit weights stay what is loaded, merged from (`weight`) and exported. `--base-kernel auto`
measures each per (in, out) shape at a few row counts (ROW_BUCKETS), with the weights out of
the CPU's caches when the model's layers do not fit in them (as in a step, which reads each
weight once), caches the times per machine (core/machine.py), and gives a copy (dense or
packed, whichever is faster for the shape) to the layers whose shape gains the most per byte
until the budget is spent; the rest take their fastest other path.
"""

from __future__ import annotations

import bisect
import copy
import functools
import itertools
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_blockwise, get_4bit_type
from torch import nn

from loraplex.core.machine import (
    TuningCache,
    last_level_cache_bytes,
    machine_key,
    median_seconds,
)
from loraplex.core.types import KernelChoice
from loraplex.server.engine import cpu_kernels
from loraplex.server.engine.cpu_kernels import CpuKernels

log = logging.getLogger(__name__)

KERNELS = ("bitsandbytes", "lut", "nf4", "dense", "packed")
COPIES = ("dense", "packed")  # the kernels that keep a copy of the weight (under the budget)
KERNEL_CHOICES = ("auto", *KERNELS)
PACK_ROWS = 64  # the row count oneDNN blocks a packed weight for (any count runs)
ROW_BUCKETS = (1, 4, 8, 32, 128, 512)  # rows measured; a call uses the nearest (log scale)
MAX_PROBES = 64  # most weights of one shape a measurement cycles through (to keep them cold)
_BOUNDS = [math.sqrt(a * b) for a, b in itertools.pairwise(ROW_BUCKETS)]


def packing_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN can hold a weight packed here: a CPU build with it, bf16 or float32, and
    a small packed matmul that runs and is right on this CPU."""
    if device.type != "cpu" or dtype not in (torch.bfloat16, torch.float32):
        return False
    return _packing_works(dtype)


@functools.cache
def _packing_works(dtype: torch.dtype) -> bool:
    if not (
        torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    ):
        return False
    generator = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=generator).to(dtype)
    x = torch.randn(3, 64, generator=generator).to(dtype)
    try:
        with torch.inference_mode():
            got = packed_linear(x, pack(w), None).float()
    except RuntimeError as exc:
        log.info("no packed weights: oneDNN refused (%s)", exc)
        return False
    want = x.float() @ w.float().T
    return bool((got - want).abs().max() <= 2e-2 * want.abs().max())


def pack(weight: torch.Tensor) -> torch.Tensor:
    """A dense (out, in) weight in oneDNN's blocked layout, for `packed_linear`."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, PACK_ROWS)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (N, in) @ W.T (+ bias) with W packed by `pack`."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def bucket(rows: int) -> int:
    """The index in ROW_BUCKETS nearest to `rows` on a log scale."""
    return bisect.bisect_left(_BOUNDS, rows)


class DenseLinear:
    """A linear layer held as a dense weight (out, in) in the compute dtype, or packed by
    `pack`: an unquantized layer, or a base layer with an adapter merged in."""

    __slots__ = ("bias", "packed", "weight")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, packed: bool) -> None:
        self.weight = pack(weight) if packed else weight
        self.bias = bias
        self.packed = packed

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return packed_linear(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


@dataclass(frozen=True)
class _Tables:
    """The NF4 lookup table, by two packed bytes: entry v holds the 4 weights of the little-
    endian uint16 v (high nibble first in each byte, as bitsandbytes packs)."""

    quad: torch.Tensor  # (65536, 4) float32

    @classmethod
    def build(cls, device: torch.device) -> _Tables:
        table = get_4bit_type("nf4", device="cpu").float()
        v = torch.arange(1 << 16)
        lo, hi = v & 0xFF, v >> 8
        quad = torch.stack([table[lo >> 4], table[lo & 15], table[hi >> 4], table[hi & 15]], 1)
        return cls(quad.contiguous().to(device))


class Nf4Weight:
    """A bitsandbytes NF4 weight in its standard layout, taken before any forward (the CPU
    kernel repacks it in place), with its block scales expanded to float32 once."""

    def __init__(self, module: nn.Module, tables: _Tables) -> None:
        weight: Any = module.weight
        state: Any = weight.quant_state
        if state.quant_type != "nf4" or (state.blocksize % 4) or math.prod(state.shape) % 4:
            raise ValueError(f"unsupported 4-bit layout: {state.quant_type}, {state.blocksize}")
        self.shape = tuple(state.shape)  # (out, in)
        self.blocksize = int(state.blocksize)
        data = weight.data.contiguous().view(torch.uint8).reshape(-1).clone()
        self.codes = data.view(torch.int16)  # two bytes (four weights) per entry
        absmax = state.absmax
        if state.nested:
            absmax = dequantize_blockwise(absmax, state.state2) + state.offset
        self.absmax = absmax.float().reshape(-1, 1)  # (blocks, 1)
        self.tables = tables

    @property
    def nbytes(self) -> int:
        return self.codes.numel() * 2 + self.absmax.numel() * 4

    @classmethod
    def fuse(cls, parts: list[Nf4Weight]) -> Nf4Weight | None:
        """One weight (sum of outs, in) of layers that share their input, its codes and scales
        the parts' one after the other; each part then reads its own rows of them (views: the
        4-bit bytes are held once). None where the parts' blocks would straddle two of them
        (a part whose size is not a whole number of blocks) or their inputs differ."""
        first = parts[0]
        if any(
            p.shape[1] != first.shape[1]
            or p.blocksize != first.blocksize
            or math.prod(p.shape) % p.blocksize
            for p in parts
        ):
            return None
        fused = copy.copy(first)
        fused.shape = (sum(p.shape[0] for p in parts), first.shape[1])
        fused.codes = torch.cat([p.codes for p in parts])
        fused.absmax = torch.cat([p.absmax for p in parts])
        codes_at = blocks_at = 0
        for p in parts:
            n_codes, n_blocks = p.codes.numel(), p.absmax.shape[0]
            p.codes = fused.codes[codes_at : codes_at + n_codes]
            p.absmax = fused.absmax[blocks_at : blocks_at + n_blocks]
            codes_at, blocks_at = codes_at + n_codes, blocks_at + n_blocks
        return fused

    def clone(self) -> Nf4Weight:
        """The same weight in memory of its own."""
        twin = copy.copy(self)
        twin.codes, twin.absmax = self.codes.clone(), self.absmax.clone()
        return twin

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in), exactly as bitsandbytes dequantizes it (float32 products,
        rounded once to `dtype`)."""
        index = self.codes.to(torch.int32).bitwise_and_(0xFFFF)
        values = F.embedding(index, self.tables.quad).view(-1, self.blocksize)
        return values.mul_(self.absmax).view(self.shape).to(dtype)


Unit = nn.Module | tuple[nn.Module, ...]  # a layer, or layers fused over one input


def _width(module: Any) -> int:
    """A linear layer's output features."""
    return int(module.out_features)


def _bias(modules: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """The fused bias of layers (zeros for a layer without one), or None when none has one."""
    biases = [getattr(m, "bias", None) for m in modules]
    if all(b is None for b in biases):
        return None
    ref = next(b for b in biases if b is not None)
    pairs = zip(biases, modules, strict=True)
    return torch.cat([b if b is not None else ref.new_zeros(_width(m)) for b, m in pairs])


class _Layer:
    """One 4-bit linear layer, or several fused over one input (their outputs side by side:
    q/k/v, gate/up), and the kernel to use per row bucket."""

    __slots__ = ("_run", "bias", "choice", "copy", "dense", "modules", "native", "nf4")

    def __init__(
        self, modules: tuple[nn.Module, ...], nf4: Nf4Weight, native: CpuKernels | None
    ) -> None:
        self.modules = modules
        self.bias = _bias(modules)
        self.nf4 = nf4
        takes = native is not None and native.supports(nf4.shape, nf4.blocksize)
        self.native = native if takes else None
        self.dense: torch.Tensor | None = None  # the copy: plain (out, in), or packed
        self.copy: str | None = None  # which of COPIES `dense` is
        self.choice: tuple[str, ...] = ("bitsandbytes",) * len(ROW_BUCKETS)
        self._run: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = ()
        self.set_choice(self.choice)

    def hold_copy(self, copy: str, dtype: torch.dtype) -> int:
        """Keep a copy of the weight (one of COPIES) in `dtype`; returns its bytes."""
        dense = self.nf4.dequantize(dtype)
        self.dense, self.copy = (pack(dense) if copy == "packed" else dense), copy
        return dense.numel() * dense.element_size()

    def set_choice(self, choice: tuple[str, ...]) -> None:
        self.choice = choice
        self._run = tuple(self._kernel(k) for k in choice)

    def _kernel(self, kernel: str) -> Callable[[torch.Tensor], torch.Tensor]:
        modules, bias, dense = self.modules, self.bias, self.dense
        if kernel == "bitsandbytes":  # the 4-bit modules themselves
            if len(modules) == 1:
                return modules[0]
            return lambda x: torch.cat([m(x) for m in modules], dim=-1)
        if kernel == "lut":
            return lambda x: F.linear(x, self.nf4.dequantize(x.dtype), bias)
        if kernel == "nf4":
            return self._native(bias)
        if dense is None or kernel != self.copy:
            raise ValueError(
                f"the {kernel} kernel needs a {kernel} copy (the layer has {self.copy})"
            )
        if kernel == "packed":
            return lambda x: packed_linear(x, dense, bias)
        return lambda x: F.linear(x, dense, bias)

    def offers(self, kernel: str) -> bool:
        """Whether `kernel` can run this layer (given a copy where it needs one)."""
        return kernel != "nf4" or self.native is not None

    def _native(self, bias: torch.Tensor | None) -> Callable[[torch.Tensor], torch.Tensor]:
        native, nf4 = self.native, self.nf4
        if native is None:
            raise ValueError(f"the nf4 kernel does not take this layer ({nf4.shape})")
        run = native.nf4_layer(nf4.codes, nf4.absmax, nf4.shape, nf4.blocksize)
        return run if bias is None else (lambda x: run(x).add_(bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._run[bucket(x.shape[0])](x)


def _call_next(calls: Iterator[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> None:
    next(calls)(x)


class BaseLinears:
    """The model's 4-bit linear layers with their chosen kernels; a layer that is not 4-bit
    (an unquantized model, the LM head) runs as it is.

    `fuse` names groups of layers that read one input (a decoder layer's q/k/v, its gate/up):
    each 4-bit group becomes one layer at load, its codes and scales side by side (held once:
    each member's weight is a view of its rows), so a step makes one call, and one copy, for
    the group; the 4-bit format is unchanged."""

    def __init__(
        self,
        model: nn.Module,
        dtype: torch.dtype,
        device: torch.device,
        kernel: str = "auto",
        dense_budget_bytes: int = 0,
        cache: TuningCache | None = None,
        fuse: Sequence[tuple[nn.Module, ...]] = (),
    ) -> None:
        if kernel not in KERNEL_CHOICES:
            raise ValueError(f"base kernel must be one of {', '.join(KERNEL_CHOICES)}")
        self.dtype, self.device = dtype, device
        states = {
            module: state
            for module in model.modules()
            if (state := getattr(getattr(module, "weight", None), "quant_state", None)) is not None
            and not getattr(state, "packing_format_for_cpu", False)
        }
        native = None
        if device.type == "cpu" and dtype in cpu_kernels.DTYPES:
            native = cpu_kernels.load(cache.build_dir if cache is not None else None)
        self.kernels = tuple(
            k
            for k in KERNELS
            if (k != "packed" or packing_available(device, dtype))
            and (k != "nf4" or native is not None)
        )
        if kernel != "auto" and kernel not in self.kernels:
            raise ValueError(f"base kernel {kernel} is not available on {device} in {dtype}")
        self.native = native  # the native kernel, where it is built (also serves LoRA)
        # every 4-bit layer's own weight (a view of its rows of a fused one)
        self.weights: dict[nn.Module, Nf4Weight] = {}
        self.layers: dict[Unit, _Layer] = {}  # what runs: layers, and fused groups of them
        if states:
            tables = _Tables.build(next(iter(states.values())).absmax.device)
            self.weights = {module: Nf4Weight(module, tables) for module in states}
            self._fuse(fuse, native)
        # the unit each 4-bit layer runs in, and its first output column there
        self.unit_of: dict[nn.Module, tuple[Unit, int]] = {}
        for unit in self.layers:
            at = 0
            for member in unit if isinstance(unit, tuple) else (unit,):
                self.unit_of[member] = (unit, at)
                at += _width(member)
        self.dense_bytes = 0
        self.dense_budget = dense_budget_bytes  # copies of the 4-bit layers and the LM head
        self.head_packed = False  # the LM head held packed (`head`)
        self.reason = "no 4-bit layers"
        if not self.layers:
            return
        if kernel == "auto":
            times = self._measure(cache)
            self._assign(times, dense_budget_bytes)
            self.reason = f"measured on {machine_key(device)}"
        else:
            for layer in self.layers.values():
                if kernel in COPIES:
                    self._give_copy(layer, kernel)
                # a layer the native kernel does not take (its block size) dequantizes instead
                fixed = kernel if layer.offers(kernel) else "lut"
                layer.set_choice((fixed,) * len(ROW_BUCKETS))
            self.reason = f"--base-kernel {kernel}"

    def _fuse(self, groups: Sequence[tuple[nn.Module, ...]], native: CpuKernels | None) -> None:
        """One layer per group whose members are all 4-bit with blocks that fit (the rest,
        and every layer in no group, on their own)."""
        fused: set[nn.Module] = set()
        for group in groups:
            if len(group) < 2 or any(m not in self.weights or m in fused for m in group):
                continue
            weight = Nf4Weight.fuse([self.weights[m] for m in group])
            if weight is not None:
                self.layers[tuple(group)] = _Layer(tuple(group), weight, native)
                fused.update(group)
        for module, weight in self.weights.items():
            if module not in fused:
                self.layers[module] = _Layer((module,), weight, native)

    def __call__(self, unit: Unit, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(unit)(x)

    def nf4_weight(self, unit: Unit, rows: int) -> Nf4Weight | None:
        """The 4-bit weight of a layer or fused group where a call of `rows` rows runs the
        native kernel on it (its measured choice there, no bias), else None."""
        layer = self.layers.get(unit)
        if layer is None or layer.native is None or layer.bias is not None:
            return None
        return layer.nf4 if layer.choice[bucket(rows)] == "nf4" else None

    def kernel(self, unit: Unit) -> Callable[[torch.Tensor], torch.Tensor]:
        """What multiplies by a layer's weight, or a group's side by side: its 4-bit layer
        with the chosen kernels (fused at load where the group could be); a group that is not
        one layer, each member's kernel with the outputs joined; a layer that is not 4-bit (an
        unquantized model), the module itself."""
        layer = self.layers.get(unit)
        if layer is not None:
            return layer
        if isinstance(unit, tuple):
            kernels = [self.kernel(m) for m in unit]
            return lambda x: torch.cat([k(x) for k in kernels], dim=-1)
        return unit

    def head(self, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """What multiplies by the LM head: a 4-bit head as the other 4-bit layers; a dense
        one packed in oneDNN's layout where packing works here and the dense budget has room
        after the layers' copies (a copy beside the weight, which stays the embedding's when
        tied: 2x faster for one row, 1.2x at 64 in bf16, 3x and 1.7x in float32 on AVX2),
        else the module itself."""
        weight = getattr(module, "weight", None)
        if module in self.layers or not isinstance(module, nn.Linear) or weight is None:
            return self.kernel(module)
        size = weight.numel() * weight.element_size()
        if weight.dtype != self.dtype or not packing_available(self.device, self.dtype):
            return module
        if self.dense_bytes + size > self.dense_budget:
            return module
        self.dense_bytes += size
        self.head_packed = True
        return DenseLinear(weight.detach(), module.bias, packed=True)

    def merge_room(self) -> int:
        """Bytes of the dense budget a merge's copies may take: what the base's own copies
        leave (a merge replaces the one served, whose copies are dropped before it is made)."""
        return max(0, self.dense_budget - self.dense_bytes)

    def merged(self, unit: Unit, weight: torch.Tensor) -> DenseLinear:
        """A dense copy of a layer or group with an adapter merged in (`weight`, in the
        compute dtype, the members' rows side by side), packed like the unit's own copy:
        merged serving keeps the layer's speed."""
        layer = self.layers.get(unit)
        if layer is not None:
            return DenseLinear(weight, layer.bias, packed=layer.copy == "packed")
        return DenseLinear(weight, _bias(unit if isinstance(unit, tuple) else (unit,)), False)

    def weight(self, module: nn.Module) -> torch.Tensor | None:
        """A 4-bit layer's weight (out, in) dequantized in the compute dtype (its rows of a
        dense copy where its unit holds one; None: not 4-bit)."""
        found = self.unit_of.get(module)
        if found is None:
            return None
        unit, at = found
        layer = self.layers[unit]
        if layer.copy == "dense" and layer.dense is not None:
            return layer.dense[at : at + _width(module)]
        return self.weights[module].dequantize(self.dtype)

    def copies_serve(self, rows: int) -> bool:
        """Whether most of the 4-bit weights (by size) run no faster than a dense copy at
        this many rows: true unless the native kernel, which reads the codes, serves them."""
        b, native, total = bucket(rows), 0, 0
        for layer in self.layers.values():
            size = math.prod(layer.nf4.shape)
            total += size
            native += size if layer.choice[b] == "nf4" else 0
        return 2 * native <= total

    def choices(self) -> list[KernelChoice]:
        """Per shape, the kernel from each row count up (runs of one kernel joined)."""
        groups: dict[tuple[tuple[int, int], tuple[str, ...]], int] = {}
        for layer in self.layers.values():
            out, fan_in = layer.nf4.shape
            key = ((fan_in, out), layer.choice)
            groups[key] = groups.get(key, 0) + 1
        result = []
        for (shape, choice), count in sorted(groups.items()):
            for i, kernel in enumerate(choice):
                if i == 0 or choice[i - 1] != kernel:
                    result.append(KernelChoice(shape, ROW_BUCKETS[i], kernel, count))
        return result

    def describe(self) -> str:
        parts = [
            f"{c.shape[0]}x{c.shape[1]} x{c.layers} from {c.min_rows} rows: {c.kernel}"
            for c in self.choices()
        ]
        dense = f"dense copies {self.dense_bytes / 2**20:.0f} MiB"
        if self.head_packed:
            dense += ", the LM head's packed"
        return f"{'; '.join(parts)} ({dense}; {self.reason})"

    def _give_copy(self, layer: _Layer, copy: str) -> None:
        self.dense_bytes += layer.hold_copy(copy, self.dtype)

    def _measure(self, cache: TuningCache | None) -> dict[tuple[int, int], list[dict[str, float]]]:
        """Seconds per call of each kernel at each row bucket, per (out, in) shape (or read
        from the cache). A step reads each weight once, so when the model's layers in the
        compute dtype do not fit in the CPU's last-level cache, each timed call reads a weight
        the last calls did not touch: the kernel runs in turn over enough layers of the shape
        (distinct copies where a kernel needs one) to fill twice that cache. Timed on one
        layer in a loop, a weight stays cached and a kernel that reads four times the bytes
        looks as fast as one that reads a quarter."""
        by_shape: dict[tuple[int, int], list[_Layer]] = {}
        for layer in self.layers.values():
            by_shape.setdefault(layer.nf4.shape, []).append(layer)
        element = torch.empty((), dtype=self.dtype).element_size()
        model_bytes = sum(math.prod(layer.nf4.shape) * element for layer in self.layers.values())
        llc = last_level_cache_bytes()
        cold = self.device.type == "cpu" and model_bytes > llc
        key = {
            "machine": machine_key(self.device),
            "dtype": str(self.dtype),
            "shapes": sorted(by_shape),
            "buckets": list(ROW_BUCKETS),
            "kernels": list(self.kernels),
            "cold": cold,
        }
        saved = cache.get("kernels", key) if cache is not None else None
        if saved is not None:
            return {tuple(s): t for s, t in saved}  # type: ignore[misc]
        times: dict[tuple[int, int], list[dict[str, float]]] = {}
        for shape, layers in by_shape.items():
            count = min(MAX_PROBES, -(-2 * llc // (math.prod(shape) * element))) if cold else 1
            chosen = [layers[i % len(layers)] for i in range(count)]
            probes: dict[str | None, list[_Layer]] = {}
            for kind in (None, *(k for k in COPIES if k in self.kernels)):
                probes[kind] = []
                for i, layer in enumerate(chosen):
                    # a layer seen again (fewer layers than probes) gets its own codes
                    nf4 = layer.nf4 if i < len(layers) else layer.nf4.clone()
                    probe = _Layer(layer.modules, nf4, layer.native)
                    if kind is not None:
                        probe.hold_copy(kind, self.dtype)
                    probes[kind].append(probe)
            offered = [k for k in self.kernels if layers[0].offers(k)]
            generator = torch.Generator().manual_seed(0)
            rows_times = []
            for rows in ROW_BUCKETS:
                x = torch.randn(rows, shape[1], generator=generator).to(self.device, self.dtype)
                measured = {}
                for kernel in offered:
                    calls = itertools.cycle(
                        [p._kernel(kernel) for p in probes[kernel if kernel in COPIES else None]]
                    )
                    with torch.inference_mode():
                        measured[kernel] = median_seconds(
                            functools.partial(_call_next, calls, x), self.device
                        )
                rows_times.append(measured)
            del probes
            times[shape] = rows_times
        if cache is not None:
            cache.put("kernels", key, [[list(s), t] for s, t in times.items()])
        return times

    def _assign(self, times: dict[tuple[int, int], list[dict[str, float]]], budget: int) -> None:
        """Copies first to the shapes that save the most time per byte (each shape's copy the
        faster of dense and packed), while the budget lasts; every layer then takes its
        fastest kernel per bucket among those it has."""

        def best(t: dict[str, float], copy: str | None) -> str:
            allowed = [k for k in t if k not in COPIES or k == copy]
            return min(allowed, key=lambda k: t[k])

        def saved(shape: tuple[int, int], copy: str) -> float:
            return sum(t[best(t, None)] - t[best(t, copy)] for t in times[shape])

        def copy_of(shape: tuple[int, int]) -> str | None:
            kinds = [k for k in COPIES if k in self.kernels and all(k in t for t in times[shape])]
            return max(kinds, key=lambda k: saved(shape, k), default=None)

        def gain_per_byte(shape: tuple[int, int]) -> float:
            copy = copy_of(shape)
            return 0.0 if copy is None else saved(shape, copy) / (shape[0] * shape[1])

        layers = sorted(self.layers.values(), key=lambda lay: -gain_per_byte(lay.nf4.shape))
        element = torch.empty((), dtype=self.dtype).element_size()
        for layer in layers:
            shape = layer.nf4.shape
            copy = copy_of(shape)
            size = shape[0] * shape[1] * element
            if copy is not None and gain_per_byte(shape) > 0 and self.dense_bytes + size <= budget:
                self._give_copy(layer, copy)
            layer.set_choice(tuple(best(t, layer.copy) for t in times[shape]))
