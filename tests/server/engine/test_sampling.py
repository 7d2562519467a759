from __future__ import annotations

import pytest
import torch

from loraplex.core.errors import InvalidRequest
from loraplex.server.engine.request import SamplingParams
from loraplex.server.engine.sampling import (
    make_generator,
    sample,
    sample_rows,
    sampled_rows,
    warp,
)

CPU = torch.device("cpu")


def params(temperature=1.0, top_p=1.0, top_k=0, seed=0):
    return SamplingParams(
        max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed
    )


GREEDY = SamplingParams(max_new_tokens=1)
# One row of each kind the sampler tells apart: greedy, plain, top-k, top-p, both.
MIXED = [
    GREEDY,
    params(0.7),
    params(1.3, top_k=5),
    params(0.9, top_p=0.8),
    params(top_k=40, top_p=0.5),
]


def draw(logits, ps, n=1):
    generators = [make_generator(p) for p in ps]
    return [sample(logits, ps, generators) for _ in range(n)]


class Fixed:
    """A generator stand-in whose every draw is `u`."""

    def __init__(self, u):
        self.u = u

    def random(self):
        return self.u


def reference_warp(logits, p):
    """logits: (V,). The per-row warpers the sampler replaced (HF's order and rules)."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop_sorted = (probs.cumsum(-1) - probs) >= p.top_p
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def reference_token(logits, p, u):
    """logits: (V,). Inverse CDF, in vocabulary order, of the reference distribution at u."""
    if p.greedy:
        return int(logits.argmax())
    cdf = torch.softmax(reference_warp(logits, p), dim=-1).double().cumsum(-1)
    return int((cdf <= u * cdf[-1]).sum())


def test_greedy_rows_take_the_argmax():
    logits = torch.tensor([[0.0, 3.0, 1.0], [5.0, 0.0, 1.0]])
    assert draw(logits, [GREEDY] * 2) == [[1, 0]]


def test_greedy_rows_are_the_argmax_beside_sampled_rows():
    logits = torch.randn(2 * len(MIXED), 1000)
    ps = MIXED * 2
    tokens = torch.tensor(draw(logits, ps, n=3))  # (3, B)
    greedy = [row for row, p in enumerate(ps) if p.greedy]
    assert (tokens[:, greedy] == logits.argmax(-1)[greedy]).all()


def test_warp_equals_the_per_row_warpers():
    torch.manual_seed(0)
    extra = [
        params(0.5, top_k=1),
        params(2.0, top_p=0.05),
        params(top_k=5000),
        params(top_k=20, top_p=0.9),
    ]
    ps = MIXED[1:] * 3 + extra
    logits = torch.randn(len(ps), 1000) * 3
    sampled = sampled_rows(ps, [None] * len(ps), 1000, CPU)
    warped = warp(logits, sampled)
    for row, p in enumerate(ps):
        expected = reference_warp(logits[row], p)
        assert torch.equal(warped[row].isfinite(), expected.isfinite()), (row, p)
        kept = expected.isfinite()
        assert torch.equal(warped[row][kept], expected[kept])


def test_each_row_draws_the_inverse_cdf_of_its_distribution():
    torch.manual_seed(1)
    logits = torch.randn(len(MIXED), 500) * 2
    for u in (0.0, 0.013, 0.25, 0.5, 0.77, 0.999, 0.9999999):
        tokens = sample(logits, MIXED, [Fixed(u)] * len(MIXED))
        assert tokens == [reference_token(logits[r], p, u) for r, p in enumerate(MIXED)], u


def test_draws_follow_the_warped_distribution():
    logits = torch.randn(1, 30)
    p = params(0.8, top_k=20, top_p=0.9)
    n = 20_000
    # Evenly spread uniforms, one per row of one batch: the empirical law is the CDF's, to 1/n.
    uniforms = [Fixed((i + 0.5) / n) for i in range(n)]
    tokens = torch.tensor(sample(logits.expand(n, 30), [p] * n, uniforms))
    expected = torch.softmax(reference_warp(logits[0], p), dim=-1)
    assert torch.allclose(torch.bincount(tokens, minlength=30) / n, expected, atol=2 / n)


def test_the_largest_draw_stays_inside_the_kept_tokens():
    torch.manual_seed(3)
    logits = torch.randn(300, 1000)  # float32 sums of their softmax land on both sides of 1
    tokens = sample(logits, [params(top_k=5)] * 300, [Fixed(1 - 1e-12)] * 300)
    top5 = logits.topk(5).indices
    assert all(token in top5[row] for row, token in enumerate(tokens))


def test_extreme_parameters_still_pick_a_kept_token():
    logits = torch.randn(4, 1000) * 20
    extreme = [
        params(3e38),
        params(1e-5, top_p=0.5),
        params(1e-5, top_k=2**31 - 1),
        params(top_k=999),
    ]
    for _ in range(5):
        tokens = draw(logits, extreme)[0]
        for row, (token, p) in enumerate(zip(tokens, extreme, strict=True)):
            assert reference_warp(logits[row], p)[token].isfinite(), p


def test_top_p_keeps_the_tokens_until_the_mass_before_one_reaches_top_p():
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # sorted: 1 (0.5), 3 (0.3), 2 (0.15), 0 (0.05)
    logits = probs.log().unsqueeze(0)
    for top_p, kept in ((0.3, {1}), (0.75, {1, 3}), (0.85, {1, 3, 2}), (0.99, {0, 1, 2, 3})):
        sampled = sampled_rows([params(top_p=top_p)], [None], 4, CPU)
        row = warp(logits, sampled)[0]
        assert set(row.isfinite().nonzero().flatten().tolist()) == kept, top_p


def test_ties_at_the_last_kept_logit_all_stay():
    logits = torch.tensor([[0.0, 2.0, 1.0, 1.0, 1.0, -1.0]])
    for p in (params(top_k=2), params(top_p=0.6)):  # the cut falls inside the three 1.0s
        sampled = sampled_rows([p], [None], 6, CPU)
        assert warp(logits, sampled)[0].isfinite().tolist() == [
            False,
            True,
            True,
            True,
            True,
            False,
        ]


def test_top_k_one_and_tiny_top_p_are_greedy():
    logits = torch.randn(4, 50)
    argmax = logits.argmax(-1).tolist()
    for p in (params(1.5, top_k=1, seed=3), params(1.5, top_p=1e-6, seed=3)):
        assert draw(logits, [p] * 4)[0] == argmax


def test_top_k_keeps_only_the_k_best():
    logits = torch.arange(10.0).unsqueeze(0)
    p = params(5.0, top_k=3)
    seen = {d[0] for d in draw(logits, [p], n=200)}
    assert seen <= {7, 8, 9} and len(seen) > 1


def test_same_seed_same_samples_whatever_the_batch():
    torch.manual_seed(2)
    steps = [torch.randn(1, 300) for _ in range(30)]
    for seeded in (params(seed=42), params(0.7, top_p=0.9, seed=42), params(top_k=8, seed=42)):
        alone = make_generator(seeded)
        expected = [sample(step, [seeded], [alone])[0] for step in steps]
        # Companions of every kind, before and after it, change what the batch computes
        # (sorting, top-k width): never the seeded row's tokens.
        company = [params(seed=7), GREEDY, params(0.5, top_p=0.5, seed=8), params(top_k=100)]
        batch = [company[0], seeded, *company[1:]]
        generators = [make_generator(p) for p in batch]
        got = [
            sample(torch.cat([torch.randn(1, 300), step, torch.randn(3, 300)]), batch, generators)[
                1
            ]
            for step in steps
        ]
        assert got == expected, seeded
    assert len(set(expected)) > 1


def test_seeds_differ_and_unseeded_requests_differ():
    logits = torch.zeros(1, 1000)  # uniform: every draw shows

    def tokens(seed):
        p = params(seed=seed)
        return draw(logits, [p], n=20)

    assert tokens(1) == tokens(1)
    assert tokens(1) != tokens(2)
    assert tokens(None) != tokens(None)
    assert make_generator(GREEDY) is None


def test_a_sampled_step_reads_the_device_once(monkeypatch):
    """Only the final token ids come back to the host: nothing else turns a tensor into
    Python values (on CUDA each of these would wait for the device)."""
    calls = []
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls.append(_name)
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    logits = torch.randn(len(MIXED), 1000)
    tokens = sample(logits, MIXED, [make_generator(p) for p in MIXED])
    assert calls == ["tolist"] and len(tokens) == len(MIXED)


def test_the_sampled_path_needs_no_values_to_run():
    """On the meta device (shapes, no data), any op whose shape or control flow depends on a
    value (nonzero, masks that index, .item()) fails: the batched path has none."""
    meta = torch.device("meta")
    sampled = sampled_rows(MIXED, [make_generator(p) for p in MIXED], 1000, meta)
    assert len(sampled.groups) == 2  # a full sort and a top-k group, besides plain rows
    logits = torch.empty(len(MIXED) - 1, 1000, device=meta)
    assert sample_rows(logits, sampled).shape == (len(MIXED) - 1,)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_sampled_step_never_syncs_before_its_tokens_on_cuda():
    cuda = torch.device("cuda")
    logits = torch.randn(len(MIXED), 49152, device=cuda)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampled = sampled_rows(MIXED, [make_generator(p) for p in MIXED], 49152, cuda)
        tokens = sample_rows(logits.index_select(0, sampled.rows), sampled)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows = [row for row, p in enumerate(MIXED) if not p.greedy]
    for row, token in zip(rows, tokens.tolist(), strict=True):
        assert reference_warp(logits[row].cpu(), MIXED[row])[token].isfinite()


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
