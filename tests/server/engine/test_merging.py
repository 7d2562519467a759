"""Merging an adapter into the base: the policy's decisions (hysteresis, interval, queue mix),
and serving while merged: the merged adapter's requests and everyone else's get what they get
unmerged (exactly on a float32 model, to bf16 rounding on the 4-bit one)."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import torch

from loraplex.core.errors import Exhausted, OverMemoryBudget, status_code
from loraplex.core.types import AdapterWeights
from loraplex.server.config import MergeSettings
from loraplex.server.engine import merging
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.linear import ROW_BUCKETS, BaseLinears
from loraplex.server.engine.merging import MergePolicy, TokenWindow
from loraplex.server.engine.model_runner import DecodeWork, ModelRunner, PrefillWork
from loraplex.server.engine.state import EngineSnapshot, MergeState
from tests.server.engine.test_engine import PROMPTS, submit

M, X = ("m", 1), ("x", 1)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def policy(**kwargs) -> tuple[MergePolicy, Clock]:
    clock = Clock()
    settings = MergeSettings(**{"window_tokens": 100, "min_interval_s": 5.0, **kwargs})
    return MergePolicy(settings, clock), clock


def feed(p: MergePolicy, counts: dict, steps: int = 10) -> None:
    for _ in range(steps):
        p.observe(Counter(counts))


def test_window_keeps_the_last_tokens():
    window = TokenWindow(10)
    for _ in range(5):
        window.add(Counter({M: 4}))
    window.add(Counter({X: 6}))
    assert window.total >= 10 and window.counts[X] == 6 and window.counts[M] <= 8
    assert window.total - 4 < 10  # the oldest step left once the rest covered the window


def test_merges_a_dominant_adapter_and_not_a_half_share():
    p, _ = policy()
    feed(p, {M: 5, X: 5})
    assert p.decide(None, Counter()) is None  # 50%: never worth it
    p, _ = policy()
    feed(p, {M: 19, None: 1})
    assert p.decide(None, Counter()) == M  # 95%


def test_too_few_tokens_seen_decide_nothing():
    p, _ = policy()
    p.observe(Counter({M: 10}))
    assert p.decide(None, Counter()) is None


def test_under_light_load_the_window_follows_the_last_seconds():
    """A lone stream never brings half a window of tokens: after half the window's time the
    policy judges what it has, and tokens older than the window's time no longer count."""
    p, clock = policy(window_seconds=10.0)
    feed(p, {X: 40})  # 400 tokens of X at t=0 (the window holds the last 100)
    clock.now = 20.0  # then only M, a little, for a while: X has aged out
    feed(p, {M: 2}, steps=5)
    assert p.window.counts[X] == 0 and p.decide(None, Counter()) == M
    p, clock = policy(window_seconds=10.0)
    clock.now = 100.0  # (a while after start: the model loaded, say)
    feed(p, {M: 2}, steps=5)  # 10 tokens: too few to judge at once, queued ones or not...
    assert p.decide(None, Counter()) is None
    assert p.decide(None, Counter({M: 20})) is None
    clock.now = 106.0  # ...but enough once steps were observed for half the window's time
    assert p.decide(None, Counter()) == M


def test_hysteresis_and_minimum_interval():
    p, clock = policy()
    feed(p, {M: 19, X: 1})
    assert p.decide(None, Counter()) == M
    p.changed()  # merged at t=0
    feed(p, {M: 8, X: 2})  # 80%: below the merge share, above the unmerge share
    clock.now = 10.0
    assert p.decide(M, Counter()) == M  # stays merged
    assert p.decide(None, Counter()) is None  # and would not merge from unmerged
    p.changed()  # (say it changed at t=10)
    feed(p, {M: 5, X: 5})
    clock.now = 12.0
    assert p.decide(M, Counter()) == M  # within the minimum interval of the last change
    clock.now = 15.0
    assert p.decide(M, Counter()) is None  # 50% < 75%: unmerge


