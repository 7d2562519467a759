"""The base layers' kernels: each computes what the 4-bit weight says (the lookup-table
dequantization bit for bit as bitsandbytes'), whole forwards agree on every kernel, and the
measured choice respects the dense budget and is cached per machine."""

from __future__ import annotations

import copy

import pytest
import torch
from bitsandbytes.functional import dequantize_4bit
from peft import LoraConfig, PeftModel

from loraplex.adapters.validate import load_adapter
from loraplex.core.machine import TuningCache
from loraplex.core.types import BaseModelSpec
from loraplex.server.engine import linear as linear_module
from loraplex.server.engine.forward import fused_groups
from loraplex.server.engine.linear import (
    KERNELS,
    ROW_BUCKETS,
    BaseLinears,
    DenseLinear,
    bucket,
    packing_available,
)
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.model_runner import ModelRunner
from tests.helpers import add_peft_adapter, peft_logits
from tests.server.engine.test_engine import PROMPTS


def four_bit_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]


def test_rows_go_to_the_nearest_measured_bucket():
    assert [ROW_BUCKETS[bucket(n)] for n in (1, 2, 3, 8, 15, 17, 100, 181, 4096)] == [
        1, 1, 4, 8, 8, 32, 128, 128, 512,
    ]  # fmt: skip


@pytest.mark.cpu_isa
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lookup_table_dequantizes_as_bitsandbytes_does(load_tiny, dtype):
    loaded = load_tiny(quantization="nf4", dtype=dtype)
    modules = four_bit_modules(loaded.model)
    expected = {m: dequantize_4bit(m.weight.data, m.weight.quant_state) for m in modules}
    linears = BaseLinears(loaded.model, loaded.dtype, loaded.device, "lut")
    assert set(linears.layers) == set(modules)
    for module, want in expected.items():
        got = linears.weight(module)
        assert got is not None and got.dtype == want.dtype == loaded.dtype
        assert torch.equal(got, want)


@pytest.mark.cpu_isa
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_every_kernel_computes_the_same_layer(load_tiny, dtype):
    """At a decode's and a prompt chunk's row counts, before and after bitsandbytes' first
    forward (which may repack its weights for its CPU kernel)."""
    loaded = load_tiny(quantization="nf4", dtype=dtype)
    module = four_bit_modules(loaded.model)[0]
    reference = dequantize_4bit(module.weight.data, module.weight.quant_state).float()
    available = BaseLinears(loaded.model, loaded.dtype, loaded.device, "lut").kernels
    assert "packed" in available or dtype == "bfloat16"  # oneDNN packs float32 on any x86 CPU
    assert "nf4" in available  # built with the machine's C compiler
    kernels = {k: BaseLinears(loaded.model, loaded.dtype, loaded.device, k) for k in available}
    generator = torch.Generator().manual_seed(0)
    for rows in (1, 3, 40, 1, 600):
        x = torch.randn(rows, module.in_features, generator=generator).to(loaded.dtype)
        want = x.float() @ reference.T
        for kernel, linears in kernels.items():
            with torch.inference_mode():
                got = linears(module, x).float()
            exact = dtype == "float32" and kernel != "bitsandbytes"  # its CPU kernel rounds to bf16
            tolerance = 1e-5 if exact else 2e-2
            assert (got - want).abs().max() <= tolerance * want.abs().max(), (kernel, rows)


