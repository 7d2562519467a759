"""The Triton LoRA kernels equal the spec (`lora_delta_reference`): in Triton's interpreter on
tiny shapes where there is no CUDA (tests/conftest.py sets TRITON_INTERPRET), compiled on a GPU
otherwise, and at a realistic shape (and under a CUDA graph) on a GPU only."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton comes with the dev extra (Linux only)")

from loraplex.server.engine import triton_lora_kernels as kernels
from loraplex.server.engine.lora import NO_ADAPTER, LoraGroup, lora_delta_reference
from loraplex.server.engine.triton_lora import (
    LoraTiles,
    add_lora_triton,
    lora_delta_triton,
)

if not kernels.INTERPRETED and not torch.cuda.is_available():
    pytest.skip("compiled kernels need CUDA (else TRITON_INTERPRET=1)", allow_module_level=True)

DEVICE = torch.device("cpu" if kernels.INTERPRETED else "cuda")
QKV, GATE_UP = [72, 16, 16], [40, 40]  # fused groups: 72 columns are two expand blocks
D_IN = 80  # two shrink iterations of 64, the second masked


def random_group(
    outs: list[int], ranks: list[int], capacity: int, dtype: torch.dtype, d_in: int = D_IN
) -> LoraGroup:
    """Stacks with each slot's own rank; slot 2 does not target member 1 (zeros there). A is
    scaled so that x @ A.T is about 1 whatever the width (bf16 keeps 8 bits of it)."""
    group = LoraGroup(d_in, outs, len(ranks), capacity, dtype, DEVICE, blocked=False)
    for slot, r in enumerate(ranks):
        for member, out in enumerate(outs):
            if r and not (slot == 2 and member == 1):
                a, b = torch.randn(r, d_in) / d_in**0.5, torch.randn(out, r) / 4
                group.set_slot(slot, member, a, b)
    return group


def run_both(group, ranks, slots, x_dtype, scale=1.0, max_tokens=None, split_k=1):
    """(the fused output after the kernels, base + scale * the spec's delta): the members'
    outputs are column views of one (N, sum out_j) output, as forward.py's q|k|v."""
    n = len(slots)
    x = torch.randn(n, group.in_features, device=DEVICE).to(x_dtype)
    fused = torch.randn(n, sum(group.out_features), device=DEVICE).to(x_dtype)
    want = fused.float().clone()
    tiles = LoraTiles(max_tokens or n, len(ranks), DEVICE)
    tiles.update(slots, ranks)
    add_lora_triton(list(fused.split(group.out_features, dim=1)), x, group, tiles, scale, split_k)
    column = 0
    for j, out in enumerate(group.out_features):
        delta = lora_delta_reference(
            x, *group.reference_stacks(j), ranks, torch.tensor(slots, device=DEVICE)
        )
        want[:, column : column + out] += scale * delta.float()
        column += out
    return fused, want


def tolerance(dtype: torch.dtype) -> dict[str, float]:
    """float32: the same sums in another order; bf16: a rounding or two of 2^-8."""
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}


def assert_matches(got, want, slots, ranks):
    torch.testing.assert_close(got.float(), want, **tolerance(got.dtype))
    untouched = [i for i, s in enumerate(slots) if s == NO_ADAPTER or ranks[s] == 0]
    # base and rank-0 tokens: their rows exactly as they were (the spec adds zeros)
    assert torch.equal(got[untouched].float(), want[untouched])