def test_queued_tokens_count_and_a_new_leader_takes_over():
    p, clock = policy()
    feed(p, {M: 10})
    clock.now = 100.0
    # What is queued is about to run: mostly another adapter.
    assert p.decide(M, Counter({X: 2000})) == X
    assert p.decide(None, Counter({X: 50, M: 50})) is None


def test_policy_off_never_changes_anything():
    p, clock = policy(policy="off")
    feed(p, {M: 100})
    clock.now = 100.0
    assert p.decide(None, Counter()) is None
    assert p.decide(X, Counter()) == X


def test_settings_are_checked():
    with pytest.raises(ValueError, match="unmerge_share"):
        MergeSettings(merge_share=0.5, unmerge_share=0.8)
    with pytest.raises(ValueError, match="auto or off"):
        MergeSettings(policy="always")  # type: ignore[arg-type]


def _runner(load_tiny, quantization: str, dtype: str) -> ModelRunner:
    loaded = load_tiny(quantization=quantization, dtype=dtype)
    runner = ModelRunner(loaded, num_slots=3, max_rank=8)
    gen = torch.Generator().manual_seed(0)
    for slot, targets in ((0, None), (1, ("q_proj", "down_proj"))):
        modules = {}
        for name, (fan_in, fan_out) in runner.target_shapes.items():
            if targets is None or name.rsplit(".", 1)[-1] in targets:
                a = torch.randn(8, fan_in, generator=gen) * 0.3
                b = torch.randn(fan_out, 8, generator=gen) * 0.05
                modules[name] = (a, b)
        runner.load_adapter(slot, AdapterWeights(modules, 8, 16.0, ("all",)))
    return runner


def _step(runner: ModelRunner, slots: list[int], fed: list[int] | None = None) -> torch.Tensor:
    """A prefill of every prompt, then one decode step of each: logits of both steps. The
    decode step feeds `fed` (default: each prefill's argmax), so two runs compared logit by
    logit decode the same tokens even where a near-tie sends their argmax different ways."""
    cache = runner.cache
    prompts = PROMPTS[: len(slots)]
    rows = [cache.allocate(len(p) + 1) for p in prompts]
    try:
        prefill = runner.step(
            [],
            [
                PrefillWork(row=r, slot=s, tokens=p, start=0, wants_logits=True)
                for r, s, p in zip(rows, slots, prompts, strict=True)
            ],
        )
        decode = runner.step(
            [
                DecodeWork(row=r, slot=s, token=token, position=len(p))
                for r, s, p, token in zip(
                    rows, slots, prompts, fed or prefill.argmax(-1).tolist(), strict=True
                )
            ],
            [],
        )
    finally:
        for row, prompt in reversed(list(zip(rows, prompts, strict=True))):
            cache.free(row, len(prompt) + 1, 0)
    return torch.cat([prefill, decode])


@pytest.mark.cpu_isa
@pytest.mark.parametrize(
    ("quantization", "dtype", "tolerance"),
    [("none", "float32", 1e-4), ("nf4", "bfloat16", 0.08)],
)
def test_merged_base_serves_every_adapter_as_unmerged(load_tiny, quantization, dtype, tolerance):
    """Merged adapter (slot 0), another adapter (slot 1) and the base, prefill and decode in
    one batch: the same logits as without the merge. Tolerance: float32 rounding; for the
    4-bit base in bf16, bf16 rounding (of the merged weights and of every activation),
    relative to the logits' range: seen up to 0.052 (on an AVX2 CPU, and with dense kernels)."""
    runner = _runner(load_tiny, quantization, dtype)
    slots = [0, 1, -1, 0]
    unmerged = _step(runner, slots)
    fed = unmerged[: len(slots)].argmax(-1).tolist()
    scale = unmerged.abs().max()
    layers = runner.merge(0)
    assert layers == len(runner.target_shapes)  # slot 0 targets every layer
    merged = _step(runner, slots, fed)
    assert (merged - unmerged).abs().max() <= tolerance * scale
    _assert_same_choice(merged, unmerged, tolerance * scale)
    runner.merge(1)  # another adapter: only the layers it targets get a dense copy
    assert len(runner.forward.merged) == 2 * len(runner.model.model.layers)
    assert (_step(runner, slots, fed) - unmerged).abs().max() <= tolerance * scale
    runner.unmerge()
    assert runner.forward.merged == set() and runner.merged_slot is None
    assert torch.equal(_step(runner, slots), unmerged)  # the 4-bit weights were never touched


