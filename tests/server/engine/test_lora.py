"""The LoRA math: both fast paths equal the per-token spec, and served adapters equal PEFT."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util

import pytest
import torch
from peft import LoraConfig, PeftModel

from loraplex.adapters.validate import load_adapter
from loraplex.core.types import BaseModelSpec
from loraplex.server.engine import cpu_kernels
from loraplex.server.engine.lora import (
    CPU_BLOCK,
    NO_ADAPTER,
    LoraGroup,
    LoraStacks,
    lora_delta_reference,
    rank_bucket,
    slot_bytes,
    stored_width,
)
from loraplex.server.engine.lora_ops import Segment, add_lora, plan_lora
from loraplex.server.engine.model_runner import (
    DecodeWork,
    ModelRunner,
    PrefillWork,
    auto_lora_dtype,
)
from loraplex.server.engine.triton_lora import resolve_kernels
from tests.conftest import TINY_FAMILIES
from tests.helpers import add_peft_adapter, peft_logits

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton comes with the dev extra (Linux)"
)
D_IN, OUTS = 24, [40, 8, 8]  # a fused q/k/v-like group: three members read one input
RANKS = [16, 4, 8, 0]  # mixed ranks (zero-padded to 16); slot 3 holds nothing


def random_group(dtype: torch.dtype = torch.float32, ranks: list[int] = RANKS) -> LoraGroup:
    group = LoraGroup(D_IN, OUTS, len(ranks), 16, dtype, torch.device("cpu"))
    for slot, r in enumerate(ranks):
        for member, out in enumerate(OUTS):
            if r and not (slot == 2 and member == 1):  # slot 2 does not target member 1
                group.set_slot(slot, member, torch.randn(r, D_IN), torch.randn(out, r))
    return group


def reference(x, group, ranks, token_slots):
    """The spec, member by member."""
    return [
        lora_delta_reference(x, *group.reference_stacks(j), ranks, torch.tensor(token_slots))
        for j in range(len(OUTS))
    ]


def run_fast(x, group, ranks, decode_slots, segments):
    outs = [torch.zeros(x.shape[0], out, dtype=x.dtype) for out in OUTS]
    add_lora(outs, x, group, plan_lora(decode_slots, segments, ranks, x.device))
    return outs


@pytest.mark.parametrize(
    "decode_slots",
    [
        [0, 0, 0, 0],  # one adapter: G = 4, no padding
        [NO_ADAPTER] * 4,  # base only: nothing to add
        [2, NO_ADAPTER, 0, 2, 1, 1, NO_ADAPTER, 3],  # padded groups, base and rank-0 tokens
        [3, 1, 0, 2],  # every token its own adapter: G = 1
        [1],
    ],
)
def test_decode_gather_path_equals_reference(decode_slots):
    torch.manual_seed(0)
    group = random_group()
    x = torch.randn(len(decode_slots), D_IN, dtype=torch.bfloat16)
    want = reference(x, group, RANKS, decode_slots)
    got = run_fast(x.float(), group, RANKS, decode_slots, [])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(
    ("decode_slots", "gathered"),
    [
        ([0, 0, 1, 1], False),  # in slot order: a view of slots 0-1, tokens in place
        ([9, 0, 9, 0, 0], True),  # slots 0 and 9 only: gathered, not a 10-slot view
        ([5, 4, 6, NO_ADAPTER, 5], False),  # a view of slots 4-6, reordered, padded
    ],
)
def test_decode_range_view_and_gather_equal_reference(decode_slots, gathered):
    torch.manual_seed(0)
    ranks = [8] * 10
    group = random_group(ranks=ranks)
    x = torch.randn(len(decode_slots), D_IN)
    plan = plan_lora(decode_slots, [], ranks, x.device)
    assert plan.decode is not None and (plan.decode.slots is not None) == gathered
    want = reference(x, group, ranks, decode_slots)
    got = run_fast(x, group, ranks, decode_slots, [])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)


def test_prompt_segment_path_and_mixed_step_equal_reference():
    """Decode tokens then prompt chunks in one plan (a chunked-prefill step)."""
    torch.manual_seed(0)
    group = random_group()
    decode = [1, NO_ADAPTER, 0, 1]
    # chunks: 5 tokens of slot 2, 3 of slot 2 (joined into one run), 4 base, 6 of slot 0
    runs = [(2, 4, 9), (2, 9, 12), (NO_ADAPTER, 12, 16), (0, 16, 22)]
    segments = [Segment(slot, start, end) for slot, start, end in runs]
    token_slots = decode + [s for s, a, b in segments for _ in range(a, b)]
    x = torch.randn(len(token_slots), D_IN)
    want = reference(x, group, RANKS, token_slots)
    got = run_fast(x, group, RANKS, decode, segments)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-4)
    assert plan_lora(decode, segments, RANKS, x.device).segments == [(2, 4, 12), (0, 16, 22)]


@pytest.mark.cpu_isa
def test_bf16_weights_stay_close_to_the_float32_spec():
    torch.manual_seed(0)
    group32 = random_group()
    group16 = LoraGroup(D_IN, OUTS, len(RANKS), 16, torch.bfloat16, torch.device("cpu"))
    group16.at.copy_(group32.at)
    for b16, b32 in zip(group16.blocks, group32.blocks, strict=True):
        b16.copy_(b32)
    decode = [2, 0, 1, 0]
    x = torch.randn(4, D_IN, dtype=torch.bfloat16)
    want = reference(x, group32, RANKS, decode)
    got = run_fast(x, group16, RANKS, decode, [])
    for g, w in zip(got, want, strict=True):
        scale = w.abs().max()
        assert (g.float() - w).abs().max() <= 0.02 * scale


def test_stacks_place_each_module_in_its_group_member():
    layout = [
        {"qkv": (D_IN, [("l0.q", OUTS[0]), ("l0.k", OUTS[1]), ("l0.v", OUTS[2])])},
        {"qkv": (D_IN, [("l1.q", OUTS[0]), ("l1.k", OUTS[1]), ("l1.v", OUTS[2])])},
    ]
    stacks = LoraStacks(layout, max_slots=2, max_rank=8, dtype=torch.float32, device="cpu")
    a, b = torch.randn(4, D_IN), torch.randn(OUTS[1], 4)
    stacks.load(1, {"l1.k": (a, b)})
    assert stacks.ranks == [0, 4] and stacks.shape("l1.k") == (D_IN, OUTS[1])
    located = stacks.locate(1)
    assert located is not None and stacks.locate(0) is None
    pool, local = located
    group = pool.groups[1]["qkv"]
    torch.testing.assert_close(group.a(local, 1)[:4], a)
    torch.testing.assert_close(group.bt(1, local)[:4], b.T)
    assert (
        torch.count_nonzero(group.a(local, 0)) == 0
        and torch.count_nonzero(pool.groups[0]["qkv"].at) == 0
    )
    stacks.clear(1)
    assert stacks.ranks == [0, 0] and torch.count_nonzero(group.at) == 0
    assert stacks.locate(1) is None


def test_a_staged_load_writes_what_a_copy_per_module_writes():
    """On CUDA an adapter reaches the device in one pinned, non-blocking copy (LoraStacks
    staged, on a side stream): the stacks hold the same weights, in the stacks' dtype."""
    layout = [
        {"qkv": (D_IN, [("l0.q", OUTS[0]), ("l0.k", OUTS[1]), ("l0.v", OUTS[2])])},
        {"o": (D_IN, [("l1.o", OUTS[0])])},
    ]
    gen = torch.Generator().manual_seed(3)
    modules = {
        "l0.q": (torch.randn(4, D_IN, generator=gen), torch.randn(OUTS[0], 4, generator=gen)),
        "l0.v": (torch.randn(4, D_IN, generator=gen), torch.randn(OUTS[2], 4, generator=gen)),
        "l1.o": (torch.randn(4, D_IN, generator=gen), torch.randn(OUTS[0], 4, generator=gen)),
    }
    stacks = {}
    for staged in (False, True):
        stacks[staged] = LoraStacks(
            layout, max_slots=2, max_rank=8, dtype=torch.bfloat16, device="cpu", staged=staged
        )
        stacks[staged].load(1, modules)
        stacks[staged].load(0, {})  # an adapter of rank 0: nothing to copy
    assert stacks[True].staged and not stacks[False].staged
    for (pool, _), (want, _) in zip(
        stacks[True].pools.items(), stacks[False].pools.items(), strict=True
    ):
        for layer, groups in enumerate(stacks[True].pools[pool].groups):
            for name, group in groups.items():
                other = stacks[False].pools[want].groups[layer][name]
                assert torch.equal(group.at, other.at) and group.at.dtype == torch.bfloat16
                assert all(
                    torch.equal(x, y) for x, y in zip(group.blocks, other.blocks, strict=True)
                )
    assert stacks[True].pools[8].groups[0]["qkv"].at.any()


