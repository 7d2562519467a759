"""The decoder forward's own ops against the HF modules they stand for."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.mistral.modeling_mistral import MistralRMSNorm
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

from loraplex.server.engine.forward import SMALL_ATTENTION_TOKENS, _Norm, attend


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


@pytest.mark.parametrize(("rows", "length"), [(1, 100), (2, 256), (4, 300), (16, 200)])
def test_decode_attention_equals_the_float64_softmax_on_either_path(rows, length):
    """bf16 caches: a few cached tokens in all go through float32 (SMALL_ATTENTION_TOKENS),
    more through bf16 matmuls; both are the float64 math within bf16 rounding, and a masked
    position (bias -inf) gets no weight."""
    generator = torch.Generator().manual_seed(0)
    kv_heads, group, dim = 3, 3, 64
    qg = torch.randn(rows, kv_heads, group, dim, generator=generator).bfloat16()
    keys = torch.randn(rows, kv_heads, length, dim, generator=generator).bfloat16()
    values = torch.randn(rows, kv_heads, length, dim, generator=generator).bfloat16()
    seen = torch.randint(1, length + 1, (rows, 1, 1, 1), generator=generator)
    bias = torch.zeros(rows, 1, 1, length).masked_fill_(torch.arange(length) >= seen, -torch.inf)
    scaling = dim**-0.5
    with torch.inference_mode():
        got = attend(qg, keys, values, bias, scaling)
    scores = qg.double() @ keys.double().transpose(-1, -2) * scaling + bias.double()
    want = scores.softmax(-1) @ values.double()
    assert got.dtype == torch.bfloat16 and got.shape == (rows, kv_heads, group, dim)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)
    small = rows * length <= SMALL_ATTENTION_TOKENS  # the cases cover both paths
    assert small == ((rows, length) in {(1, 100), (2, 256)})


def test_rows_in_order_reads_the_cache_in_place_with_the_same_result(load_tiny):
    """Decode tokens in rows 0..n-1, every row decoding: the step reads the cache rows in place
    (no scatter of the queries, no gather of the outputs) and the logits are those of the
    general path, and of the native kernel's (which reads every token's own row in place)."""
    from dataclasses import replace

    from loraplex.server.engine.model_runner import DecodeWork, ModelRunner, PrefillWork

    runner = ModelRunner(load_tiny(), num_slots=2, max_rank=8)
    rows = [runner.cache.allocate(16) for _ in range(3)]
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    runner.step(
        [],
        [
            PrefillWork(row=r, slot=-1, tokens=p, start=0, wants_logits=True)
            for r, p in zip(rows, prompts, strict=True)
        ],
    )
    seen = {}
    forward = runner.forward

    def capture(batch):
        seen["batch"] = batch
        return forward_call(batch)

    forward_call = type(forward).__call__.__get__(forward)
    runner.forward = capture  # type: ignore[assignment]
    decodes = [
        DecodeWork(row=r, slot=-1, token=3, position=len(p))
        for r, p in zip(rows, prompts, strict=True)
    ]
    native = runner.step(decodes, [])  # the native decode attention, where it is built
    batch = seen["batch"]
    assert batch.rows_in_order and forward.native is not None
    # Again through torch's paths (the step writes the same keys and values at the same places).
    forward.native = None
    in_place = forward_call(batch)
    general = forward_call(replace(batch, rows_in_order=False))
    torch.testing.assert_close(in_place, general, rtol=0, atol=0)
    torch.testing.assert_close(native, general, rtol=1e-5, atol=1e-5)


def test_prompt_chunks_attend_natively_as_torchs_causal_path(load_tiny):
    """A step with decode tokens beside prompt chunks (one a later chunk of its prompt: its
    tokens see the earlier chunk's keys): where the native kernel attends every token, each
    up to its own position, the logits are those of torch's masked per-chunk path."""
    from loraplex.server.engine.model_runner import DecodeWork, ModelRunner, PrefillWork

    runner = ModelRunner(load_tiny(), num_slots=2, max_rank=8)
    forward = runner.forward
    native = forward.native
    assert native is not None and native.attends_every_token(forward.head_dim)
    first, second = [5, 6, 7, 8, 9, 10, 11], list(range(20, 60))

    def two_steps() -> list[torch.Tensor]:
        a, b = runner.cache.allocate(48), runner.cache.allocate(48)
        return [
            runner.step(
                [],
                [
                    PrefillWork(row=a, slot=-1, tokens=first, start=0, wants_logits=True),
                    PrefillWork(row=b, slot=-1, tokens=second[:17], start=0, wants_logits=False),
                ],
            ),
            runner.step(
                [DecodeWork(row=a, slot=-1, token=3, position=len(first))],
                [PrefillWork(row=b, slot=-1, tokens=second[17:], start=17, wants_logits=True)],
            ),
        ]

    got = two_steps()
    forward.native = None  # torch's paths: the per-chunk causal mask, the batched decode
    want = two_steps()
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.shape[0] >= 1
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
