"""Validation of a PEFT LoRA directory against the served base model, before it goes live.

Three layers of checks, each failure an `InvalidAdapter` naming the file, tensor or module:

1. The directory (`check_entries`, entries.py): what it holds, checked before any file of it
   is read.
2. The config (`check_config`): plain LoRA only (no DoRA, patterns, biases or other variants),
   rank within the server's limit, target_modules selecting supported layers of the base.
   A regex in target_modules / exclude_modules is matched against the base's module names in a
   bounded child process (patterns.py): a pathological pattern is refused, never run here.
3. The weights: the safetensors file is parsed here, strictly (header, offsets, sizes, no
   stray bytes), and each tensor must be PEFT's lora_A (r, in) or lora_B (out, r) of a
   supported layer, F32/F16/BF16 and finite. The JSON header may be only as large as the
   base's LoRA tensors need, so parsing it costs milliseconds whatever the file claims.

What a file gives (names, values) is echoed in errors at most `shown`'s length.

No torch compute happens here: validation runs on worker threads while the engine thread runs
torch, and torch ops on a second thread start a second OpenMP pool that slows the engine. The
checks and conversions use numpy (single-threaded elementwise); torch only wraps the results.
What passes is returned as float32 A (r, in) and B (out, r) with PEFT's scaling folded into B.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from loraplex.adapters.entries import (
    CONFIG_FILE,
    MAX_CONFIG_BYTES,
    WEIGHTS_FILE,
    check_entries,
    read_file,
)
from loraplex.adapters.patterns import fullmatches
from loraplex.core.errors import InvalidAdapter, shown
from loraplex.core.types import AdapterWeights, BaseModelSpec

MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit, above the spec's own
# A safetensors header holds at most two entries (lora_A, lora_B) per layer of the base: this
# much for each (its name and dtype, shape and offsets), and room for __metadata__ and padding.
HEADER_BYTES_PER_TENSOR = 512
HEADER_BYTES_EXTRA = 64 << 10
MAX_TARGET_NAMES = 4096  # entries of a target_modules / exclude_modules list

# PEFT's saved names: base_model.model.<module>.lora_A.weight (no adapter name).
_TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
# Safetensors dtypes accepted, as little-endian numpy dtypes; BF16 is read as its raw bits.
_DTYPES: dict[str, np.dtype[Any]] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
}
_ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
# Config keys that make an adapter something other than plain LoRA on linear layers, when set.
_UNSUPPORTED = {
    "use_dora": "DoRA adapters are not supported",
    "modules_to_save": "modules_to_save is not supported",
    "rank_pattern": "rank_pattern is not supported",
    "alpha_pattern": "alpha_pattern is not supported",
    "fan_in_fan_out": "fan_in_fan_out adapters are not supported",
    "lora_bias": "LoRA bias terms are not supported",
    "layers_to_transform": "layers_to_transform is not supported",
    "layers_pattern": "layers_pattern is not supported",
    "layer_replication": "layer_replication is not supported",
    "target_parameters": "target_parameters is not supported",
    "trainable_token_indices": "trainable_token_indices is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "use_qalora": "QA-LoRA adapters are not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "kasa_config": "KaSA adapters (kasa_config) are not supported",
    "monteclora_config": "MonteCLoRA adapters (monteclora_config) are not supported",
}
_ALL_LINEAR = "all-linear"  # PEFT's shorthand; save_pretrained normally expands it to names


# -- the config ---------------------------------------------------------------------------------
def read_config(adapter_dir: Path) -> dict[str, Any]:
    data = read_file(adapter_dir / CONFIG_FILE, MAX_CONFIG_BYTES)
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    return config


class LoraSettings(NamedTuple):
    """What the config says, checked: rank, alpha, PEFT's scaling, and the layers of the base
    PEFT would put this adapter's LoRA on."""

    rank: int
    alpha: float
    scaling: float
    modules: frozenset[str]


def check_config(config: dict[str, Any], spec: BaseModelSpec) -> LoraSettings:
    """The config's settings, or InvalidAdapter naming the problem."""
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(f"not a LoRA adapter: peft_type is {shown(config.get('peft_type'))}")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapter(f"r must be a positive integer, got {shown(rank)}")
    if rank > spec.max_rank:
        raise InvalidAdapter(f"rank {rank} exceeds the server's max rank {spec.max_rank}")
    alpha = config.get("lora_alpha", 8)  # PEFT's default
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidAdapter(f"lora_alpha must be a finite number, got {shown(alpha)}")
    for key, message in _UNSUPPORTED.items():
        if _is_set(config.get(key)):
            raise InvalidAdapter(message)
    if not isinstance(config.get("use_rslora", False), bool):
        raise InvalidAdapter(f"use_rslora must be true or false, got {shown(config['use_rslora'])}")
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(f"bias must be 'none', got {shown(config.get('bias'))}")
    modules = _check_targets(config, spec)
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraSettings(rank, float(alpha), scaling, modules)