@pytest.mark.cpu_isa
@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_served_adapters_equal_peft_in_a_mixed_batch(load_tiny, tmp_path, family, kernels="torch"):
    """Two PEFT adapters (different ranks, so different pools, and targets) and the base, in one
    prefill batch, on each supported model family (Qwen2's q/k/v carry biases). With the Triton
    kernels too (test_the_triton_kernels_serve_as_peft_and_as_torchs)."""
    loaded = load_tiny(family=family)
    reference = copy.deepcopy(loaded.model)
    configs = {
        "first": LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        "second": LoraConfig(r=16, lora_alpha=3, use_rslora=True, target_modules="all-linear"),
    }
    for i, (name, config) in enumerate(configs.items()):
        reference = add_peft_adapter(reference, name, config, seed=i, b_std=0.5)
    reference.save_pretrained(tmp_path, selected_adapters=list(configs))

    runner = ModelRunner(loaded, num_slots=3, max_rank=16, kernels=kernels)
    spec = BaseModelSpec(runner.target_shapes, max_rank=16, fingerprint="tiny")
    for slot, name in enumerate(configs):
        runner.load_adapter(slot, load_adapter(tmp_path / name, spec))
    assert sorted(runner.lora.pools) == [8, 16]  # the two adapters run in pools of their own
    assert runner.kernels == kernels
    prompts = [[5, 17, 300, 42, 7], [9, 8, 7], [100, 200, 300, 400]]
    slots = [0, 1, NO_ADAPTER]
    logits = runner.prefill(prompts, slots)
    for prompt, slot, got in zip(prompts, slots, logits, strict=True):
        want = peft_logits(reference, prompt, None if slot == NO_ADAPTER else list(configs)[slot])
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with torch.inference_mode(), reference.disable_adapter():
        base = reference(torch.tensor([prompts[0]])).logits[0, -1]
    assert (logits[0] - base).abs().max() > 1e-2  # the adapter really changed the output
    assert isinstance(reference, PeftModel)


@needs_triton
def test_the_triton_kernels_serve_as_peft_and_as_torchs(load_tiny, tmp_path):
    """--kernels triton (in Triton's interpreter here): PEFT's logits for a mixed prefill of
    two pools and the base; then decode steps of mixed adapters, with one adapter merged into
    the base (its delta taken back out of the others' tokens), give torch's greedy tokens."""
    test_served_adapters_equal_peft_in_a_mixed_batch(load_tiny, tmp_path, "llama", "triton")
    runners = {}
    for kernels in ("torch", "triton"):
        runner = ModelRunner(load_tiny(), num_slots=3, max_rank=16, kernels=kernels, compile=False)
        spec = BaseModelSpec(runner.target_shapes, max_rank=16, fingerprint="tiny")
        for slot, name in enumerate(("first", "second")):
            runner.load_adapter(slot, load_adapter(tmp_path / name, spec))
        runners[kernels] = runner
    prompts = [[5, 17, 300, 42, 7], [9, 8, 7], [100, 200, 300, 400], [3, 1, 4, 1, 5, 9]]
    slots = [0, 1, NO_ADAPTER, 1]
    tokens, logits = {}, {}
    for kernels, runner in runners.items():
        runner.merge(1)  # "second" folded into the base: the others' tokens take it back out
        rows = [runner.cache.allocate(len(p) + 4) for p in prompts]
        work = [PrefillWork(row=r, slot=s, tokens=p, start=0, wants_logits=True)
                for r, s, p in zip(rows, slots, prompts, strict=True)]  # fmt: skip
        logits[kernels] = runner.step([], work)
        out = [logits[kernels].argmax(-1).tolist()]
        # the engine's decode order: the merged adapter's tokens first, then by slot
        order = sorted(range(len(rows)), key=lambda i: (slots[i] != 1, slots[i], rows[i]))
        for n in range(3):
            step = [DecodeWork(row=rows[i], slot=slots[i], token=out[-1][i],
                               position=len(prompts[i]) + n) for i in order]  # fmt: skip
            sampled = runner.step(step, []).argmax(-1).tolist()
            out.append([sampled[order.index(i)] for i in range(len(rows))])
        tokens[kernels] = out
    torch.testing.assert_close(logits["triton"], logits["torch"], rtol=1e-4, atol=1e-4)
    assert tokens["triton"] == tokens["torch"]


