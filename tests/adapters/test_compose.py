"""Adapter composition equals PEFT's add_weighted_adapter, method by method.

Tolerance: A is composed from the same float32 tensors with the same operations as PEFT, so it
must match exactly. B is not bit-exact by construction: AdapterWeights holds B with its scaling
folded in (as float32), and composition divides it back out, which is exact only up to one
float32 rounding (~6e-8 relative); a sum or mean of three such terms adds a few more ulps. So B
(and B @ A) are compared with rtol 1e-5 and atol 1e-6 of the tensor's largest magnitude: ten
times that rounding and more, while a wrong weight, sign, mask or pruned entry is off by orders
of magnitude more.
"""

from __future__ import annotations

import math
import re

import peft
import pytest
import torch
from packaging.version import Version
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM

from loraplex.adapters.compose import CompositionError, compose
from loraplex.adapters.validate import load_adapter
from loraplex.core.model import lora_target_shapes
from loraplex.core.types import AdapterWeights, BaseModelSpec
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.model_runner import ModelRunner
from tests.helpers import add_peft_adapter

# Different alphas (scalings 2, 12/sqrt(8), 0.625, 1.5), rsLoRA on one, different targets:
# only "second" targets k/gate/down, only "first" targets o_proj, "odd" has another rank.
CONFIGS = {
    "first": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]),
    "second": LoraConfig(
        r=8,
        lora_alpha=12,
        use_rslora=True,
        target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "down_proj"],
    ),
    "third": LoraConfig(r=8, lora_alpha=5, target_modules=["q_proj", "up_proj"]),
    "odd": LoraConfig(r=4, lora_alpha=6, target_modules=["v_proj", "up_proj"]),
    # Weights on a grid of 1/8: many entries share a magnitude, so ties' cut falls among equals.
    "coarse": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
}
SAME_RANK = ["first", "second", "third"]
WEIGHTS = [0.7, -0.4, 1.3]  # a negative weight: PEFT 0.21 puts its sign on A
SEED = 1234
COMPOSED = "composed"
ALL_LINEAR = ("down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir):
    """The saved PEFT adapters, our validated copies of them, and the base's module order."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    order = [name for name, _ in base.named_modules()]
    spec = BaseModelSpec(lora_target_shapes(base), max_rank=64, fingerprint="tiny")
    model = base
    for i, (name, config) in enumerate(CONFIGS.items()):
        model = add_peft_adapter(model, name, config, seed=i, b_std=0.3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".coarse." in name:
                param.copy_(torch.round(param * 8) / 8)
    path = tmp_path_factory.mktemp("adapters")
    model.save_pretrained(path, selected_adapters=list(CONFIGS))
    ours = {name: load_adapter(path / name, spec) for name in CONFIGS}
    return path, ours, order


@pytest.fixture(scope="module")
def peft_model(inputs, tiny_model_dir):
    """Stock PEFT with every input adapter loaded from disk; tests add and delete COMPOSED."""
    path = inputs[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = PeftModel.from_pretrained(base, path / "first", adapter_name="first")
    for name in CONFIGS:
        if name != "first":
            model.load_adapter(path / name, adapter_name=name)
    return model.eval()


def peft_compose(model, names, weights, method, **kwargs):
    """PEFT's composition: {module: (A, B * scaling)} of the composed adapter, and its scaling."""
    torch.manual_seed(SEED)  # the DARE masks come from the global RNG
    model.add_weighted_adapter(names, weights, COMPOSED, combination_type=method, **kwargs)
    try:
        found, scalings = {}, set()
        for name, module in model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and COMPOSED in module.lora_A:
                scaling = module.scaling[COMPOSED]
                scalings.add(scaling)
                a = module.lora_A[COMPOSED].weight.detach().clone()
                b = module.lora_B[COMPOSED].weight.detach().clone()
                found[name] = (a, b * scaling)
        (scaling,) = scalings
        return found, scaling
    finally:
        model.delete_adapter(COMPOSED)


def ours_compose(inputs, names, weights, method, **kwargs):
    _, ours, order = inputs
    components = [(ours[n], w) for n, w in zip(names, weights, strict=True)]
    return compose(components, method, seed=SEED, module_order=order, **kwargs)


def assert_close_to_magnitude(got, want):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))


