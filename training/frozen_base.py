"""A faster frozen 4-bit base for training on a CPU.

bitsandbytes' CPU path dequantizes each NF4 weight at every forward and again at every
backward (and its own CPU kernel, fast for a few rows, is slower still for training batches of
hundreds of tokens). The base never changes during LoRA training, so each 4-bit linear is
dequantized once, to the compute dtype, and used as a plain frozen matrix: the same values
bitsandbytes would compute with (an NF4 model, exactly), at the cost of the compute dtype's
memory for the base. On CUDA bitsandbytes' kernels are used as they are.
"""

from __future__ import annotations

import logging
import types

import torch
import torch.nn.functional as F
from bitsandbytes.functional import dequantize_4bit
from torch import nn

log = logging.getLogger(__name__)


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
        module.forward = types.MethodType(_dense_forward, module)
        changed += 1
    if changed:
        log.info("training on a CPU: %d frozen 4-bit linears dequantized once", changed)
    return changed


def _dense_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    weight = self.dense_weight
    return F.linear(x.to(weight.dtype), weight, self.bias)