def test_kernels_auto_is_triton_on_cuda_only():
    cpu = torch.device("cpu")
    assert resolve_kernels("auto", cpu) == "torch" and resolve_kernels("torch", cpu) == "torch"
    with pytest.raises(ValueError):
        resolve_kernels("cutlass", cpu)
    if importlib.util.find_spec("triton") is not None:
        assert resolve_kernels("auto", torch.device("cuda")) == "triton"
        assert resolve_kernels("triton", cpu) == "triton"  # the interpreter: tests


def test_rank_buckets_are_powers_of_two_up_to_the_max_rank():
    assert [rank_bucket(r, 64) for r in (0, 1, 3, 8, 9, 16, 33, 64)] == [0, 8, 8, 8, 16, 16, 64, 64]
    assert rank_bucket(40, 48) == 48 and rank_bucket(3, 4) == 4


def test_a_cpu_stack_holds_each_slot_in_one_run_and_reads_back_what_was_written():
    """Blocked (a CPU's stacks, the native kernel's layout): a slot's A.T, then each member's
    B.T in blocks of CPU_BLOCK columns, zeros past its width, in one run of memory, the next
    slot's after it; what was written reads back as from an unblocked stack, through a
    re-allocation, a move and a clear."""
    torch.manual_seed(3)
    outs = [70, 8]
    groups = {
        b: LoraGroup(D_IN, outs, 2, 8, torch.float32, torch.device("cpu"), blocked=b)
        for b in (True, False)
    }
    a, b = torch.randn(5, D_IN), torch.randn(70, 5)
    for group in groups.values():
        group.set_slot(1, 0, a, b)
    blocked = groups[True]
    assert blocked.storage is not None
    assert blocked.slot_stride == D_IN * 2 * 8 + 8 * (2 * CPU_BLOCK + CPU_BLOCK)
    start = blocked.storage[1].data_ptr()
    assert blocked.at[1].data_ptr() == start
    assert blocked.blocks[0][1].data_ptr() == start + D_IN * 2 * 8 * 4
    assert blocked.blocks[1][1].data_ptr() == start + (D_IN * 2 * 8 + 8 * 2 * CPU_BLOCK) * 4
    for group in groups.values():
        group.reshape(3, 16)
        group.move_slot(1, 2)
        group.clear_slot(1)
        torch.testing.assert_close(group.bt(0, 2)[:5], b.T)
        torch.testing.assert_close(group.a(2, 0)[:5], a)
        assert not group.bt(0, 1).any() and not group.bt(0, 2)[5:].any()
    index = torch.tensor([2, 0])
    assert torch.equal(blocked.bt(0, index), groups[False].bt(0, index))
    assert not blocked.blocks[0][2, 1, :, 70 - CPU_BLOCK :].any()  # the columns past 70


@pytest.mark.parametrize("stack_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_the_native_kernel_writes_an_adapters_slot_as_the_copies_per_module_do(
    native, stack_dtype, source_dtype
):
    """An adapter's load into a CPU's stacks is one native call (lora_set_slot): the same
    stacks, bit for bit, as one torch copy per module, through ranks under the capacity, widths
    that end inside a block, and a smaller adapter written over a larger one (what it does not
    target is cleared)."""
    layout = [
        {"qkv": (D_IN, [("l0.q", OUTS[0]), ("l0.k", OUTS[1]), ("l0.v", OUTS[2])])},
        {"o": (D_IN, [("l1.o", 70)]), "down": (40, [("l1.down", D_IN)])},
    ]
    gen = torch.Generator().manual_seed(5)

    def adapter(r, modules):
        shapes = {"l0.q": (D_IN, OUTS[0]), "l0.k": (D_IN, OUTS[1]), "l0.v": (D_IN, OUTS[2])}
        shapes |= {"l1.o": (D_IN, 70), "l1.down": (40, D_IN)}
        return {
            m: (
                torch.randn(r, shapes[m][0], generator=gen).to(source_dtype),
                torch.randn(shapes[m][1], r, generator=gen).to(source_dtype),
            )
            for m in modules
        }

    whole = adapter(7, ["l0.q", "l0.k", "l0.v", "l1.o", "l1.down"])
    part = adapter(5, ["l0.k", "l1.down"])  # the same pool (rank bucket 8), fewer modules
    stacks = {
        kernel: LoraStacks(layout, 3, 8, stack_dtype, torch.device("cpu"), native=kernel)
        for kernel in (None, native)
    }
    for kernel, stack in stacks.items():
        assert stack.blocked and stack.native is kernel
        stack.load(0, whole)
        stack.load(2, whole)
        stack.load(2, part)
    assert stacks[native].ranks == stacks[None].ranks == [7, 0, 5]
    (pool,) = stacks[native].pools.values()
    (copies,) = stacks[None].pools.values()
    for layer, groups in enumerate(pool.groups):
        for name, group in groups.items():
            assert group.storage is not None and group.storage.dtype == stack_dtype
            assert torch.equal(group.storage, copies.groups[layer][name].storage)
    located = stacks[native].locate(2)
    assert located is not None
    local, down = located[1], pool.groups[1]["down"]
    a, b = part["l1.down"]
    assert torch.equal(down.a(local, 0)[:5], a.to(stack_dtype))
    assert torch.equal(down.bt(0, local)[:5], b.T.to(stack_dtype))
    assert not pool.groups[0]["qkv"].a(local, 0).any()  # l0.q: the whole adapter's, cleared
    before = down.storage.clone()
    with pytest.raises(ValueError):  # rank 9 in a pool of rank 8
        native.lora_set_slot([(down, local, 0, torch.randn(9, 40), torch.randn(D_IN, 9))])
    assert torch.equal(down.storage, before)  # nothing written