def assert_equals_peft(got: AdapterWeights, want: dict, rank: int):
    assert got.rank == rank and got.lora_alpha == float(rank) and got.scaling == 1.0
    assert list(got.modules) == list(want)  # the same modules, in model order
    for name, (a, b) in got.modules.items():
        want_a, want_b = want[name]
        assert a.dtype == b.dtype == torch.float32 and a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, want_a), name
        assert_close_to_magnitude(b, want_b)
        assert_close_to_magnitude(b @ a, want_b @ want_a)


METHODS = [
    pytest.param("linear", {}, id="linear"),
    pytest.param("ties", {"density": 0.5, "majority_sign_method": "total"}, id="ties-total"),
    pytest.param(
        "ties", {"density": 0.5, "majority_sign_method": "frequency"}, id="ties-frequency"
    ),
    pytest.param("dare_linear", {"density": 0.6}, id="dare_linear"),
    pytest.param("dare_ties", {"density": 0.6, "majority_sign_method": "total"}, id="dare_ties"),
    pytest.param(
        "dare_ties", {"density": 0.6, "majority_sign_method": "frequency"}, id="dare_ties-freq"
    ),
]


@pytest.mark.parametrize(("method", "kwargs"), METHODS)
def test_same_rank_methods_equal_peft(inputs, peft_model, method, kwargs):
    want, scaling = peft_compose(peft_model, SAME_RANK, WEIGHTS, method, **kwargs)
    got = ours_compose(inputs, SAME_RANK, WEIGHTS, method, **kwargs)
    assert scaling == 1.0
    assert_equals_peft(got, want, rank=8)
    assert got.target_modules == ALL_LINEAR  # the union of the inputs' targets
    # A module only "first" targets (o_proj) holds "first" alone: linear gives w s B A.
    if method == "linear":
        first = inputs[1]["first"]
        a, b = first.modules["model.layers.0.self_attn.o_proj"]
        a_got, b_got = got.modules["model.layers.0.self_attn.o_proj"]
        assert_close_to_magnitude(b_got @ a_got, WEIGHTS[0] * (b @ a))


@pytest.mark.parametrize("density", [0.5, 0.01])  # topk's two selection algorithms
def test_ties_breaks_equal_magnitudes_like_peft(inputs, peft_model, density):
    a, _ = inputs[1]["coarse"].modules["model.layers.0.self_attn.q_proj"]
    k = int(density * a.numel())
    cut = a.abs().flatten().sort(descending=True).values[k - 1]
    assert (a.abs() == cut).sum() > 1  # the kept set really depends on how ties are broken
    names, weights = ["coarse", "first"], [1.0, 0.5]
    want, _ = peft_compose(peft_model, names, weights, "ties", density=density)
    got = ours_compose(inputs, names, weights, "ties", density=density)
    assert_equals_peft(got, want, rank=8)


def test_cat_of_different_ranks_equals_peft(inputs, peft_model):
    names, weights = ["first", "odd", "second"], [0.7, -0.4, 1.3]
    want, _ = peft_compose(peft_model, names, weights, "cat")
    got = ours_compose(inputs, names, weights, "cat")
    assert_equals_peft(got, want, rank=8 + 4 + 8)
    # k_proj: only "second" targets it, so its rows come first and the other 12 are zero.
    a, _ = got.modules["model.layers.1.self_attn.k_proj"]
    assert a[:8].abs().sum() > 0 and a[8:].abs().sum() == 0


def test_one_adapter_is_scaled_linearly_whatever_the_method(inputs, peft_model):
    """PEFT composes a single adapter with "linear"; the delta is the adapter's times w."""
    want, _ = peft_compose(peft_model, ["third"], [0.5], "ties", density=0.3)
    got = ours_compose(inputs, ["third"], [0.5], "ties", density=0.3)
    assert_equals_peft(got, want, rank=8)
    for name, (a, b) in inputs[1]["third"].modules.items():
        a_got, b_got = got.modules[name]
        assert_close_to_magnitude(b_got @ a_got, 0.5 * (b @ a))


def test_rslora_first_input_is_not_overscaled_like_peft(inputs, peft_model):
    """PEFT before 0.22 copied use_rslora from the first input, so its result scaled by sqrt(r)
    (huggingface/peft#3449); ours keeps scaling 1, PEFT's intended result (and 0.22's)."""
    names, weights = ["second", "first"], [1.0, 1.0]
    want, scaling = peft_compose(peft_model, names, weights, "linear")
    got = ours_compose(inputs, names, weights, "linear")
    peft_fixed = Version(peft.__version__) >= Version("0.22")
    assert scaling == pytest.approx(1.0 if peft_fixed else math.sqrt(8))
    assert got.scaling == 1.0
    for name, (a, b) in got.modules.items():
        want_a, want_b = want[name]
        assert_close_to_magnitude(b @ a * scaling, want_b @ want_a)


