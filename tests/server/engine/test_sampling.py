from __future__ import annotations

import pytest
import torch

from loraplex.core.errors import InvalidRequest
from loraplex.server.engine.request import SamplingParams
from loraplex.server.engine.sampling import make_generator, sample


def draw(logits, params, n=1):
    generators = [make_generator(p, torch.device("cpu")) for p in params]
    return [sample(logits, params, generators) for _ in range(n)]


def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    params = [SamplingParams(max_new_tokens=1)] * 2
    assert draw(logits, params) == [[1, 0]]


def test_same_seed_same_samples_whatever_the_batch():
    logits = torch.randn(1, 100)
    seeded = SamplingParams(max_new_tokens=1, temperature=1.0, seed=42)
    alone = draw(logits, [seeded], n=20)
    other = SamplingParams(max_new_tokens=1, temperature=0.7, seed=1)
    together = draw(torch.cat([logits, torch.randn(1, 100)]), [seeded, other], n=20)
    assert [a[0] for a in alone] == [t[0] for t in together]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    argmax = logits.argmax(-1).tolist()
    for params in (
        SamplingParams(max_new_tokens=1, temperature=1.5, top_k=1, seed=3),
        SamplingParams(max_new_tokens=1, temperature=1.5, top_p=1e-6, seed=3),
    ):
        assert draw(logits, [params] * 4)[0] == argmax


def test_top_k_keeps_only_the_k_best():
    logits = torch.arange(10.0).unsqueeze(0)
    params = SamplingParams(max_new_tokens=1, temperature=5.0, top_k=3, seed=0)
    seen = {d[0] for d in draw(logits, [params], n=200)}
    assert seen <= {7, 8, 9} and len(seen) > 1


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": 1, "temperature": float("nan")}, "temperature"),
        ({"max_new_tokens": 1, "top_p": 0.0}, "top_p"),
        ({"max_new_tokens": 1, "top_k": -1}, "top_k"),
        ({"max_new_tokens": 1, "stop": ("",)}, "stop"),
        ({"max_new_tokens": 1, "stop": ("x",) * 17}, "stop"),
    ],
)
def test_invalid_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequest) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
