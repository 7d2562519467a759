"""The CPU training path's frozen 4-bit base: dequantized once, in the dtype measured fastest,
handing back its input's dtype with gradients."""

from __future__ import annotations

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit

from loraplex.training.frozen_base import dequantize_frozen_base, frozen_base_dtype


def _four_bit(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # Qwen2's q/k/v carry biases
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_frozen_layers_compute_the_4bit_weight_in_the_chosen_dtype(load_tiny, dtype, family):
    loaded = load_tiny(quantization="nf4", dtype="float32", family=family)
    modules = _four_bit(loaded.model)
    module = modules[0]
    weight = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    assert dequantize_frozen_base(loaded.model, dtype) == len(modules)
    assert module.dense_weight.dtype == dtype
    x = torch.randn(5, module.in_features, requires_grad=True)
    got = module(x)
    assert got.dtype == torch.float32  # the model's own dtype flows on
    want = x.detach() @ weight.T
    if module.bias is not None:
        want = want + module.bias.detach()
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert (got.detach() - want).abs().max() <= tolerance * want.abs().max()
    got.sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    want_grad = weight.sum(0).expand_as(x)
    assert (x.grad - want_grad).abs().max() <= tolerance * want_grad.abs().max()


def test_the_frozen_base_dtype_is_the_measured_choice_and_cached(load_tiny, tmp_path):
    loaded = load_tiny(quantization="nf4", dtype="float32")
    first = frozen_base_dtype(loaded.model, tmp_path)
    assert first.dtype in ("bfloat16", "float32") and "float32's" in first.reason
    assert list((tmp_path / "tuning").glob("dtype-*.json"))
    again = frozen_base_dtype(loaded.model, tmp_path)
    assert again.dtype == first.dtype and again.reason.endswith("(cached)")