def _assert_same_choice(logits: torch.Tensor, reference: torch.Tensor, tolerance: float) -> None:
    """Greedy picks the same token, or one the reference scores within `tolerance` of its best
    (a near-tie that rounding may break either way: on an AVX2 CPU the bf16 rounding differs)."""
    picked = logits.argmax(-1, keepdim=True)
    best = reference.max(-1).values
    assert (reference.gather(-1, picked).squeeze(-1) >= best - tolerance).all()


def test_engine_merges_dominant_traffic_and_outputs_stay_the_same(setup):
    """The policy on: traffic all on one adapter merges it, requests keep their outputs; a
    pinned merge holds against the policy; unmerging gives the slot back."""
    engine, versions = setup()
    one, two = versions["one"], versions["two"]
    mixed = [one, None, two, one]
    alone = [submit(engine, p, a) for p, a in zip(PROMPTS, mixed, strict=True)]
    for c in alone:
        assert c.done.wait(30) and c.error is None
    engine.configure_merges(MergeSettings(window_tokens=32, min_interval_s=0.0)).result(30)
    c = submit(engine, PROMPTS[0], one, max_new_tokens=30)  # dominant traffic on "one"
    assert c.done.wait(30) and c.error is None
    deadline = time.monotonic() + 10  # the policy looks every MERGE_CHECK_S, idle or not
    while merge_of(engine).adapter != one.key and time.monotonic() < deadline:
        time.sleep(0.05)
    state = engine.snapshot().result(30)
    assert state.merge.adapter == one.key and state.merge.merges == 1
    assert refcounts(state)[state.slot_of(one.key)] == 1  # held while merged
    never_drained = engine.call(lambda: engine._slots.drain_candidate(exclude=set()))
    assert never_drained.result(30) is None
    # Mixed requests while merged, then with the policy's view at hand: same outputs.
    engine.configure_merges(MergeSettings(policy="off")).result(30)
    again = [submit(engine, p, a) for p, a in zip(PROMPTS, mixed, strict=True)]
    for c, ref in zip(again, alone, strict=True):
        assert c.done.wait(30) and c.error is None
        assert c.tokens == ref.tokens
    # Pin "two" instead; the policy (even eager) leaves a pinned merge alone.
    engine.merge(two).result(30)
    merge = merge_of(engine)
    assert merge.adapter == two.key and merge.pinned and merge.unmerges == 1
    engine.configure_merges(MergeSettings(window_tokens=8, min_interval_s=0.0)).result(30)
    c = submit(engine, PROMPTS[0], one, max_new_tokens=20)
    assert c.done.wait(30) and c.tokens[:12] == alone[0].tokens
    assert merge_of(engine).adapter == two.key
    # Off first: an eager policy would merge "one" again the moment the pin is gone.
    engine.configure_merges(MergeSettings(policy="off")).result(30)
    engine.unmerge().result(30)
    state = engine.snapshot().result(30)
    assert state.merge.adapter is None and not state.merge.pinned
    assert all(s.refcount == 0 for s in state.slots)


def test_the_last_free_slot_is_never_merged_away(setup):
    """With one slot, merging would leave no slot for any other adapter: the policy does not
    merge, and a pinned merge is refused."""
    engine, versions = setup(max_loras=1)
    engine.configure_merges(MergeSettings(window_tokens=8, min_interval_s=0.0)).result(30)
    c = submit(engine, PROMPTS[0], versions["one"], max_new_tokens=30)
    assert c.done.wait(30) and c.error is None
    assert merge_of(engine).merges == 0
    with pytest.raises(Exhausted):
        engine.merge(versions["two"]).result(30)
    other = submit(engine, PROMPTS[1], versions["two"])
    assert other.done.wait(30) and other.error is None