@pytest.mark.parametrize("kernel", KERNELS)
def test_layers_that_share_an_input_run_as_one_layer(load_tiny, kernel):
    """q/k/v and gate/up are one layer each: one call gives the members' outputs side by
    side, their 4-bit codes are held once (each member's weight is a view of its rows of the
    fused one) and each member's weight is still its own, as bitsandbytes dequantizes it."""
    loaded = load_tiny(quantization="nf4", dtype="float32")
    model = loaded.model
    expected = {
        m: dequantize_4bit(m.weight.data, m.weight.quant_state) for m in four_bit_modules(model)
    }
    groups = fused_groups(model)
    linears = BaseLinears(model, loaded.dtype, loaded.device, kernel, fuse=groups)
    alone = [
        m for layer in model.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)
    ]
    assert set(linears.layers) == {*groups, *alone}
    for group in groups:
        assert group in linears.layers and not any(m in linears.layers for m in group)
        fused = linears.layers[group].nf4
        for member in group:
            codes = linears.weights[member].codes
            assert codes.untyped_storage().data_ptr() == fused.codes.untyped_storage().data_ptr()
            assert torch.equal(linears.weight(member), expected[member])
    generator = torch.Generator().manual_seed(0)
    for group in (groups[0], groups[1]):
        for rows in (1, 40):
            x = torch.randn(rows, group[0].in_features, generator=generator)
            want = torch.cat([x @ expected[m].T for m in group], dim=1)
            with torch.inference_mode():
                got = linears(group, x)
            tolerance = 2e-2 if kernel == "bitsandbytes" else 1e-5  # its kernel rounds to bf16
            assert got.shape == want.shape
            assert (got - want).abs().max() <= tolerance * want.abs().max(), (group, rows)


@pytest.mark.cpu_isa
@pytest.mark.parametrize("kernel", KERNELS)
def test_served_adapters_equal_peft_on_a_4bit_base_with_every_kernel(load_tiny, tmp_path, kernel):
    """The float32 reference is PEFT over the same 4-bit weights dequantized: lut and dense
    equal it to float32 rounding; bitsandbytes' kernel to its own bf16 rounding."""
    loaded = load_tiny(quantization="nf4", dtype="float32")
    reference = copy.deepcopy(loaded.model).dequantize()
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    reference = add_peft_adapter(reference, "one", config, seed=0, b_std=0.5)
    reference.save_pretrained(tmp_path, selected_adapters=["one"])
    runner = ModelRunner(loaded, num_slots=2, max_rank=8, base_kernel=kernel)
    spec = BaseModelSpec(runner.target_shapes, max_rank=8, fingerprint="tiny")
    runner.load_adapter(0, load_adapter(tmp_path / "one", spec))
    prompts, slots = [PROMPTS[0], PROMPTS[1]], [0, NO_ADAPTER]
    logits = runner.prefill(prompts, slots)
    assert isinstance(reference, PeftModel)
    tolerance = 2e-2 if kernel == "bitsandbytes" else 1e-4
    for prompt, slot, got in zip(prompts, slots, logits, strict=True):
        want = peft_logits(reference, prompt, None if slot == NO_ADAPTER else "one")
        assert (got - want).abs().max() <= tolerance * want.abs().max()


def test_dense_copies_stay_within_the_budget_and_the_4bit_weights_stay(load_tiny):
    loaded = load_tiny(quantization="nf4", dtype="bfloat16")
    modules = four_bit_modules(loaded.model)
    sizes = sorted(m.weight.quant_state.shape.numel() * 2 for m in modules)
    budget = sizes[0] + sizes[1]  # two of the smallest layers fit, not more
    times = {
        tuple(m.weight.quant_state.shape): [
            {"bitsandbytes": 3.0, "lut": 2.0, "dense": 1.0} for _ in ROW_BUCKETS
        ]
        for m in modules
    }
    linears = BaseLinears(loaded.model, loaded.dtype, loaded.device, "lut")
    linears._assign(times, budget)  # type: ignore[arg-type]
    dense = [layer for layer in linears.layers.values() if layer.dense is not None]
    assert 1 <= len(dense) <= 2 and linears.dense_bytes <= budget
    for layer in linears.layers.values():
        want = "dense" if layer.dense is not None else "lut"
        assert layer.choice == (want,) * len(ROW_BUCKETS)
        assert hasattr(layer.modules[0].weight, "quant_state")  # the 4-bit weight is still there
    described = linears.describe()
    assert "dense" in described and "lut" in described
    none = BaseLinears(loaded.model, loaded.dtype, loaded.device, "lut")
    none._assign(times, 0)  # type: ignore[arg-type]
    assert none.dense_bytes == 0 and all(lay.dense is None for lay in none.layers.values())


