"""Validation of a PEFT LoRA directory against the served base model, before it goes live.

Only safetensors are read (never pickle). What passes is returned as weights ready for a slot:
A as (r, in) and B as (out, r) with PEFT's scaling folded in, in float32.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from loraplex.adapters.errors import InvalidAdapter

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "pytorch_model.bin")
# PEFT's saved names: base_model.model.<module>.lora_A.weight (no adapter name).
_TENSOR_NAME = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<kind>[AB])\.weight$")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BaseModelSpec:
    """What an adapter must fit: the base's LoRA-capable linear layers and the server's limits."""

    linear_shapes: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)
    max_rank: int
    fingerprint: str
    max_bytes: int = 1 << 30


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter: per module (A (r, in), B (out, r) scaled), float32."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]
    rank: int
    lora_alpha: float
    target_modules: tuple[str, ...]  # short names, e.g. ("q_proj", "v_proj")


def check_no_pickle(adapter_dir: Path) -> None:
    for name in PICKLE_FILES:
        if (adapter_dir / name).exists():
            raise InvalidAdapter(
                f"{name} is a pickle file and is never loaded; save with safetensors"
            )


def read_config(adapter_dir: Path) -> dict:
    path = adapter_dir / CONFIG_FILE
    if not path.is_file():
        raise InvalidAdapter(f"{CONFIG_FILE} is missing from {adapter_dir.name!r}")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must hold a JSON object")
    return config


def check_config(config: dict, spec: BaseModelSpec) -> tuple[int, float, float]:
    """Returns (rank, alpha, scaling) or raises InvalidAdapter naming the problem."""
    if config.get("peft_type") != "LORA":
        raise InvalidAdapter(f"peft_type must be LORA, got {config.get('peft_type')!r}")
    rank = config.get("r")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise InvalidAdapter(f"r must be a positive integer, got {rank!r}")
    if rank > spec.max_rank:
        raise InvalidAdapter(f"rank {rank} exceeds the server's max rank {spec.max_rank}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, int | float) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise InvalidAdapter(f"lora_alpha must be a finite number, got {alpha!r}")
    unsupported = {
        "use_dora": "DoRA adapters are not supported",
        "modules_to_save": "modules_to_save is not supported",
        "rank_pattern": "rank_pattern is not supported",
        "alpha_pattern": "alpha_pattern is not supported",
        "fan_in_fan_out": "fan_in_fan_out adapters are not supported",
        "lora_bias": "LoRA bias terms are not supported",
    }
    for key, message in unsupported.items():
        if config.get(key):
            raise InvalidAdapter(message)
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(f"bias must be 'none', got {config.get('bias')!r}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return rank, float(alpha), scaling


def load_adapter(adapter_dir: Path, spec: BaseModelSpec) -> AdapterWeights:
    """Validate a PEFT LoRA directory against `spec` and return its slot-ready weights."""
    for name in PICKLE_FILES:
        if (adapter_dir / name).exists():
            raise InvalidAdapter(
                f"{name} is a pickle file and is never loaded; save with safetensors"
            )
    config = read_config(adapter_dir)
    rank, alpha, scaling = check_config(config, spec)
    weights_path = adapter_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        raise InvalidAdapter(f"{WEIGHTS_FILE} is missing from {adapter_dir.name!r}")
    if weights_path.stat().st_size > spec.max_bytes:
        raise InvalidAdapter(f"{WEIGHTS_FILE} is larger than the limit of {spec.max_bytes} bytes")
    tensors = _read_tensors(weights_path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR_NAME.match(key)
        if match is None:
            raise InvalidAdapter(f"unexpected tensor {key!r}: only LoRA A/B weights are supported")
        module = match["module"]
        if module not in spec.linear_shapes:
            raise InvalidAdapter(
                f"target module {module!r} is not a supported layer of the base model"
            )
        pairs.setdefault(module, {})[match["kind"]] = tensor
    if not pairs:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA weights")
    modules = {}
    for module, pair in sorted(pairs.items()):
        modules[module] = _check_pair(module, pair, spec.linear_shapes[module], rank, scaling)
    targets = tuple(sorted({m.rsplit(".", 1)[-1] for m in modules}))
    return AdapterWeights(modules=modules, rank=rank, lora_alpha=alpha, target_modules=targets)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises several error types for corrupt files
        raise InvalidAdapter(f"{WEIGHTS_FILE} is not a readable safetensors file: {exc}") from None


def _check_pair(
    module: str,
    pair: dict[str, torch.Tensor],
    shape: tuple[int, int],
    rank: int,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if set(pair) != {"A", "B"}:
        missing = "lora_B" if "A" in pair else "lora_A"
        raise InvalidAdapter(f"{module}: {missing} weight is missing")
    a, b = pair["A"], pair["B"]
    in_features, out_features = shape
    if tuple(a.shape) != (rank, in_features):
        raise InvalidAdapter(
            f"{module}.lora_A has shape {tuple(a.shape)}, expected {(rank, in_features)}"
        )
    if tuple(b.shape) != (out_features, rank):
        raise InvalidAdapter(
            f"{module}.lora_B has shape {tuple(b.shape)}, expected {(out_features, rank)}"
        )
    for kind, t in (("lora_A", a), ("lora_B", b)):
        if t.dtype not in _FLOAT_DTYPES:
            raise InvalidAdapter(f"{module}.{kind} has dtype {t.dtype}, expected a float dtype")
        if not torch.isfinite(t).all():
            raise InvalidAdapter(f"{module}.{kind} contains NaN or Inf")
    return a.float(), b.float() * scaling