def _is_set(value: object) -> bool:
    # False, None and empty containers are PEFT's "off"; 0 is a layer index, so it is set.
    return value is not None and value is not False and value not in ("", [], {})


def _check_targets(config: dict[str, Any], spec: BaseModelSpec) -> frozenset[str]:
    """The supported layers of the base PEFT would put a LoRA layer on. target_modules and
    exclude_modules are PEFT's: a regex fullmatched against module names, or a list of names
    each equal to or a dotted suffix of a module name. Only the base's own module names are ever
    matched: a regex in a bounded child process (patterns.py), a list by set lookups."""
    targets, excluded = config.get("target_modules"), config.get("exclude_modules")
    for key, value in (("target_modules", targets), ("exclude_modules", excluded)):
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise InvalidAdapter(f"{key} must be a string or a list of strings")
            if len(value) > MAX_TARGET_NAMES:
                raise InvalidAdapter(
                    f"{key} lists {len(value)} names, over the limit of {MAX_TARGET_NAMES}"
                )
        elif value is not None and not isinstance(value, str):
            raise InvalidAdapter(f"{key} must be a string or a list of strings")
    names = tuple(spec.linear_shapes)
    patterns = {
        key: value
        for key, value in (("target_modules", targets), ("exclude_modules", excluded))
        if isinstance(value, str) and value != _ALL_LINEAR and (key == "target_modules" or value)
    }
    matched = fullmatches(patterns, names) if patterns else {}
    supported = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in names}))
    if targets is None or targets == _ALL_LINEAR:
        selected = frozenset(names)
    elif isinstance(targets, str):
        selected = matched["target_modules"]
        if not selected:
            raise InvalidAdapter(
                f"target_modules regex {shown(targets)} matches no supported layer of the base "
                f"model ({supported})"
            )
    else:
        if not targets:
            raise InvalidAdapter("target_modules is empty")
        suffixes = {suffix for module in names for suffix in _suffixes(module)}
        for target in targets:
            if target not in suffixes:
                raise InvalidAdapter(
                    f"target module {shown(target)} matches no supported layer of the base "
                    f"model ({supported})"
                )
        selected = _listed(targets, names)
    if not excluded:  # None, "" or []: PEFT excludes nothing
        return selected
    if isinstance(excluded, str):
        return selected - matched["exclude_modules"]
    return selected - _listed(excluded, names)


def _suffixes(module: str) -> list[str]:
    """The names that select `module` in a list: itself and each dotted suffix of it."""
    parts = module.split(".")
    return [".".join(parts[i:]) for i in range(len(parts))]


def _listed(names: Iterable[str], modules: Iterable[str]) -> frozenset[str]:
    """The `modules` a list of names selects, as PEFT matches one: equal, or a dotted suffix."""
    wanted = set(names)
    return frozenset(m for m in modules if any(s in wanted for s in _suffixes(m)))


# -- the weights --------------------------------------------------------------------------------
def load_adapter(adapter_dir: Path, spec: BaseModelSpec) -> AdapterWeights:
    """Validate a PEFT LoRA directory against `spec` and return its slot-ready weights."""
    check_entries(adapter_dir)
    config = read_config(adapter_dir)
    rank, alpha, scaling, targeted = check_config(config, spec)
    data = read_file(adapter_dir / WEIGHTS_FILE, spec.max_bytes)
    header = _parse_header(data, max_header_bytes(spec))
    pairs: dict[str, dict[str, _Tensor]] = {}
    for name, tensor in header.items():
        match = _TENSOR_NAME.match(name)
        if match is None:
            raise InvalidAdapter(
                f"unexpected tensor {shown(name)}: only LoRA A/B weights are supported"
            )
        module = match["module"]
        if module not in spec.linear_shapes:
            raise InvalidAdapter(
                f"tensor {shown(name)}: target module {shown(module)} is not a supported layer of "
                "the base model"
            )
        if module not in targeted:
            raise InvalidAdapter(
                f"tensor {name!r}: module {module!r} is not selected by target_modules"
                " (and exclude_modules), so PEFT would not load it"
            )
        pairs.setdefault(module, {})[match["kind"]] = tensor
    if not pairs:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA weights")
    modules = {}
    for module, pair in sorted(pairs.items()):
        a, b = _check_pair(module, pair, spec.linear_shapes[module], rank)
        modules[module] = _load_pair(module, a, b, data, scaling)
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))
    return AdapterWeights(
        modules=modules, rank=rank, lora_alpha=alpha, target_modules=targets, scaling=scaling
    )


class _Tensor(NamedTuple):
    """One header entry; `start` and `end` are absolute offsets into the file."""

    dtype: str  # a key of _DTYPES
    shape: tuple[int, ...]
    start: int
    end: int


def _unreadable(reason: str) -> InvalidAdapter:
    return InvalidAdapter(f"{WEIGHTS_FILE} is not a readable safetensors file: {reason}")