MIXED = [16, 4, 8, 0, 12]  # ranks in a pool of capacity 16; slot 3 holds nothing
CASES = {
    "qkv fp32, base and rank-0 tokens": (QKV, MIXED, 16, [0, -1, 2, 2, 1, 3, 4, 0, 0, 4, -1, 1]),
    "gate/up bf16": (GATE_UP, MIXED, 16, [4, 4, 0, -1, 2, 3, 1, 1, 1, 0]),
    "one member (o, down)": ([24], MIXED, 16, [1, 0, -1, 4, 2]),
    "smallest pool: capacity 8 < BLOCK_R": (QKV, [8, 3, 5, 0], 8, [0, 1, 2, 3, -1, 0, 2]),
    "ranks past one block": (GATE_UP, [32, 20, 17, 0, 24], 32, [1, 0, 4, 2, -1, 3, 1, 2]),
    "skewed: 40 of 45 on one slot": (QKV, MIXED, 16, [4] * 20 + [0, -1, 2] + [4] * 20 + [1, 3]),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_kernels_equal_reference(case):
    outs, ranks, capacity, slots = CASES[case]
    dtype = torch.bfloat16 if "bf16" in case else torch.float32
    torch.manual_seed(0)
    group = random_group(outs, ranks, capacity, dtype)
    got, want = run_both(group, ranks, slots, dtype)
    assert_matches(got, want, slots, ranks)


def test_reads_only_each_slots_rank():
    """Only a slot's first `rank` columns of A.T and rows of B.T count (the spec's [:r]), and a
    rank-0 slot counts for nothing: junk past them changes no output."""
    torch.manual_seed(8)
    group = random_group(QKV, MIXED, 16, torch.float32)
    group.at.copy_(torch.randn_like(group.at))
    for bt in group.blocks:
        bt.copy_(torch.randn_like(bt))
    slots = [0, 1, 2, 3, 4, -1, 1, 3]
    got, want = run_both(group, MIXED, slots, torch.float32)
    assert_matches(got, want, slots, MIXED)


def test_64_slots_of_mixed_ranks():
    """Every slot of a 64-slot pool present at once, ranks 1..32 in a capacity-32 pool, in a
    step smaller than the tiles' capacity (a graph's bucket)."""
    torch.manual_seed(1)
    ranks = [0 if s % 9 == 0 else 1 + s % 32 for s in range(64)]
    group = random_group(GATE_UP, ranks, 32, torch.float32, d_in=32)
    slots = torch.randint(-1, 64, (70,)).tolist() + list(range(64))
    got, want = run_both(group, ranks, slots, torch.float32, max_tokens=160)
    assert_matches(got, want, slots, ranks)


def test_negative_scale_takes_the_delta_back_out():
    """scale -1 (a merged adapter's delta out of other tokens) subtracts exactly what +1 adds."""
    torch.manual_seed(2)
    group = random_group(QKV, MIXED, 16, torch.float32)
    slots = [0, 1, 2, 4, -1, 3, 0]
    got, want = run_both(group, MIXED, slots, torch.float32, scale=-1.0)
    assert_matches(got, want, slots, MIXED)
    fused = torch.randn(len(slots), sum(QKV), device=DEVICE)
    before = fused.clone()
    x = torch.randn(len(slots), D_IN, device=DEVICE)
    tiles = LoraTiles(len(slots), len(MIXED), DEVICE)
    tiles.update(slots, MIXED)
    for scale in (1.0, -1.0):
        add_lora_triton(list(fused.split(QKV, dim=1)), x, group, tiles, scale)
    torch.testing.assert_close(fused, before, rtol=0, atol=1e-5)


def test_split_k_adds_the_parts():
    torch.manual_seed(3)
    group = random_group(QKV, MIXED, 16, torch.float32, d_in=200)
    slots = [0, 1, 4, 4, -1, 2, 3]
    got, want = run_both(group, MIXED, slots, torch.float32, split_k=3)
    assert_matches(got, want, slots, MIXED)


def test_float32_stacks_on_bf16_activations():
    """--lora-dtype float32 under a bf16 model: the delta is rounded once, as it is added."""
    torch.manual_seed(4)
    group = random_group(GATE_UP, MIXED, 16, torch.float32)
    slots = [1, 0, 4, -1, 2]
    x = torch.randn(len(slots), D_IN, device=DEVICE, dtype=torch.bfloat16)
    outs = [torch.zeros(len(slots), n, device=DEVICE, dtype=torch.bfloat16) for n in GATE_UP]
    tiles = LoraTiles(len(slots), len(MIXED), DEVICE)
    tiles.update(slots, MIXED)
    add_lora_triton(outs, x, group, tiles)
    for j, out in enumerate(outs):
        want = lora_delta_reference(
            x, *group.reference_stacks(j), MIXED, torch.tensor(slots, device=DEVICE)
        )
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out, want.to(torch.bfloat16), rtol=8e-3, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_signature_wrapper(dtype):
    """lora_delta_triton takes lora_delta_reference's arguments and returns its result."""
    torch.manual_seed(5)
    ranks = [4, 0, 16, 8]
    a = torch.zeros(4, 16, 24, device=DEVICE, dtype=dtype)
    b = torch.zeros(4, 32, 16, device=DEVICE, dtype=dtype)
    for s, r in enumerate(ranks):
        a[s, :r], b[s, :, :r] = torch.randn(r, 24) / 4, torch.randn(32, r) / 4
    slots = torch.tensor([2, 0, -1, 1, 3, 3, 2], device=DEVICE)
    x = torch.randn(len(slots), 24, device=DEVICE, dtype=dtype)
    got = lora_delta_triton(x, a, b, ranks, slots)
    want = lora_delta_reference(x, a, b, ranks, slots)
    assert got.dtype == want.dtype == dtype
    torch.testing.assert_close(got, want, **tolerance(dtype))
    assert not got[[2, 3]].any()  # a base token, and one of a rank-0 slot


def test_tiles_group_tokens_by_slot():
    tiles = LoraTiles(max_tokens=8, max_slots=4, device=DEVICE, block_m=2)
    assert tiles.capacity == 4 + 4
    tiles.update([2, -1, 0, 2, 3, 0, 2], ranks=[8, 8, 4, 0])  # slot 3: rank 0, left out
    table = tiles.tiles.cpu()
    assert tiles.num_tiles == 3
    # slot, start, end, rank of each tile: slot 0's two tokens, then slot 2's three in two
    assert table[:, :3].T.tolist() == [[0, 0, 2, 8], [2, 2, 4, 4], [2, 4, 5, 4]]
    assert not table[:, 3:].any()  # the empty tiles: rank 0, nothing to do
    assert tiles.order.cpu()[:5].tolist() == [2, 5, 0, 3, 6]


def test_tiles_refuse_a_step_past_their_capacity():
    tiles = LoraTiles(max_tokens=4, max_slots=2, device=DEVICE)
    with pytest.raises(ValueError, match="5 tokens"):
        tiles.update([0] * 5, [8, 8])
    with pytest.raises(ValueError, match="3 slots"):
        tiles.update([0], [8, 8, 8])


def test_tiles_reused_across_steps():
    """The same buffers for a smaller step after a larger one (a captured graph's): nothing of
    the larger step is read again."""
    torch.manual_seed(6)
    group = random_group(QKV, MIXED, 16, torch.float32)
    tiles = LoraTiles(max_tokens=24, max_slots=len(MIXED), device=DEVICE)
    for slots in ([0, 1, 2, 4] * 6, [4, -1, 1], [-1, -1]):
        x = torch.randn(len(slots), D_IN, device=DEVICE)
        outs = [torch.zeros(len(slots), n, device=DEVICE) for n in QKV]
        tiles.update(slots, MIXED)
        add_lora_triton(outs, x, group, tiles)
        for j, out in enumerate(outs):
            want = lora_delta_reference(
                x, *group.reference_stacks(j), MIXED, torch.tensor(slots, device=DEVICE)
            )
            torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or kernels.INTERPRETED, reason="needs CUDA")