@pytest.mark.parametrize("fails_at", ["preparing", "installing"])
def test_a_failed_merge_gives_its_slot_back(setup, monkeypatch, fails_at):
    engine, versions = setup()
    one = versions["one"]
    tried = threading.Event()

    def fail(runner: ModelRunner, _: object) -> int:
        raise MemoryError("no room for the dense copies")

    def failing_steps(runner: ModelRunner, _: object):
        tried.set()
        yield  # a first unit, then the failure, as a merge that runs out of memory midway
        raise MemoryError("no room for the dense copies")

    def failing_install(runner: ModelRunner, slot: int, prepared: object) -> int:
        tried.set()
        raise MemoryError("no room for the dense copies")

    monkeypatch.setattr(ModelRunner, "merge", fail)  # an operator's merge
    if fails_at == "preparing":  # the policy's
        monkeypatch.setattr(ModelRunner, "merge_steps", failing_steps)
    else:
        monkeypatch.setattr(ModelRunner, "install_merge", failing_install)
    with pytest.raises(MemoryError):
        engine.merge(one).result(30)
    state = engine.snapshot().result(30)
    assert state.merge.adapter is None and not state.merge.pinned
    assert all(s.refcount == 0 for s in state.slots)
    # The policy's attempt fails the same way, and requests are served unmerged meanwhile.
    engine.configure_merges(MergeSettings(window_tokens=8, min_interval_s=0.0)).result(30)
    c = submit(engine, PROMPTS[0], one, max_new_tokens=30)
    assert c.done.wait(30) and c.error is None
    assert tried.wait(10)  # the policy did try
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        state = engine.snapshot().result(30)  # built on the engine thread, between its steps
        if all(s.refcount == 0 for s in state.slots) and not engine_held(engine):
            break
        time.sleep(0.05)
    assert all(s.refcount == 0 for s in state.slots) and not engine_held(engine)
    assert state.merge.adapter is None


def test_a_merge_past_the_dense_budget_is_refused_and_served_unmerged(setup, caplog):
    """A merged adapter's dense copies count against --dense-cache-mb: with no room, an
    operator's merge fails with OverMemoryBudget (RESOURCE_EXHAUSTED) and nothing is held; the
    policy tries once (not at every check) and requests are served unmerged."""
    engine, versions = setup(dense_cache_bytes=1)
    one = versions["one"]
    with pytest.raises(OverMemoryBudget, match="dense budget"):
        engine.merge(one).result(30)
    assert status_code(OverMemoryBudget("x")) == "RESOURCE_EXHAUSTED"
    state = engine.snapshot().result(30)
    assert state.merge.adapter is None and all(s.refcount == 0 for s in state.slots)
    engine.configure_merges(MergeSettings(window_tokens=8, min_interval_s=0.0)).result(30)

    def refusals() -> list[str]:
        return [r.getMessage() for r in caplog.records if "not merged" in r.getMessage()]

    with caplog.at_level("WARNING", logger="loraplex.server.engine.merging"):
        c = submit(engine, PROMPTS[0], one, max_new_tokens=30)
        assert c.done.wait(30) and c.error is None
        deadline = time.monotonic() + 10
        while not refusals() and time.monotonic() < deadline:
            time.sleep(0.05)
        c = submit(engine, PROMPTS[1], one, max_new_tokens=30)  # the policy asked again
        assert c.done.wait(30) and c.error is None
        time.sleep(4 * merging.MERGE_CHECK_S)
    assert len(refusals()) == 1 and "dense budget" in refusals()[0]
    state = engine.snapshot().result(30)
    assert state.merge.adapter is None and not engine_held(engine)


