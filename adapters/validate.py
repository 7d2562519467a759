"""Validation of a PEFT LoRA directory against the served base model, before it goes live.

Three layers of checks, each failure an `InvalidAdapter` naming the file, tensor or module:

1. The directory (`check_entries`): exactly adapter_config.json and adapter_model.safetensors,
   plus PEFT's README.md and our trainer's training_manifest.json, which are ignored. Pickle
   files are refused by name and never opened; so are other files, subdirectories, executables,
   non-regular files and symlinks (unless they resolve to a file inside an allowed root).
2. The config (`check_config`): plain LoRA only (no DoRA, patterns, biases or other variants),
   rank within the server's limit, target_modules selecting supported layers of the base.
3. The weights: the safetensors file is parsed here, strictly (header, offsets, sizes, no
   stray bytes), and each tensor must be PEFT's lora_A (r, in) or lora_B (out, r) of a
   supported layer, F32/F16/BF16 and finite.

No torch compute happens here: validation runs on worker threads while the engine thread runs
torch, and torch ops on a second thread start a second OpenMP pool that slows the engine. The
checks and conversions use numpy (single-threaded elementwise); torch only wraps the results.
What passes is returned as float32 A (r, in) and B (out, r) with PEFT's scaling folded into B.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import torch

from loraplex.core.errors import InvalidAdapter
from loraplex.core.types import AdapterWeights, BaseModelSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
IGNORED_FILES = ("README.md", "training_manifest.json")  # PEFT's model card, our trainer's log
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
MAX_CONFIG_BYTES = 1 << 20
MAX_EXTRA_BYTES = 1 << 20  # each ignored file
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit

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


# -- the directory ------------------------------------------------------------------------------
def check_entries(adapter_dir: Path, allowed_roots: Sequence[Path] | None = None) -> None:
    """Refuse anything in `adapter_dir` but the adapter's files and the ignored extras. Symlinks
    are refused when `allowed_roots` is None, else they must resolve to a file inside one."""
    try:
        with os.scandir(adapter_dir) as it:
            names = sorted(entry.name for entry in it)
    except OSError as exc:
        raise InvalidAdapter(
            f"{adapter_dir.name!r} is not a readable directory: {exc.strerror}"
        ) from None
    roots = None if allowed_roots is None else [Path(r).resolve() for r in allowed_roots]
    for name in names:
        _check_entry(adapter_dir / name, roots)
    for name in ADAPTER_FILES:
        if name not in names:
            raise InvalidAdapter(f"{name} is missing from {adapter_dir.name!r}")


def _check_entry(path: Path, roots: list[Path] | None) -> None:
    name = path.name
    if name in PICKLE_FILES or path.suffix.lower() in PICKLE_SUFFIXES:
        raise InvalidAdapter(f"{name} is a pickle file and is never loaded; save with safetensors")
    st = path.lstat()
    if name not in ADAPTER_FILES and name not in IGNORED_FILES:
        kind = "directory" if stat.S_ISDIR(st.st_mode) else "file"
        raise InvalidAdapter(
            f"unexpected {kind} {name!r}: an adapter holds only {' and '.join(ADAPTER_FILES)}"
        )
    if stat.S_ISLNK(st.st_mode):
        if roots is None:
            raise InvalidAdapter(f"{name} is a symlink; links are not accepted here")
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):  # missing target or a loop (RuntimeError before 3.13)
            raise InvalidAdapter(f"{name} is a broken symlink") from None
        if not any(target.is_relative_to(root) for root in roots):
            raise InvalidAdapter(f"{name} links outside the allowed roots")
        st = target.stat()
    if not stat.S_ISREG(st.st_mode):
        raise InvalidAdapter(f"{name} is not a regular file")
    if st.st_mode & 0o111:
        raise InvalidAdapter(f"{name} is executable; adapter files are data")
    limit = MAX_EXTRA_BYTES if name in IGNORED_FILES else MAX_CONFIG_BYTES
    if name != WEIGHTS_FILE and st.st_size > limit:  # the weights' limit is the spec's
        raise InvalidAdapter(f"{name} is {st.st_size} bytes, over the limit of {limit}")


def _read_file(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes; symlinks and FIFOs are refused
    at open, so what is read is what was checked."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise InvalidAdapter(f"{path.name} is missing from {path.parent.name!r}") from None
    except OSError as exc:
        raise InvalidAdapter(f"{path.name} cannot be read: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise InvalidAdapter(f"{path.name} is not a regular file")
        if st.st_size > limit:
            raise InvalidAdapter(
                f"{path.name} is {st.st_size} bytes, larger than the limit of {limit} bytes"
            )
        data = f.read(st.st_size)
        if len(data) != st.st_size or f.read(1):
            raise InvalidAdapter(f"{path.name} changed while it was read")
    return data


# -- the config ---------------------------------------------------------------------------------
def read_config(adapter_dir: Path) -> dict[str, Any]:
    data = _read_file(adapter_dir / CONFIG_FILE, MAX_CONFIG_BYTES)
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    return config


def check_config(config: dict[str, Any], spec: BaseModelSpec) -> tuple[int, float, float]:
    """Returns (rank, alpha, scaling) or raises InvalidAdapter naming the problem."""
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(f"not a LoRA adapter: peft_type is {config.get('peft_type')!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapter(f"r must be a positive integer, got {rank!r}")
    if rank > spec.max_rank:
        raise InvalidAdapter(f"rank {rank} exceeds the server's max rank {spec.max_rank}")
    alpha = config.get("lora_alpha", 8)  # PEFT's default
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidAdapter(f"lora_alpha must be a finite number, got {alpha!r}")
    for key, message in _UNSUPPORTED.items():
        if _is_set(config.get(key)):
            raise InvalidAdapter(message)
    if not isinstance(config.get("use_rslora", False), bool):
        raise InvalidAdapter(f"use_rslora must be true or false, got {config['use_rslora']!r}")
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(f"bias must be 'none', got {config.get('bias')!r}")
    _check_targets(config, spec)
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(alpha), scaling


def _is_set(value: object) -> bool:
    # False, None and empty containers are PEFT's "off"; 0 is a layer index, so it is set.
    return value is not None and value is not False and value not in ("", [], {})


def _check_targets(config: dict[str, Any], spec: BaseModelSpec) -> None:
    """target_modules and exclude_modules are PEFT's: a regex fullmatch over module names, or a
    list of names each equal to or a dotted suffix of a module name."""
    for key in ("target_modules", "exclude_modules"):
        value = config.get(key)
        if isinstance(value, str):
            _compile(value, key)
        elif value is not None and (
            not isinstance(value, list) or not all(isinstance(v, str) for v in value)
        ):
            raise InvalidAdapter(f"{key} must be a string or a list of strings")
    targets = config.get("target_modules")
    supported = ", ".join(sorted({m.rsplit(".", 1)[-1] for m in spec.linear_shapes}))
    if isinstance(targets, str) and targets != _ALL_LINEAR:
        pattern = _compile(targets, "target_modules")
        if not any(pattern.fullmatch(module) for module in spec.linear_shapes):
            raise InvalidAdapter(
                f"target_modules regex {targets!r} matches no supported layer of the base model"
                f" ({supported})"
            )
    elif isinstance(targets, list):
        if not targets:
            raise InvalidAdapter("target_modules is empty")
        for target in targets:
            if not any(_selects([target], module) for module in spec.linear_shapes):
                raise InvalidAdapter(
                    f"target module {target!r} matches no supported layer of the base model"
                    f" ({supported})"
                )


def _compile(pattern: str, key: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise InvalidAdapter(f"{key} is not a valid regex: {exc}") from None


def _selects(names: str | list[str], module: str) -> bool:
    """PEFT's match of target_modules (or exclude_modules) against a module name."""
    if isinstance(names, str):
        return re.fullmatch(names, module) is not None
    return any(module == name or module.endswith(f".{name}") for name in names)