def test_stacks_keep_each_adapter_in_the_pool_of_its_rank_not_the_limits():
    """Storage follows what is loaded: a pool per rank bucket, as many local slots as its
    adapters need (whatever the engine's slot numbers), given back once they are gone."""
    layout = [{"qkv": (D_IN, [("l0.q", OUTS[0]), ("l0.k", OUTS[1]), ("l0.v", OUTS[2])])}]
    stacks = LoraStacks(layout, max_slots=16, max_rank=64, dtype=torch.float32, device="cpu")
    assert stacks.nbytes() == 0
    # A of three members, B.T of each in whole blocks of columns (a CPU's stacks), float32
    per_rank = (D_IN * 3 + sum(stored_width(out, True) for out in OUTS)) * 4
    assert per_rank == slot_bytes(layout, 1, torch.float32, blocked=True)
    a4, b4 = torch.randn(4, D_IN), torch.randn(OUTS[0], 4)
    stacks.load(9, {"l0.q": (a4, b4)})
    assert {b: p.num_slots for b, p in stacks.pools.items()} == {8: 1}
    assert stacks.nbytes() == 8 * per_rank  # one slot at rank 8, not 10 slots at rank 64
    a12, b12 = torch.randn(12, D_IN), torch.randn(OUTS[2], 12)
    stacks.load(4, {"l0.v": (a12, b12)})
    stacks.load(2, {"l0.q": (a4 * 2, b4)})
    assert {b: p.num_slots for b, p in stacks.pools.items()} == {8: 2, 16: 1}
    assert stacks.nbytes() == (2 * 8 + 16) * per_rank
    pool, local = stacks.locate(4) or (None, -1)
    assert pool is stacks.pools[16]
    torch.testing.assert_close(pool.groups[0]["qkv"].bt(2, local)[:12], b12.T)
    generation = stacks.generation
    stacks.fit({2})  # slots 9 and 4 were evicted: slot 2 moves down, the rank-16 pool stays
    assert stacks.generation > generation and stacks.ranks[4] == stacks.ranks[9] == 0
    assert {b: p.num_slots for b, p in stacks.pools.items()} == {8: 1, 16: 1}
    stacks.fit({2})  # ... until it is found empty twice
    assert {b: p.num_slots for b, p in stacks.pools.items()} == {8: 1}
    pool, local = stacks.locate(2) or (None, -1)
    assert local == 0 and pool is not None
    torch.testing.assert_close(pool.groups[0]["qkv"].a(0, 0)[:4], a4 * 2)
    stacks.load(2, {"l0.v": (a12, b12)})  # a larger adapter in the same slot changes pool
    assert {b: p.num_slots for b, p in stacks.pools.items()} == {8: 1, 16: 1}
    assert stacks.place[2] == (16, 0) and stacks.ranks[2] == 12
    with pytest.raises(ValueError, match="slot 16"):
        stacks.load(16, {"l0.q": (a4, b4)})
    with pytest.raises(ValueError, match="rank 65"):
        stacks.load(0, {"l0.q": (torch.randn(65, D_IN), torch.randn(OUTS[0], 65))})


def test_auto_slots_follow_the_ranks_loaded_and_give_memory_back(load_tiny, tmp_path):
    """--max-loras auto: each adapter costs its own pool's rank, so the slot budget holds more
    slots of small adapters than of large ones, and the stacks shrink back once the large
    adapter is gone."""
    loaded = load_tiny()
    runner = ModelRunner(loaded, num_slots=None, max_rank=32, max_rows=16)
    runner.slot_budget = runner.rank_bytes * 8 * 6  # six slots at rank 8
    assert runner.slot_limit()[0] == 6 and "rank 8" in runner.slot_limit()[1]
    spec = BaseModelSpec(runner.target_shapes, max_rank=32, fingerprint="tiny")
    weights = {}
    for name, rank in (("small", 4), ("large", 32)):
        peft = add_peft_adapter(
            copy.deepcopy(loaded.model), name, LoraConfig(r=rank, target_modules="all-linear"), 1
        )
        peft.save_pretrained(tmp_path, selected_adapters=[name])
        weights[name] = load_adapter(tmp_path / name, spec)
    runner.load_adapter(0, weights["small"])
    assert runner.slot_limit()[0] == 6
    runner.load_adapter(1, weights["large"])
    assert sorted(runner.lora.pools) == [8, 32]
    assert runner.slot_limit()[0] == 2  # 2 loaded in 40 of 48 rank units: none more at 32
    runner.fit_lora({0})  # the large adapter left slot 1: its pool goes at the next fit
    assert runner.slot_limit()[0] == 2  # (its memory still counts)
    runner.fit_lora({0})
    assert {b: p.num_slots for b, p in runner.lora.pools.items()} == {8: 1}
    assert runner.slot_limit()[0] == 6
    # One large adapter among small ones: 4 slots if each were padded to rank 32, 6 by pools.
    runner.slot_budget = runner.rank_bytes * 32 * 4
    for slot, name in enumerate(("large", "small", "small", "small")):
        runner.load_adapter(slot, weights[name])
    assert runner.lora.nbytes() == runner.rank_bytes * (32 + 3 * 8)  # pool 8 grown one by one
    assert runner.slot_limit()[0] == 4 + (32 * 4 - 32 - 3 * 8) // 32 == 6
    runner.slot_budget = None  # an explicit --max-loras: the limit is the flag
    assert runner.slot_limit()[0] == runner.lora.max_slots == 16


