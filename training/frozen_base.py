"""A faster frozen 4-bit base for training on a CPU.

bitsandbytes' CPU path dequantizes each NF4 weight at every forward and again at every
backward (and its own CPU kernel, fast for a few rows, is slower still for training batches of
hundreds of tokens). The base never changes during LoRA training, so each 4-bit linear is
dequantized once and used as a plain frozen matrix: the same values bitsandbytes would compute
with (an NF4 model, exactly), at the cost of that dtype's memory for the base. The dtype is the
one the server measures fastest on this machine (`frozen_base_dtype`: bf16 where the CPU
multiplies bf16 natively, about 1.4x faster per training step than float32 on an AVX512-BF16
CPU, and float32 where bf16 is emulated); the adapter, its gradients and the optimizer stay in
float32, as the frozen layers hand back their input's dtype. On CUDA bitsandbytes' kernels are
used as they are.
"""

from __future__ import annotations

import logging
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit
from torch import nn

from loraplex.core.machine import DtypeChoice, TuningCache, choose_dtype, model_widths

log = logging.getLogger(__name__)


def frozen_base_dtype(model: nn.Module, home: Path) -> DtypeChoice:
    """The dtype the frozen base computes in on a CPU: what `--dtype auto` picks for serving
    (measured on the model's widths, cached under the loraplex home)."""
    widths = model_widths(model.config)
    return choose_dtype(torch.device("cpu"), widths, TuningCache(home / "tuning"))


def dequantize_frozen_base(model: nn.Module, dtype: torch.dtype) -> int:
    """Make every CPU 4-bit linear of `model` compute with its weight dequantized once;
    returns how many were changed. Call before the first forward."""
    changed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or weight.device.type != "cpu":
            continue
        if getattr(state, "packing_format_for_cpu", False):
            raise RuntimeError("the 4-bit weights were already repacked by a forward")
        dense = dequantize_4bit(weight.data, state).to(dtype)
        module.register_buffer("dense_weight", dense, persistent=False)
        bias = None if module.bias is None else module.bias.detach().to(dtype)
        module.register_buffer("dense_bias", bias, persistent=False)
        module.forward = types.MethodType(_dense_forward, module)
        changed += 1
    if changed:
        log.info(
            "training on a CPU: %d frozen 4-bit linears dequantized once, to %s", changed, dtype
        )
    return changed


def _dense_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """In the frozen weight's dtype, out in the input's (the casts carry gradients)."""
    weight = self.dense_weight
    return F.linear(x.to(weight.dtype), weight, self.dense_bias).to(x.dtype)