def max_header_bytes(spec: BaseModelSpec) -> int:
    """The largest safetensors header an adapter of `spec`'s base can need."""
    tensors = 2 * len(spec.linear_shapes)
    return min(MAX_HEADER_BYTES, tensors * HEADER_BYTES_PER_TENSOR + HEADER_BYTES_EXTRA)


def _parse_header(data: bytes, limit: int = MAX_HEADER_BYTES) -> dict[str, _Tensor]:
    """The tensors of a safetensors file: u64 LE header length N, N bytes of JSON header, then
    a data buffer that the tensors cover exactly, without overlaps or gaps. A header over
    `limit` bytes is refused unparsed."""
    if len(data) < 8:
        raise _unreadable(f"{len(data)} bytes is too short for a header")
    (size,) = struct.unpack("<Q", data[:8])
    if 8 + size > len(data):
        raise _unreadable(f"header length {size} is invalid for a {len(data)}-byte file")
    if size > limit:
        raise _unreadable(
            f"the header is {size} bytes, over the limit of {limit} for this base model "
            "(two tensors per supported layer)"
        )
    try:
        header = json.loads(data[8 : 8 + size].decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:
        raise _unreadable(f"header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _unreadable("header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _unreadable("__metadata__ must map strings to strings")
    base, buffer_len = 8 + size, len(data) - 8 - size
    tensors = {name: _header_entry(name, entry, base, buffer_len) for name, entry in header.items()}
    covered = 0  # the buffer up to here belongs to a tensor
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if t.start - base < covered:
            raise _unreadable(f"tensor {shown(name)} overlaps another tensor")
        if t.start - base > covered:
            raise _unreadable(f"data bytes {covered}..{t.start - base} belong to no tensor")
        covered = t.end - base
    if covered != buffer_len:
        raise _unreadable(f"{buffer_len - covered} trailing bytes after the last tensor")
    return tensors


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):  # a repeated tensor name would hide one of the two
        raise ValueError(f"duplicate keys in {shown(sorted(keys)[:8], 400)}")
    return dict(pairs)


def _header_entry(name: str, entry: object, base: int, buffer_len: int) -> _Tensor:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise _unreadable(f"entry {shown(name)} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise InvalidAdapter(
            f"tensor {shown(name)} has dtype {shown(dtype)}, expected a float dtype"
        )
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _unreadable(f"tensor {shown(name)} has an invalid shape {shown(shape)}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise _unreadable(f"tensor {shown(name)} has invalid data_offsets {shown(offsets)}")
    begin, end = offsets
    if not begin <= end <= buffer_len:
        raise _unreadable(
            f"tensor {shown(name)} data_offsets {shown(offsets)} are outside the "
            f"{buffer_len}-byte data"
        )
    expected = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != expected:
        raise _unreadable(
            f"tensor {shown(name)} spans {end - begin} bytes; {dtype} {shown(shape)} needs "
            f"{expected}"
        )
    return _Tensor(dtype, tuple(shape), base + begin, base + end)


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_pair(
    module: str, pair: dict[str, _Tensor], shape: tuple[int, int], rank: int
) -> tuple[_Tensor, _Tensor]:
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise InvalidAdapter(f"{module}: {missing} weight is missing")
    a, b = pair["A"], pair["B"]
    in_features, out_features = shape
    if a.shape != (rank, in_features):
        raise InvalidAdapter(
            f"{module}.lora_A has shape {shown(a.shape)}, expected {(rank, in_features)}"
        )
    if b.shape != (out_features, rank):
        raise InvalidAdapter(
            f"{module}.lora_B has shape {shown(b.shape)}, expected {(out_features, rank)}"
        )
    return a, b


def _load_pair(
    module: str, a: _Tensor, b: _Tensor, data: bytes, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B * scaling) as float32 tensors, each in memory of its own (not views of `data`)."""
    a_f32, b_f32 = _to_float32(a, data), _to_float32(b, data)
    for kind, array in (("lora_A", a_f32), ("lora_B", b_f32)):
        if not np.isfinite(array).all():
            raise InvalidAdapter(f"{module}.{kind} contains NaN or Inf")
    with np.errstate(over="ignore"):
        b_f32 *= np.float32(scaling)  # float32 like PEFT's scaling of a float32 lora_B output
    if not np.isfinite(b_f32).all():
        raise InvalidAdapter(f"{module}.lora_B overflows float32 when scaled by {scaling:g}")
    return torch.from_numpy(a_f32), torch.from_numpy(b_f32)


def _to_float32(tensor: _Tensor, data: bytes) -> npt.NDArray[np.float32]:
    """A new C-contiguous float32 array of the tensor's values."""
    raw = np.frombuffer(
        data, dtype=_DTYPES[tensor.dtype], count=math.prod(tensor.shape), offset=tensor.start
    )
    if tensor.dtype == "BF16":  # bfloat16 is the top half of a float32
        values = (raw.astype(np.uint32) << 16).view(np.float32)
    else:
        values = raw.astype(np.float32)  # a copy: `data` is not kept alive
    return values.reshape(tensor.shape)