@pytest.mark.parametrize("decode_slots", [[1, 1, 1], [0, 2, NO_ADAPTER]])
def test_float32_adapters_add_into_bf16_activations(decode_slots):
    """--lora-dtype float32 under a bf16 base: the delta is computed in float32 and added
    into the bf16 outputs (one adapter's run takes plain matmuls, several the gather path)."""
    torch.manual_seed(0)
    group = random_group()
    x = torch.randn(len(decode_slots), D_IN, dtype=torch.bfloat16)
    base = [torch.randn(len(decode_slots), out).bfloat16() for out in OUTS]
    outs = [b.clone() for b in base]
    add_lora(outs, x, group, plan_lora(decode_slots, [], RANKS, x.device))
    want = reference(x.float(), group, RANKS, decode_slots)
    for o, b, w in zip(outs, base, want, strict=True):
        assert o.dtype == torch.bfloat16
        torch.testing.assert_close(o.float(), b.float() + w, rtol=8e-3, atol=1e-2)


@pytest.mark.cpu_isa
def test_bf16_adapters_on_float32_activations_compute_in_float32(native):
    """`--lora-dtype auto` where the compute dtype is float32 on a CPU: bf16 weights, read as
    stored and widened, on float32 rows; every path (the gather, the segments, the native
    kernel at each instruction set) equals the float32 spec of those weights, not a bf16 one."""
    torch.manual_seed(0)
    group = random_group(torch.bfloat16)
    decode = [2, 0, NO_ADAPTER, 0]
    segments = [Segment(1, 4, 9)]
    token_slots = decode + [1] * 5
    x = torch.randn(len(token_slots), D_IN)
    want = reference(x, group, RANKS, token_slots)
    assert all(w.dtype == torch.float32 for w in want)
    n = len(token_slots)
    plans = {"torch": plan_lora(decode, segments, RANKS, x.device)}
    assert plans["torch"].decode is not None and plans["torch"].segments
    for isa in cpu_kernels.ISAS[: cpu_kernels.ISAS.index(native.isa) + 1]:
        plans[isa] = plan_lora(decode, segments, RANKS, x.device, native, n)
    for name, plan in plans.items():
        outs = [torch.zeros(n, out) for out in OUTS]
        if name == "torch":
            add_lora(outs, x, group, plan)
        else:
            native.lora_add(outs, x, group, 16, torch.tensor(token_slots), isa=name)
        for o, w in zip(outs, want, strict=True):
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-4, msg=name)


def test_lora_dtype_auto_keeps_bf16_weights_where_auto_chose_float32(load_tiny):
    """A float32 compute dtype that --dtype auto measured on a CPU: bf16 LoRA weights; one
    asked for explicitly, or any other dtype: the compute dtype's."""
    loaded = load_tiny()
    assert loaded.dtype == torch.float32 and auto_lora_dtype(loaded, True) == torch.float32
    measured = dataclasses.replace(loaded, dtype_measured=True)
    assert auto_lora_dtype(measured, True) == torch.bfloat16
    assert auto_lora_dtype(measured, False) == torch.float32  # no native kernel to widen them
    runner = ModelRunner(measured, num_slots=2, max_rank=8, compile=False)
    assert runner.linears.native is not None and runner.lora.dtype == torch.bfloat16
    if importlib.util.find_spec("triton") is not None:
        runner = ModelRunner(measured, num_slots=2, max_rank=8, compile=False, kernels="triton")
        assert runner.lora.dtype == torch.float32  # Triton's kernels take float32 weights
    as_bf16 = dataclasses.replace(measured, dtype=torch.bfloat16)
    assert auto_lora_dtype(as_bf16, True) == torch.bfloat16
    on_cuda = dataclasses.replace(measured, device=torch.device("cuda"))
    assert auto_lora_dtype(on_cuda, True) == torch.float32


def test_one_adapters_run_of_decode_tokens_is_planned_as_a_segment():
    """A lone stream (or one tenant's batch) needs no padded block: its decode tokens are a
    segment, joined with a prompt run of the same adapter right after them."""
    plan = plan_lora([1, 1, 1], [Segment(1, 3, 5)], RANKS, torch.device("cpu"))
    assert plan.decode is None and plan.segments == [(1, 0, 5)]
    mixed = plan_lora([0, 1], [], RANKS, torch.device("cpu"))
    assert mixed.decode is not None and mixed.segments == []


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    library = cpu_kernels.load(tmp_path_factory.mktemp("kernels"))
    assert library is not None, "the native kernel did not build with this machine's C compiler"
    return library