def test_a_merges_copies_are_counted_from_the_layers_it_targets(setup):
    """What a merge is checked against the budget for: a dense copy of every layer (and fused
    group) the adapter targets, in the compute dtype; the room is what the base's copies leave,
    the same while a merge is served (a merge replaces the one served)."""
    engine, versions = setup()
    runner = engine.call(lambda: engine._runner).result(30)
    engine.merge(versions["one"]).result(30)
    forward = runner.forward
    units = engine.call(lambda: forward.check_merge(forward.merge_targets(runner.merged_slot)))
    # "one" targets every linear layer of the tiny model: a float32 copy of each
    linear_params = sum(
        m.weight.numel()
        for name, m in runner.model.named_modules()
        if isinstance(m, torch.nn.Linear) and "lm_head" not in name
    )
    assert forward.merge_copy_bytes(units.result(30)) == linear_params * 4
    room = runner.linears.dense_budget - runner.linears.dense_bytes
    assert engine.call(runner.linears.merge_room).result(30) == room
    engine.unmerge().result(30)
    assert engine.call(runner.linears.merge_room).result(30) == room


def test_a_refused_merge_leaves_what_is_merged(setup):
    """A budget that holds the copies of "two" (q/k/v: 0.25 MiB) but not those of "one"
    (every layer: 0.56 MiB): merging "one" over "two" is refused before "two" is undone."""
    engine, versions = setup(dense_cache_bytes=300_000)
    engine.merge(versions["two"]).result(30)
    with pytest.raises(OverMemoryBudget):
        engine.merge(versions["one"]).result(30)
    state = engine.snapshot().result(30)
    assert state.merge.adapter == versions["two"].key and state.merge.pinned
    assert sum(s.refcount for s in state.slots) == 1  # only the merged adapter's slot is held
    c = submit(engine, PROMPTS[0], versions["one"], max_new_tokens=8)  # served, unmerged
    assert c.done.wait(30) and c.error is None


def engine_held(engine: Engine) -> set[int]:
    return engine.call(lambda: set(engine._slots.held)).result(30)


def test_steps_go_on_while_the_policys_merge_is_prepared(setup, monkeypatch):
    """The policy's merge is prepared a slice before each step (here one unit a slice):
    steps run between its slices, its slot is held from the start, and once every unit is
    ready it is installed; outputs stay those of the unmerged adapter."""
    engine, versions = setup(merge=MergeSettings(policy="off"))  # nothing merged before
    one = versions["one"]
    long = 200  # steps enough for the policy to decide (asked every step here) and prepare
    alone = submit(engine, PROMPTS[0], one, max_new_tokens=long)
    assert alone.done.wait(30) and alone.error is None
    monkeypatch.setattr(merging, "MERGE_SLICE_S", 0.0)
    monkeypatch.setattr(merging, "MERGE_SLICE_SHARE", 0.0)
    monkeypatch.setattr(merging, "MERGE_CHECK_S", 0.0)  # however fast the steps run
    steps_run: list[int] = []  # ModelRunner.step calls so far, at each unit prepared
    calls = [0]
    step, merge_steps = ModelRunner.step, ModelRunner.merge_steps

    def counted_step(runner: ModelRunner, *args, **kwargs):
        calls[0] += 1
        return step(runner, *args, **kwargs)

    held: list[set[int]] = []

    def recorded(runner: ModelRunner, inputs):
        held.append(set(engine._slots.held))  # runs on the engine thread, at the first slice
        units = merge_steps(runner, inputs)
        while True:
            steps_run.append(calls[0])
            try:
                next(units)
            except StopIteration as done:
                return done.value
            yield

    monkeypatch.setattr(ModelRunner, "step", counted_step)
    monkeypatch.setattr(ModelRunner, "merge_steps", recorded)
    engine.configure_merges(MergeSettings(window_tokens=16, min_interval_s=0.0)).result(30)
    during = submit(engine, PROMPTS[0], one, max_new_tokens=long)
    assert during.done.wait(30) and during.error is None
    deadline = time.monotonic() + 10
    while merge_of(engine).adapter != one.key and time.monotonic() < deadline:
        time.sleep(0.05)
    assert merge_of(engine).adapter == one.key
    assert held and held[0]  # the slot was held from the start
    units = 4 * len(engine._model().model.model.layers)  # q/k/v, o, gate/up, down
    assert len(steps_run) == units + 1  # a unit at a time
    assert steps_run[-1] >= steps_run[0] + units  # a step between every two
    assert during.tokens == alone.tokens
    engine.configure_merges(MergeSettings(policy="off")).result(30)
    merged = submit(engine, PROMPTS[0], one, max_new_tokens=long)
    assert merged.done.wait(30) and merged.tokens == alone.tokens