@pytest.mark.parametrize(("method", "kwargs"), [("cat", {}), *[m.values for m in METHODS]])
def test_composition_is_deterministic(inputs, method, kwargs):
    names = ["first", "odd"] if method == "cat" else SAME_RANK
    weights = WEIGHTS[: len(names)]
    one = ours_compose(inputs, names, weights, method, **kwargs)
    two = ours_compose(inputs, names, weights, method, **kwargs)
    assert list(one.modules) == list(two.modules)
    for (a1, b1), (a2, b2) in zip(one.modules.values(), two.modules.values(), strict=True):
        assert torch.equal(a1, a2) and torch.equal(b1, b2)


def test_dare_masks_follow_the_seed(inputs):
    _, ours, order = inputs
    components = [(ours["first"], 1.0), (ours["third"], 1.0)]
    one = compose(components, "dare_linear", density=0.5, seed=1, module_order=order)
    two = compose(components, "dare_linear", density=0.5, seed=2, module_order=order)
    name = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(one.modules[name][0], two.modules[name][0])


def test_composed_adapter_serves_like_peft(inputs, peft_model, load_tiny):
    """The cat result (rank 20) goes through the slot stacks and gives PEFT's logits."""
    names, weights = ["first", "odd", "second"], [0.7, -0.4, 1.3]
    got = ours_compose(inputs, names, weights, "cat", max_rank=32)
    runner = ModelRunner(load_tiny(), num_slots=2, max_rank=32)
    runner.load_adapter(1, got)
    assert runner.lora.ranks == [0, 20]
    prompt = [5, 17, 300, 42, 7]
    logits = runner.prefill([prompt, prompt], [1, NO_ADAPTER])
    torch.manual_seed(SEED)
    peft_model.add_weighted_adapter(names, weights, COMPOSED, combination_type="cat")
    try:
        peft_model.set_adapter(COMPOSED)
        with torch.inference_mode():
            want = peft_model(torch.tensor([prompt])).logits[0, -1]
    finally:
        peft_model.set_adapter("first")
        peft_model.delete_adapter(COMPOSED)
    torch.testing.assert_close(logits[0], want, rtol=1e-4, atol=1e-4)
    assert (logits[0] - logits[1]).abs().max() > 1e-2  # the composed adapter changed the output


@pytest.mark.parametrize(
    ("names", "method", "kwargs", "message"),
    [
        (SAME_RANK, "svd", {}, "unknown composition method 'svd'"),
        (["first", "odd"], "linear", {}, "one rank, got ranks 8, 4; use 'cat'"),
        (["first", "odd"], "dare_ties", {"density": 0.5}, "one rank"),
        (SAME_RANK, "ties", {}, "ties needs a density in (0, 1]"),
        (SAME_RANK, "ties", {"density": 0.0}, "density must be in (0, 1]"),
        (SAME_RANK, "dare_linear", {"density": 1.5}, "density must be in (0, 1]"),
        (SAME_RANK, "ties", {"density": 0.5, "majority_sign_method": "mean"}, "'mean'"),
        (SAME_RANK, "cat", {"max_rank": 16}, "rank 24, over the limit of 16"),
        ([], "linear", {}, "at least one adapter"),
    ],
)
def test_bad_requests_are_refused_with_the_reason(inputs, names, method, kwargs, message):
    with pytest.raises(CompositionError, match=re.escape(message)):
        ours_compose(inputs, names, [1.0] * len(names), method, **kwargs)


def test_bad_weights_and_modules_are_refused(inputs):
    _, ours, order = inputs
    with pytest.raises(CompositionError, match="adapter 1: weight must be a finite number"):
        compose([(ours["first"], 1.0), (ours["third"], math.nan)], "linear", module_order=order)
    with pytest.raises(CompositionError, match="overflow float32; use smaller weights"):
        compose([(ours["first"], 1e38), (ours["third"], 1.0)], "cat", module_order=order)
    with pytest.raises(CompositionError, match="not a module of the base model"):
        compose([(ours["first"], 1.0), (ours["third"], 1.0)], "linear", module_order=order[:5])