@pytest.mark.cpu_isa
@pytest.mark.parametrize(
    ("decode_slots", "segments"),
    [
        ([1], []),  # a lone stream
        ([0, 2, NO_ADAPTER, 3], []),  # mixed ranks, a base token, a rank-0 slot
        ([2], [Segment(0, 1, 4)]),  # a decode token and a short prompt of another adapter
        ([], [Segment(NO_ADAPTER, 0, 2), Segment(1, 2, 4)]),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_few_tokens_take_the_native_kernel_and_equal_the_spec(
    native, decode_slots, segments, dtype
):
    torch.manual_seed(0)
    group = random_group(dtype)
    n = max([len(decode_slots), *(g.end for g in segments)])
    token_slots = decode_slots + [NO_ADAPTER] * (n - len(decode_slots))
    for g in segments:
        token_slots[g.start : g.end] = [g.slot] * (g.end - g.start)
    x = torch.randn(n, D_IN).to(dtype)
    plan = plan_lora(decode_slots, segments, RANKS, x.device, native, n)
    assert plan.native is not None and plan.decode is None and not plan.segments
    want = reference(x.float(), group, RANKS, token_slots)
    base = [torch.randn(n, out).to(dtype) for out in OUTS]
    for scale in (1.0, -1.0):  # -1: a merged adapter's delta taken back out
        outs = [b.clone() for b in base]
        add_lora(outs, x, group, plan, scale=scale)
        for o, b, w in zip(outs, base, want, strict=True):
            expected = b.float() + scale * w
            if dtype == torch.float32:
                torch.testing.assert_close(o, expected, rtol=1e-5, atol=1e-4)
            else:  # bf16 stacks against the float32 spec of the same (rounded) weights
                torch.testing.assert_close(o.float(), expected, rtol=2e-2, atol=0.15)


def test_long_runs_of_one_adapter_keep_the_matmuls(native):
    """Decode tokens go to the native kernel unless one adapter has more than `run_tokens`
    of them; prompt chunks that long keep the matmul path, shorter ones join the native
    kernel's tokens. The kernel takes longer runs where it multiplies bf16 in place."""
    cpu = torch.device("cpu")
    for n in (cpu_kernels.LORA_RUN_TOKENS, cpu_kernels.LORA_DOT_RUN_TOKENS):
        mixed = [0] * n + [1] * n
        segment = [Segment(2, 2 * n, 3 * n + 1)]
        plan = plan_lora(mixed, segment, RANKS, cpu, native, 3 * n + 1, n)
        assert plan.native is not None and plan.decode is None
        assert plan.native.slots.tolist() == mixed + [NO_ADAPTER] * (n + 1)
        assert plan.segments == [(2, 2 * n, 3 * n + 1)]
        crowd = plan_lora(
            [0] * (n + 1) + [1], [Segment(1, n + 2, n + 5)], RANKS, cpu, native, n + 5, n
        )
        assert crowd.decode is not None and crowd.native is not None
        assert crowd.native.slots.tolist() == [NO_ADAPTER] * (n + 2) + [1] * 3
    base_only = plan_lora([NO_ADAPTER], [], RANKS, cpu, native, 1)
    assert base_only.empty and base_only.native is None
    assert native.lora_run_tokens(torch.bfloat16, torch.bfloat16) == bf16_run_tokens(native.isa)
    for weights, rows in ((torch.float32, torch.bfloat16), (torch.float32, torch.float32)):
        assert native.lora_run_tokens(weights, rows) == cpu_kernels.LORA_RUN_TOKENS
    # float32 rows, bf16 weights (widened by torch at each matmul): the kernel, to 512 tokens
    assert native.lora_run_tokens(torch.bfloat16, torch.float32) == (
        cpu_kernels.LORA_FLOAT32_RUN_TOKENS
    )


def bf16_run_tokens(isa: str) -> int:
    """The longest run of one adapter the kernel takes in bf16 at this instruction set."""
    return {
        "avx512bf16": cpu_kernels.LORA_DOT_RUN_TOKENS,
        "amx": cpu_kernels.LORA_AMX_RUN_TOKENS,
    }.get(isa, cpu_kernels.LORA_RUN_TOKENS)


def rounded_rows(isa: str, dtype: torch.dtype, slots: list[int]) -> set[int]:
    """The rows whose shrunk values lora_add rounds to bf16: those of runs of one adapter longer
    than LORA_RUN_TOKENS, which it takes with BF16 dot products (AVX512-BF16, on AMX tiles
    where the CPU has them; bf16 rows and weights)."""
    if isa not in ("avx512bf16", "amx") or dtype != torch.bfloat16:
        return set()
    rows: set[int] = set()
    start = 0
    for i in range(1, len(slots) + 1):
        if i == len(slots) or slots[i] != slots[start]:
            if slots[start] != NO_ADAPTER and i - start > cpu_kernels.LORA_RUN_TOKENS:
                rows.update(range(start, i))
            start = i
    return rows


def spec(x, group, ranks, slots, rounded=frozenset()):
    """Each member's delta in float32 from the (rounded) weights; for the rows in `rounded`
    the shrunk values rounded to bf16 in between, as a bf16 matmul pair (and the kernel's
    dot-product passes) round them."""
    at = group.at.float()
    bts = [group.bt(j, slice(None)).float() for j in range(len(group.out_features))]
    out = []
    for j, bt in enumerate(bts):
        delta = torch.zeros(len(slots), bt.shape[2])
        for i, s in enumerate(slots):
            if s == NO_ADAPTER:
                continue
            r = ranks[s]
            shrunk = x[i : i + 1].float() @ at[s, :, j, :r]
            if i in rounded:
                shrunk = shrunk.to(torch.bfloat16).float()
            delta[i] = (shrunk @ bt[s, :r])[0]
        out.append(delta)
    return out


@pytest.mark.cpu_isa
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_native_kernel_shares_each_adapters_weights_across_its_tokens(native, dtype):
    """Every instruction set the machine has, against the spec: runs of one adapter longer than
    a tile of rows, adapters interleaved, base tokens between, and widths that take the wide
    vector passes, single vectors and the scalar tail."""
    torch.manual_seed(0)
    d_in, outs, ranks = 80, [600, 130], [32, 5, 17]
    group = LoraGroup(d_in, outs, len(ranks), 32, dtype, torch.device("cpu"))
    for slot, r in enumerate(ranks):
        for member, out in enumerate(outs):
            group.set_slot(slot, member, torch.randn(r, d_in) / 4, torch.randn(out, r) / 4)
    slots = [0] * 7 + [1] * 2 + [NO_ADAPTER] + [1] * 3 + [2] * 5 + [0]
    x = torch.randn(len(slots), d_in).to(dtype)
    for isa in cpu_kernels.ISAS[: cpu_kernels.ISAS.index(native.isa) + 1]:
        want = spec(x, group, ranks, slots, rounded_rows(isa, dtype, slots))
        got = [torch.ones(len(slots), out, dtype=dtype) for out in outs]
        native.lora_add(got, x, group, 32, torch.tensor(slots), -1.0, isa=isa)
        for g, w in zip(got, want, strict=True):
            if dtype == torch.float32:
                torch.testing.assert_close(g, 1 - w, rtol=1e-5, atol=1e-4, msg=isa)
            else:  # the sums are float32, each output rounded once to bf16
                torch.testing.assert_close(g.float(), 1 - w, rtol=8e-3, atol=1e-2, msg=isa)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_threads_shares_of_a_step_add_up_to_the_spec(native, dtype):
    """A step large enough to be split between threads (contiguous shares of its work items,
    by cost): prompt runs, decode tokens of many adapters and base tokens, the same sums on one
    thread and on several, and equal to the spec."""
    torch.manual_seed(4)
    d_in, outs, ranks = 256, [320, 64], [16] * 12
    group = LoraGroup(d_in, outs, len(ranks), 16, dtype, torch.device("cpu"))
    for slot, r in enumerate(ranks):
        for member, out in enumerate(outs):
            group.set_slot(slot, member, torch.randn(r, d_in) / 8, torch.randn(out, r) / 8)
    slots = [3] * 70 + [NO_ADAPTER] * 3 + [s for s in range(12) for _ in range(2)] + [5] * 9
    x = torch.randn(len(slots), d_in).to(dtype)
    got = {}
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got[n] = [torch.ones(len(slots), out, dtype=dtype) for out in outs]
            native.lora_add(got[n], x, group, 16, torch.tensor(slots), 0.5)
    finally:
        torch.set_num_threads(threads)
    want = spec(x, group, ranks, slots, rounded_rows(native.isa, dtype, slots))
    rtol, atol = (1e-5, 1e-4) if dtype == torch.float32 else (8e-3, 1e-2)
    for one, two, w in zip(got[1], got[2], want, strict=True):
        assert torch.equal(one, two)
        torch.testing.assert_close(two.float(), 1 + w / 2, rtol=rtol, atol=atol)


@pytest.mark.cpu_isa
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("outs", [[40], [112, 24, 41]])
def test_odd_sizes_and_narrow_pools_equal_the_spec(native, dtype, outs):
    """The edges of every pass: an odd input width and odd ranks (a last row with no pair), a
    pool of rank capacity 8 (fewer columns than a vector: one member's shrink is all tail, three
    members' is one vector and a tail), and widths that end in three vectors, two, or a few
    columns; a prompt-long run of one adapter (the BF16 passes where the CPU has them) beside
    short ones (the float32 sums)."""
    torch.manual_seed(2)
    d_in, ranks = 37, [8, 3, 5]
    group = LoraGroup(d_in, outs, len(ranks), 8, dtype, torch.device("cpu"))
    for slot, r in enumerate(ranks):
        for member, out in enumerate(outs):
            group.set_slot(slot, member, torch.randn(r, d_in) / 4, torch.randn(out, r) / 4)
    slots = [1] * (cpu_kernels.LORA_RUN_TOKENS + 6) + [0] * 2 + [NO_ADAPTER] + [2] * 3
    x = torch.randn(len(slots), d_in).to(dtype)
    for rank in (8, 5):  # the step's rank: all of the capacity, or an odd part of it
        used = [min(r, rank) for r in ranks]
        for isa in cpu_kernels.ISAS[: cpu_kernels.ISAS.index(native.isa) + 1]:
            want = spec(x, group, used, slots, rounded_rows(isa, dtype, slots))
            got = [torch.ones(len(slots), out, dtype=dtype) for out in outs]
            native.lora_add(got, x, group, rank, torch.tensor(slots), 0.5, isa=isa)
            for g, w in zip(got, want, strict=True):
                if dtype == torch.float32:
                    torch.testing.assert_close(g, 1 + w / 2, rtol=1e-5, atol=1e-4, msg=isa)
                else:
                    torch.testing.assert_close(g.float(), 1 + w / 2, rtol=8e-3, atol=1e-2, msg=isa)


@pytest.mark.cpu_isa
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("slot", [0, 1])
def test_a_lone_row_at_real_widths_equals_the_spec(native, dtype, slot):
    """One stream's token (one row of one adapter) at the embedded model's widths, with a
    member whose width is no multiple of a vector: the wide passes, single vectors and the
    scalar tail of one row."""
    torch.manual_seed(1)
    d_in, outs, ranks = 576, [576, 200, 192], [16, 7]
    group = LoraGroup(d_in, outs, len(ranks), 16, dtype, torch.device("cpu"))
    for s_, r in enumerate(ranks):
        for member, out in enumerate(outs):
            group.set_slot(s_, member, torch.randn(r, d_in) / 8, torch.randn(out, r) / 8)
    x = torch.randn(1, d_in).to(dtype)
    for isa in cpu_kernels.ISAS[: cpu_kernels.ISAS.index(native.isa) + 1]:
        want = spec(x, group, ranks, [slot])
        got = [torch.ones(1, out, dtype=dtype) for out in outs]
        native.lora_add(got, x, group, 16, torch.tensor([slot]), 1.0, isa=isa)
        for g, w in zip(got, want, strict=True):
            if dtype == torch.float32:
                torch.testing.assert_close(g, 1 + w, rtol=1e-5, atol=1e-4, msg=isa)
            else:
                torch.testing.assert_close(g.float(), 1 + w, rtol=8e-3, atol=2e-2, msg=isa)


@pytest.mark.cpu_isa
@pytest.mark.parametrize(("d_in", "outs"), [(576, [576, 192, 192]), (1536, [576])])
def test_prompt_runs_at_real_widths_equal_the_spec(native, d_in, outs):
    """Prompt chunks of one adapter at the embedded model's widths (the fused q/k/v group and
    the MLP's down projection), bf16: the BF16 passes, on AMX tiles where the CPU has them
    (whole tiles of rows and a partial one, a rank that fills its capacity and an odd one,
    columns padded to whole tiles), equal the spec with the shrunk values rounded to bf16;
    every lower instruction set equals its own spec."""
    torch.manual_seed(3)
    ranks = [16, 7]
    group = LoraGroup(d_in, outs, len(ranks), 16, torch.bfloat16, torch.device("cpu"))
    for slot, r in enumerate(ranks):
        for member, out in enumerate(outs):
            group.set_slot(slot, member, torch.randn(r, d_in) / 8, torch.randn(out, r) / 8)
    slots = [0] * 100 + [1] * 70 + [NO_ADAPTER] * 2 + [0] * 3
    x = torch.randn(len(slots), d_in).to(torch.bfloat16)
    for isa in cpu_kernels.ISAS[: cpu_kernels.ISAS.index(native.isa) + 1]:
        want = spec(x, group, ranks, slots, rounded_rows(isa, torch.bfloat16, slots))
        got = [torch.ones(len(slots), out, dtype=torch.bfloat16) for out in outs]
        native.lora_add(got, x, group, 16, torch.tensor(slots), 0.5, isa=isa)
        for g, w in zip(got, want, strict=True):
            assert bool((g[170:172] == 1).all()), isa  # base tokens: nothing added
            torch.testing.assert_close(g.float(), 1 + w / 2, rtol=8e-3, atol=2e-2, msg=isa)


@pytest.mark.parametrize("rank", [16, 7])
def test_decode_rows_on_amx_tiles_keep_the_float32_sums(native, rank):
    """Runs of one adapter long enough for the tiles but no prompt chunk (one tenant's decode
    rows in a batch of many streams): the shrunk values reach the expand as two bf16 parts, so
    the outputs are those of the float32 passes but for the order of the sums (a few in a
    thousand off by one bf16 step), where rounding them once moved about one in five."""
    if native.isa != "amx":
        pytest.skip("this CPU has no AMX tiles (or Linux did not grant them)")
    torch.manual_seed(3)
    d_in, outs = 576, [576, 192, 192]
    group = LoraGroup(d_in, outs, 2, 16, torch.bfloat16, torch.device("cpu"))
    for slot in (0, 1):
        for member, out in enumerate(outs):
            group.set_slot(slot, member, torch.randn(rank, d_in) / 8, torch.randn(out, rank) / 8)
    slots = torch.tensor([0] * 40 + [1] * 33)  # two runs of tiles, each with a partial one
    x = torch.randn(len(slots), d_in).to(torch.bfloat16)
    got = {}
    for isa in ("avx512bf16", "amx"):
        got[isa] = [torch.ones(len(slots), out, dtype=torch.bfloat16) for out in outs]
        native.lora_add(got[isa], x, group, rank, slots, 0.5, isa=isa)
    for sums, tiles in zip(got["avx512bf16"], got["amx"], strict=True):
        assert not bool((tiles == 1).all())
        differ = (sums.float() - tiles.float()).abs() > 0
        assert differ.float().mean().item() < 0.01
        torch.testing.assert_close(tiles.float(), sums.float(), rtol=8e-3, atol=1e-2)


def test_a_slot_past_the_stacks_is_refused_with_nothing_added(native):
    """A row's slot index past the stacks' slots (a bug upstream) would read another
    adapter's weights or memory outside them: the kernel refuses the call and adds nothing."""
    group = LoraGroup(64, [64, 32], 2, 8, torch.float32, torch.device("cpu"))
    for member, out in enumerate([64, 32]):
        group.set_slot(1, member, torch.randn(8, 64), torch.randn(out, 8))
    x = torch.randn(3, 64)
    got = [torch.ones(3, 64), torch.ones(3, 32)]
    with pytest.raises(IndexError, match="past the stacks' 2 slots"):
        native.lora_add(got, x, group, 8, torch.tensor([1, 1, 2]))
    assert all(bool((g == 1).all()) for g in got)
    native.lora_add(got, x, group, 8, torch.tensor([1, -1, 1]))  # -1: no adapter
    assert not bool((got[0][0] == 1).all()) and bool((got[0][1] == 1).all())


def test_prompt_runs_go_to_the_native_kernel_as_long_as_it_says(load_tiny):
    """The runner plans a prompt chunk of one adapter for the native kernel up to the length
    `lora_run_tokens` gives for its dtypes (longer with BF16 dot products, bf16 everywhere,
    and longer still on float32 rows with bf16 weights), and for the matmuls past it."""
    cases = [("float32", torch.float32), ("float32", torch.bfloat16), ("bfloat16", None)]
    for dtype, lora_dtype in cases:
        loaded = load_tiny(dtype=dtype)
        runner = ModelRunner(loaded, num_slots=2, max_rank=8, lora_dtype=lora_dtype)
        native = runner.linears.native
        if native is None:
            pytest.skip("no native kernels on this machine")
        name = next(iter(runner.lora.modules))
        fan_in, fan_out = runner.lora.shape(name)
        runner.lora.load(0, {name: (torch.randn(4, fan_in), torch.randn(fan_out, 4))})
        limit = native.lora_run_tokens(runner.lora.dtype, loaded.dtype)
        if lora_dtype == torch.float32:
            assert limit == cpu_kernels.LORA_RUN_TOKENS
        elif lora_dtype == torch.bfloat16:
            assert limit == cpu_kernels.LORA_FLOAT32_RUN_TOKENS
        else:
            assert limit == bf16_run_tokens(native.isa)
        for length, natively in ((limit, True), (limit + 1, False)):
            (pool_plan,), _ = runner.lora_plans([], [Segment(0, 0, length)])
            plan = pool_plan.plan
            assert (plan.native is not None) == natively, (dtype, lora_dtype, length)
            assert plan.segments == ([] if natively else [(0, 0, length)])


def test_stacks_the_native_kernel_cannot_take_keep_the_torch_paths(load_tiny):
    """float16 stacks (an explicit --lora-dtype float16) are planned on torch's paths, so a
    small step still adds its LoRA; bf16/float32 stacks go to the native kernel."""
    loaded = load_tiny()
    for dtype, native in ((torch.float32, True), (torch.float16, False)):
        runner = ModelRunner(loaded, num_slots=2, max_rank=8, lora_dtype=dtype)
        name = next(iter(runner.lora.modules))
        fan_in, fan_out = runner.lora.shape(name)
        runner.lora.load(0, {name: (torch.randn(4, fan_in), torch.randn(fan_out, 4))})
        (pool_plan,), unmerge = runner.lora_plans([0], [])
        plan = pool_plan.plan
        assert not unmerge and not plan.empty and (plan.native is not None) == native
        assert native or plan.segments == [(0, 0, 1)]