def test_measurements_are_cached_per_machine(load_tiny, tmp_path, monkeypatch):
    loaded = load_tiny(quantization="nf4", dtype="bfloat16")
    cache = TuningCache(tmp_path)
    first = BaseLinears(loaded.model, loaded.dtype, loaded.device, "auto", 1 << 30, cache)
    assert list(tmp_path.glob("kernels-*.json"))

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again")

    monkeypatch.setattr(linear_module, "median_seconds", no_measuring)
    fresh = load_tiny(quantization="nf4", dtype="bfloat16")  # (the first may have been repacked)
    second = BaseLinears(fresh.model, fresh.dtype, fresh.device, "auto", 1 << 30, cache)
    assert second.choices() == first.choices()
    with pytest.raises(ValueError, match="base kernel"):
        BaseLinears(loaded.model, loaded.dtype, loaded.device, "fast")


def test_an_unquantized_model_has_no_4bit_layers(load_tiny):
    loaded = load_tiny()
    linears = BaseLinears(loaded.model, loaded.dtype, loaded.device, "auto", 1 << 30)
    assert linears.layers == {} and linears.choices() == []
    module = loaded.model.model.layers[0].mlp.up_proj
    x = torch.randn(3, module.in_features)
    assert torch.equal(linears(module, x), module(x))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_lm_head_is_held_packed_beside_its_weight(load_tiny, dtype):
    """The LM head multiplies from a packed copy (within the dense budget, counted with the
    dense copies) and gives the module's logits; the module's weight, tied to the embedding, is
    untouched. Without room in the budget it runs as it is."""
    loaded = load_tiny(quantization="nf4", dtype=dtype)
    module = loaded.model.lm_head
    no_room = BaseLinears(loaded.model, loaded.dtype, loaded.device, "lut", 0)
    assert no_room.head(module) is module and no_room.dense_bytes == 0
    linears = BaseLinears(loaded.model, loaded.dtype, loaded.device, "lut", 1 << 30)
    before = module.weight.detach().clone()
    head = linears.head(module)
    if not packing_available(loaded.device, loaded.dtype):
        assert head is module
        return
    assert isinstance(head, DenseLinear) and head.packed and linears.head_packed
    assert linears.dense_bytes == module.weight.numel() * module.weight.element_size()
    assert "LM head" in linears.describe()
    x = torch.randn(5, module.in_features).to(loaded.dtype)
    with torch.inference_mode():
        got, want = head(x).float(), module(x).float()
    tolerance = 1e-5 if dtype == "float32" else 2e-2
    torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance * want.abs().max())
    assert torch.equal(module.weight, before)


def test_each_shape_takes_the_faster_copy_and_merges_read_the_plain_weight(load_tiny):
    """Where the packed copy is faster it is the one kept (one copy per layer, under the same
    budget); the weight merges read stays the plain dequantized one."""
    loaded = load_tiny(quantization="nf4", dtype="bfloat16")
    modules = four_bit_modules(loaded.model)
    packed_shape = tuple(modules[0].weight.quant_state.shape)
    times = {
        tuple(m.weight.quant_state.shape): [
            {"bitsandbytes": 3.0, "lut": 2.0, "dense": 1.0, "packed": 0.5}
            if tuple(m.weight.quant_state.shape) == packed_shape
            else {"bitsandbytes": 3.0, "lut": 2.0, "dense": 1.0, "packed": 1.5}
            for _ in ROW_BUCKETS
        ]
        for m in modules
    }
    linears = BaseLinears(loaded.model, loaded.dtype, loaded.device, "lut")
    linears._assign(times, 1 << 30)  # type: ignore[arg-type]
    x = torch.randn(3, modules[0].in_features).to(loaded.dtype)
    for module in modules:
        layer = linears.layers[module]
        want = "dense"
        if tuple(module.weight.quant_state.shape) == packed_shape and "packed" in linears.kernels:
            want = "packed"  # bf16 packing needs AVX-512 (or AVX-NE-CONVERT)
        assert layer.copy == want and layer.choice == (want,) * len(ROW_BUCKETS)
        plain = layer.nf4.dequantize(loaded.dtype)
        torch.testing.assert_close(linears.weight(module), plain, rtol=0, atol=0)
    first = modules[0]
    with torch.inference_mode():
        got = linears(first, x).float()
    want_out = x.float() @ linears.weight(first).float().T
    assert (got - want_out).abs().max() <= 2e-2 * want_out.abs().max()
