"""The decoder forward's own ops against the HF modules they stand for."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from loraplex.server.engine.forward import _Norm


@pytest.mark.parametrize("norm_class", [LlamaRMSNorm, Qwen2RMSNorm, MistralRMSNorm])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_equals_the_families_modules(norm_class, dtype):
    generator = torch.Generator().manual_seed(0)
    norm = norm_class(96, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(96, generator=generator) * 2)
    x = (torch.randn(37, 96, generator=generator) * 3).to(dtype)
    with torch.inference_mode():
        want, got = norm(x), _Norm(norm)(x)
    assert got.dtype == want.dtype == dtype
    if dtype == torch.bfloat16:
        # Both normalise in float32 and round once to bf16: at most one unit in the last place.
        torch.testing.assert_close(got, want, rtol=2**-7, atol=0)
    else:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