def _targeted(config: dict[str, Any], module: str) -> bool:
    """Whether PEFT would put a LoRA layer on `module`, and so load its tensors."""
    targets, excluded = config.get("target_modules"), config.get("exclude_modules")
    if excluded and _selects(excluded, module):
        return False
    return targets is None or targets == _ALL_LINEAR or _selects(targets, module)


# -- the weights --------------------------------------------------------------------------------
def load_adapter(adapter_dir: Path, spec: BaseModelSpec) -> AdapterWeights:
    """Validate a PEFT LoRA directory against `spec` and return its slot-ready weights."""
    check_entries(adapter_dir)
    config = read_config(adapter_dir)
    rank, alpha, scaling = check_config(config, spec)
    data = _read_file(adapter_dir / WEIGHTS_FILE, spec.max_bytes)
    header = _parse_header(data)
    pairs: dict[str, dict[str, _Tensor]] = {}
    for name, tensor in header.items():
        match = _TENSOR_NAME.match(name)
        if match is None:
            raise InvalidAdapter(f"unexpected tensor {name!r}: only LoRA A/B weights are supported")
        module = match["module"]
        if module not in spec.linear_shapes:
            raise InvalidAdapter(
                f"tensor {name!r}: target module {module!r} is not a supported layer of the base"
                " model"
            )
        if not _targeted(config, module):
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