def merge_of(engine: Engine) -> MergeState:
    return engine.snapshot().result(30).merge


def refcounts(state: EngineSnapshot) -> dict[int, int]:
    return {s.slot: s.refcount for s in state.slots}


def test_no_merge_where_the_base_is_faster_than_a_merged_copy_at_the_steps_that_run():
    """Small steps on a CPU read the 4-bit codes (the native kernel) faster than any dense
    copy: a dominant adapter is then left unmerged, and a merge made for big steps comes out
    when the steps shrink."""
    clock = Clock()
    settings = MergeSettings(window_tokens=100, min_interval_s=0.0, window_seconds=1e9)
    asked: list[float] = []

    def pays(step_tokens: float) -> bool:
        asked.append(step_tokens)
        return step_tokens >= 8

    p = MergePolicy(settings, clock, pays=pays)
    feed(p, {M: 1}, steps=60)  # a lone stream: one token per step
    assert p.decide(None, Counter()) is None and asked[-1] == 1
    feed(p, {M: 15, None: 1}, steps=60)  # a busy tenant: 16 tokens per step
    assert p.decide(None, Counter()) == M and asked[-1] == 16
    feed(p, {M: 1}, steps=200)
    assert p.decide(M, Counter()) is None  # the steps shrank: unmerge


def test_copies_serve_unless_the_native_kernel_reads_most_weights(load_tiny):
    loaded = load_tiny(quantization="nf4", dtype="bfloat16")
    linears = BaseLinears(loaded.model, loaded.dtype, loaded.device, "lut")
    assert linears.copies_serve(1)  # lut: a merged copy is faster
    times = {
        layer.nf4.shape: [
            {"lut": 3.0, "nf4": 1.0 if rows <= 4 else 4.0, "dense": 2.0} for rows in ROW_BUCKETS
        ]
        for layer in linears.layers.values()
    }
    linears._assign(times, budget=1 << 30)  # type: ignore[arg-type]
    assert not linears.copies_serve(1) and not linears.copies_serve(3)
    assert linears.copies_serve(8) and linears.copies_serve(64)


def test_a_pending_merge_is_dropped_by_a_new_policy_and_an_operators_unmerge(setup, monkeypatch):
    """A merge being prepared holds its slot; configuring a new policy, or an operator's
    unmerge, drops it and gives the slot back (it is not installed under a policy that did
    not decide it)."""
    engine, versions = setup()
    one = versions["one"]
    ready = threading.Event()
    merge_steps = ModelRunner.merge_steps

    def endless(runner: ModelRunner, inputs):
        ready.set()
        yield from merge_steps(runner, inputs)
        while True:  # never done: stays pending
            yield

    monkeypatch.setattr(ModelRunner, "merge_steps", endless)
    for drop in (
        lambda: engine.configure_merges(MergeSettings(policy="off")).result(30),
        lambda: engine.unmerge().result(30),
    ):
        ready.clear()
        engine.configure_merges(MergeSettings(window_tokens=16, min_interval_s=0.0)).result(30)
        c = submit(engine, PROMPTS[0], one, max_new_tokens=200)
        assert c.done.wait(30) and c.error is None
        assert ready.wait(10) and engine_held(engine)  # pending, its slot held
        drop()
        engine.configure_merges(MergeSettings(policy="off")).result(30)
        state = engine.snapshot().result(30)
        assert state.merge.adapter is None and not engine_held(engine)
        assert all(s.refcount == 0 for s in state.slots)