def test_compiled_kernels_at_a_realistic_shape_and_in_a_cuda_graph():
    """Llama-3-8B's q/k/v (4096 -> 4096 | 1024 | 1024) in bf16, 32 adapters of mixed ranks in
    a capacity-64 pool, 256 tokens (a skewed prefill run plus decode tokens); then the same
    launches captured in a CUDA graph and replayed on another batch of the same buffers."""
    torch.manual_seed(7)
    ranks = [0, *(32 + (s * 7) % 33 for s in range(1, 32))]
    group = random_group([4096, 1024, 1024], ranks, 64, torch.bfloat16, d_in=4096)
    slots = [5] * 128 + torch.randint(-1, 32, (128,)).tolist()
    for split_k in (1, 4):
        got, want = run_both(group, ranks, slots, torch.bfloat16, split_k=split_k)
        assert_matches(got, want, slots, ranks)
    tiles = LoraTiles(256, 32, DEVICE)
    x = torch.zeros(256, 4096, device=DEVICE, dtype=torch.bfloat16)
    fused = torch.zeros(256, 6144, device=DEVICE, dtype=torch.bfloat16)
    tiles.update([-1] * 256, ranks)
    graph = torch.cuda.CUDAGraph()
    add_lora_triton(list(fused.split([4096, 1024, 1024], dim=1)), x, group, tiles)  # warm-up
    with torch.cuda.graph(graph):
        add_lora_triton(list(fused.split([4096, 1024, 1024], dim=1)), x, group, tiles)
    slots = torch.randint(-1, 32, (256,)).tolist()
    x.copy_(torch.randn_like(x))
    fused.zero_()
    tiles.update(slots, ranks)
    graph.replay()
    for j, (start, end) in enumerate([(0, 4096), (4096, 5120), (5120, 6144)]):
        want = lora_delta_reference(
            x, *group.reference_stacks(j), ranks, torch.tensor(slots, device=DEVICE)
        )
        torch.testing.assert_close(fused[:, start:end], want, rtol=2e-2, atol=2e-2)