def _parse_header(data: bytes) -> dict[str, _Tensor]:
    """The tensors of a safetensors file: u64 LE header length N, N bytes of JSON header, then
    a data buffer that the tensors cover exactly, without overlaps or gaps."""
    if len(data) < 8:
        raise _unreadable(f"{len(data)} bytes is too short for a header")
    (size,) = struct.unpack("<Q", data[:8])
    if size > MAX_HEADER_BYTES or 8 + size > len(data):
        raise _unreadable(f"header length {size} is invalid for a {len(data)}-byte file")
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
            raise _unreadable(f"tensor {name!r} overlaps another tensor")
        if t.start - base > covered:
            raise _unreadable(f"data bytes {covered}..{t.start - base} belong to no tensor")
        covered = t.end - base
    if covered != buffer_len:
        raise _unreadable(f"{buffer_len - covered} trailing bytes after the last tensor")
    return tensors


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):  # a repeated tensor name would hide one of the two
        raise ValueError(f"duplicate keys in {sorted(keys)[:8]}")
    return dict(pairs)


def _header_entry(name: str, entry: object, base: int, buffer_len: int) -> _Tensor:
    if not isinstance(entry, dict) or set(entry) != _ENTRY_KEYS:
        raise _unreadable(f"entry {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in _DTYPES:
        raise InvalidAdapter(f"tensor {name!r} has dtype {dtype!r}, expected a float dtype")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise _unreadable(f"tensor {name!r} has an invalid shape {shape!r}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        raise _unreadable(f"tensor {name!r} has invalid data_offsets {offsets!r}")
    begin, end = offsets
    if not begin <= end <= buffer_len:
        raise _unreadable(
            f"tensor {name!r} data_offsets {offsets} are outside the {buffer_len}-byte data"
        )
    expected = math.prod(shape) * _DTYPES[dtype].itemsize
    if end - begin != expected:
        raise _unreadable(
            f"tensor {name!r} spans {end - begin} bytes; {dtype} {shape} needs {expected}"
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
        raise InvalidAdapter(f"{module}.lora_A has shape {a.shape}, expected {(rank, in_features)}")
    if b.shape != (out_features, rank):
        raise InvalidAdapter(
            f"{module}.lora_B has shape {b.shape}, expected {(out_features, rank)}"
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
