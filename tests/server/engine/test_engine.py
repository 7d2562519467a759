"""The engine on the tiny model: continuous batching of mixed adapters gives every request
what it gets alone, slots are shared fairly, failures and cancels free what they held."""

from __future__ import annotations

import importlib
import random
import sys
import threading
from types import SimpleNamespace

import pytest
import torch

from loraplex.adapters.store import AdapterStore
from loraplex.core.errors import AdapterNotFound, Exhausted, NotReady, QueueFull
from loraplex.core.types import AdapterWeights
from loraplex.server.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.model_runner import ModelRunner
from loraplex.server.engine.request import EngineRequest, RequestOutput, SamplingParams
from loraplex.server.engine.state import EngineSnapshot
from loraplex.server.metrics import StateCollector
from loraplex.server.runtime.heap import GcPauses


class Collector:
    """Gathers one request's outputs from the engine thread."""

    def __init__(self) -> None:
        self.outputs: list[RequestOutput] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.first = threading.Event()

    def __call__(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self.error = item
            self.done.set()
            return
        self.outputs.append(item)
        self.first.set()
        if item.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outputs for t in o.token_ids]


def submit(engine, prompt, adapter, max_new_tokens=12, **params) -> Collector:
    collector = Collector()
    # A random model may emit EOS anywhere: run every request to max_new_tokens.
    params = SamplingParams(max_new_tokens, ignore_eos=True, **params)
    request = EngineRequest(f"r{id(collector)}", prompt, params, adapter, collector)
    engine.submit(request)
    collector.request = request
    return collector


PROMPTS = [[5, 17, 300, 42, 7, 99], [9, 8, 7], [100, 200, 300, 400, 500, 600, 700, 800], [1, 2]]


def test_joining_mixed_batch_equals_each_request_alone(setup):
    engine, versions = setup()
    adapters = [versions["one"], None, versions["two"], versions["one"]]
    alone = []
    for prompt, adapter in zip(PROMPTS, adapters, strict=True):
        c = submit(engine, prompt, adapter)
        assert c.done.wait(30)
        alone.append(c.tokens)
    # Staggered: the first request runs, the others join its batch mid-flight.
    first = submit(engine, PROMPTS[0], adapters[0], max_new_tokens=40)
    assert first.first.wait(30)
    rest = [submit(engine, p, a) for p, a in zip(PROMPTS[1:], adapters[1:], strict=True)]
    for c in [first, *rest]:
        assert c.done.wait(60) and c.error is None
    assert first.tokens[:12] == alone[0]
    assert [c.tokens for c in rest] == alone[1:]
    state = engine.snapshot().result(30)
    assert state.stats.mixed_adapter_steps > 0 and state.stats.max_batch_size >= 3
    assert len({tuple(t) for t in alone[:2]}) == 2
    assert all(o.usage for o in (c.outputs[-1] for c in rest))
    assert state.running == 0
    assert all(s.refcount == 0 for s in state.slots)


def test_long_prompt_is_prefilled_in_chunks_while_others_decode(setup):
    """Chunked prefill: a prompt five times the per-step budget takes several steps, each also
    decoding the running request, and both outputs equal what each gets alone."""
    engine, versions = setup(max_prefill_tokens=8, prefix_cache=False)
    long_prompt = [(7 * i) % 3000 + 50 for i in range(40)]
    alone_long = submit(engine, long_prompt, versions["two"])
    # long enough that the joining prompt's chunks run beside it however fast the steps are
    alone_short = submit(engine, PROMPTS[0], versions["one"], max_new_tokens=200)
    for c in (alone_long, alone_short):
        assert c.done.wait(60) and c.error is None
    stats = engine.snapshot().result(30).stats
    before = (stats.prefill_steps, stats.mixed_prefill_decode_steps)
    running = submit(engine, PROMPTS[0], versions["one"], max_new_tokens=200)
    assert running.first.wait(30)
    joining = submit(engine, long_prompt, versions["two"])
    for c in (running, joining):
        assert c.done.wait(60) and c.error is None
    stats = engine.snapshot().result(30).stats
    assert stats.prefill_steps - before[0] >= 5  # 40 prompt tokens, 8 per step
    assert stats.mixed_prefill_decode_steps - before[1] >= 4  # the decode went on meanwhile
    assert joining.tokens == alone_long.tokens
    assert running.tokens == alone_short.tokens


def test_kv_cache_budget_bounds_admission_and_queues_the_rest(setup):
    """A budget for two sequences of this size: the others wait for cache and all complete;
    rows freed out of order are compacted without disturbing the sequences that move."""
    engine, versions = setup()
    per_request = len(PROMPTS[2]) + 20  # prompt + max_new_tokens is what a request reserves

    def two_at_a_time(runner):  # below what a config may set: one sequence of max_len
        runner.cache.token_budget = 2 * per_request + 5

    engine.with_model(two_at_a_time).result(30)
    alone = submit(engine, PROMPTS[2], versions["one"], max_new_tokens=20)
    assert alone.done.wait(30)
    lengths = [20, 5, 20, 9, 20, 14]  # finishing out of order moves rows around
    collectors = [submit(engine, PROMPTS[2], versions["one"], max_new_tokens=n) for n in lengths]
    for c, n in zip(collectors, lengths, strict=True):
        assert c.done.wait(60) and c.error is None
        assert c.tokens == alone.tokens[:n]
    state = engine.snapshot().result(30)
    assert state.stats.max_batch_size <= 2
    assert state.kv_cache_usage == 0 and state.kv_rows_used == 0


def test_more_adapters_than_slots_wait_and_all_complete(setup):
    engine, versions = setup(max_loras=1)
    collectors = [
        submit(engine, PROMPTS[i % 4], versions["one" if i % 2 else "two"]) for i in range(6)
    ]
    for c in collectors:
        assert c.done.wait(60) and c.error is None
        assert c.outputs[-1].finish_reason == "length"
    assert (
        engine.snapshot().result(30).stats.adapter_loads >= 2
    )  # the one slot was reloaded as adapters alternated


def test_failed_adapter_load_fails_its_requests_only(setup, tmp_path):
    engine, versions = setup()
    store = AdapterStore(tmp_path / "store")
    store.delete("two")  # deleted, blobs and all, while its requests are queued
    store.remove_blobs({versions["two"].digest})
    # Two requests share the one failing load (admitted in the same step), one is unaffected.
    collectors = [submit(engine, p, versions["two"]) for p in PROMPTS[:2]]
    good = submit(engine, PROMPTS[2], versions["one"])
    for bad in collectors:
        assert bad.done.wait(30)
        assert isinstance(bad.error, AdapterNotFound) and "deleted" in str(bad.error)
    assert good.done.wait(30) and good.error is None
    state = engine.snapshot().result(30)
    assert versions["two"].key not in [s.adapter for s in state.slots]
    assert all(s.refcount == 0 for s in state.slots)
    again = submit(engine, PROMPTS[0], versions["one"])  # the engine keeps serving
    assert again.done.wait(30) and again.error is None


def test_tiny_temperatures_decode_greedily(setup):
    engine, versions = setup()
    greedy = submit(engine, PROMPTS[0], versions["one"])
    tiny = submit(engine, PROMPTS[0], versions["one"], temperature=1e-40, seed=1)
    for c in (greedy, tiny):
        assert c.done.wait(30) and c.error is None
    assert tiny.tokens == greedy.tokens


def test_full_queue_refuses_and_stopped_engine_refuses(setup):
    engine, _ = setup(max_queue=1, max_batch_size=1)
    running = submit(engine, PROMPTS[0], None, max_new_tokens=200)
    assert running.first.wait(30)
    submit(engine, PROMPTS[1], None)  # waits: the batch is full
    with pytest.raises(QueueFull):
        submit(engine, PROMPTS[2], None)
    engine.stop()
    with pytest.raises(NotReady):
        submit(engine, PROMPTS[2], None)
    assert isinstance(running.error, NotReady)  # nothing left hanging
    with pytest.raises(NotReady):
        engine.call(lambda: None).result(1)


def test_cancel_removes_the_sequence(setup):
    engine, _ = setup()
    c = submit(engine, PROMPTS[0], None, max_new_tokens=400)
    assert c.first.wait(30)
    c.request.cancel()
    for _ in range(200):
        if engine.snapshot().result(30).running == 0:
            break
        threading.Event().wait(0.01)
    assert engine.snapshot().result(30).running == 0
    assert len(c.tokens) < 400 and not c.done.is_set()


def test_seeded_sampling_is_independent_of_batch_company(setup):
    engine, versions = setup()
    params = dict(temperature=1.0, seed=11)
    alone = submit(engine, PROMPTS[0], versions["one"], **params)
    assert alone.done.wait(30)
    company = [submit(engine, PROMPTS[i], None, temperature=0.8, seed=i) for i in (1, 2)]
    together = submit(engine, PROMPTS[0], versions["one"], **params)
    for c in [*company, together]:
        assert c.done.wait(30)
    assert together.tokens == alone.tokens


@pytest.mark.cpu_isa
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_nf4_tiny_model_serves_adapters(load_tiny, tmp_path, family):
    """The 4-bit path end to end on a tiny model: outputs differ with and without adapter."""
    loaded = load_tiny(quantization="nf4", dtype="bfloat16", family=family)
    assert loaded.model.config.model_type == family
    runner = ModelRunner(loaded, num_slots=2, max_rank=8)
    assert "4bit" in type(loaded.model.model.layers[0].self_attn.q_proj).__name__
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    a = torch.randn(4, q_proj.in_features) * 0.5
    b = torch.randn(q_proj.out_features, 4) * 0.5
    weights = AdapterWeights({"model.layers.0.self_attn.q_proj": (a, b)}, 4, 8.0, ("q_proj",))
    runner.load_adapter(0, weights)
    logits = runner.prefill([PROMPTS[0], PROMPTS[0]], [0, -1])
    assert torch.isfinite(logits).all()
    assert (logits[0] - logits[1]).abs().max() > 0


def test_calls_run_on_the_engine_thread_between_steps(setup):
    engine, _ = setup()
    busy = submit(engine, PROMPTS[0], None, max_new_tokens=30)
    name = engine.call(lambda: threading.current_thread().name).result(10)
    assert name == "loraplex-engine"
    with pytest.raises(ZeroDivisionError):
        engine.call(lambda: 1 / 0).result(10)
    assert busy.done.wait(30) and busy.error is None  # a failing call disturbs no request


def test_a_runner_that_fails_to_build_fails_start():
    def broken():
        raise OSError("no such model")

    with pytest.raises(OSError, match="no such model"):
        Engine(broken, EngineConfig()).start(timeout=10)


def test_random_traffic_with_cancels_leaves_nothing_behind(setup):
    """Bounded soak: mixed adapters, lengths, sampling and cancels; every request ends (or is
    cancelled), and the engine ends with no running sequence and no referenced slot."""
    engine, versions = setup(max_loras=2, max_batch_size=4)
    rng = random.Random(0)
    choices = [None, versions["one"], versions["two"]]
    collectors = []
    for i in range(40):
        params = {"temperature": rng.choice([0.0, 0.9]), "seed": i}
        prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(1, 30))]
        c = submit(engine, prompt, rng.choice(choices), rng.randint(1, 24), **params)
        collectors.append(c)
        if rng.random() < 0.25:
            c.request.cancel()
    for c in collectors:
        if not c.request.cancelled.is_set():
            assert c.done.wait(60), "a request hung"
            assert c.error is None
            assert c.outputs[-1].usage.completion_tokens == len(c.tokens)
    for _ in range(200):
        state = engine.snapshot().result(30)
        if state.running == 0 and state.waiting == 0:
            break
        threading.Event().wait(0.01)
    assert state.running == 0 and state.waiting == 0
    assert all(s.refcount == 0 for s in state.slots)


def test_adapters_of_queued_requests_are_prefetched_into_free_slots(setup):
    engine, versions = setup(max_loras=2, max_batch_size=1)
    first = submit(engine, PROMPTS[0], versions["one"], max_new_tokens=16)
    queued = submit(engine, PROMPTS[1], versions["two"])  # waits for the one batch row
    for c in (first, queued):
        assert c.done.wait(60) and c.error is None
    stats = engine.snapshot().result(30).device_tier
    # "two" was loaded while "one" ran, so its admission found it resident.
    assert (stats.misses, stats.hits, stats.loads) == (1, 1, 2)


def test_a_pinned_adapter_keeps_its_slot_while_others_churn(setup):
    engine, versions = setup(max_loras=2)
    engine.pin(versions["one"]).result(30)
    slot = engine.snapshot().result(30).slot_of(versions["one"].key)
    with pytest.raises(Exhausted, match="pinned"):  # the last slot stays for the rest
        engine.pin(versions["two"]).result(30)
    collectors = [submit(engine, PROMPTS[i % 4], versions["two"]) for i in range(3)]
    collectors += [submit(engine, PROMPTS[3], versions["one"])]
    for c in collectors:
        assert c.done.wait(60) and c.error is None
    state = engine.snapshot().result(30)
    assert state.slot_of(versions["one"].key) == slot
    assert refcounts(state)[slot] == 1  # the pin's own reference
    engine.unpin(versions["one"]).result(30)
    assert refcounts(engine.snapshot().result(30))[slot] == 0


def test_requests_past_the_time_limit_end_queued_or_running(setup):
    from loraplex.core.errors import TooLong

    engine, versions = setup(max_batch_size=1)
    running = submit(engine, PROMPTS[0], versions["one"], max_new_tokens=400)
    queued = submit(engine, PROMPTS[1], None)  # waits: one batch row
    assert running.first.wait(30)
    queued.request.arrival -= 10_000  # as if they had been there for hours
    running.request.arrival -= 10_000
    for c in (running, queued):
        assert c.done.wait(30) and isinstance(c.error, TooLong)
    assert len(running.tokens) < 400 and queued.tokens == []
    state = engine.snapshot().result(30)
    assert state.running == 0 and state.waiting == 0
    assert all(s.refcount == 0 for s in state.slots)
    fresh = submit(engine, PROMPTS[2], versions["two"])  # the engine keeps serving
    assert fresh.done.wait(30) and fresh.error is None


def refcounts(state: EngineSnapshot) -> dict[int, int]:
    return {s.slot: s.refcount for s in state.slots}


def test_the_engine_and_everything_below_the_front_ends_import_without_grpc():
    """grpc and protobuf are the gRPC front end's: with them unimportable, fresh imports of the
    engine, the runtime, the adapter tiers and training still succeed (the lint step's import
    contracts check the same statically). sys.modules is put back as it was afterwards."""
    before = dict(sys.modules)
    try:
        for name in [n for n in sys.modules if n.startswith("loraplex.")]:
            del sys.modules[name]
        for name in ("grpc", "google.protobuf", "google.rpc", "loraplex.v1"):
            sys.modules[name] = None  # type: ignore[assignment]
        for module in (
            "loraplex.server.engine.engine",
            "loraplex.server.runtime.runtime",
            "loraplex.adapters.export",
            "loraplex.training.train",
        ):
            importlib.import_module(module)
        with pytest.raises(ImportError):
            importlib.import_module("loraplex.server.grpc_api.servicers")  # the check bites
    finally:
        for name in [n for n in sys.modules if n not in before]:
            del sys.modules[name]
        sys.modules.update(before)
        for name, module in before.items():  # and each package's attribute for its submodule
            parent, _, child = name.rpartition(".")
            if name.startswith("loraplex.") and parent in sys.modules:
                setattr(sys.modules[parent], child, module)
    assert importlib.import_module("loraplex.core").types is sys.modules["loraplex.core.types"]


def failing_step(engine, exc: BaseException):
    """Make the engine's next step raise `exc` (once)."""
    runner = engine.call(lambda: engine._runner).result(30)
    step = runner.step
    state = {"left": 1}

    def once(*args, **kwargs):
        if state["left"]:
            state["left"] -= 1
            raise exc
        return step(*args, **kwargs)

    runner.step = once


def test_out_of_device_memory_fails_only_that_steps_requests(setup):
    from loraplex.core.errors import DeviceOutOfMemory

    engine, versions = setup()
    failing_step(engine, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    hit = submit(engine, PROMPTS[0], versions["one"])
    assert hit.done.wait(30)
    assert isinstance(hit.error, DeviceOutOfMemory) and hit.error.retry_after_s > 0
    later = submit(engine, PROMPTS[1], None)  # the server goes on
    assert later.done.wait(30) and later.error is None
    engine.check()


def test_a_device_error_stops_serving_until_a_restart(setup):
    from loraplex.core.errors import Unrecoverable

    engine, _ = setup()
    heard: list[BaseException] = []
    engine.on_failure.append(heard.append)
    blocker = submit(engine, PROMPTS[0], None, max_new_tokens=200)
    assert blocker.first.wait(30)
    failing_step(engine, torch.AcceleratorError("CUDA error: an illegal memory access"))
    assert blocker.done.wait(30) and isinstance(blocker.error, Unrecoverable)
    assert len(heard) == 1 and engine.failure is heard[0]
    with pytest.raises(Unrecoverable):
        engine.check()
    with pytest.raises(NotReady):  # Unrecoverable is a NotReady: UNAVAILABLE, 503
        engine.submit(EngineRequest("x", [1, 2], SamplingParams(2), None, Collector()))


class AllSamples(Collector):
    """Collects a request with n samples: done once each has finished."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.n = n

    def __call__(self, item: RequestOutput | BaseException) -> None:
        super().__call__(item)
        if not isinstance(item, BaseException):
            finished = sum(o.finish_reason is not None for o in self.outputs)
            (self.done.set if finished == self.n else self.done.clear)()

    @property
    def tokens(self) -> list[int]:
        return [t for i in range(self.n) for o in self.outputs if o.index == i for t in o.token_ids]


def layouts_workload(engine, versions) -> list[list[int]]:
    """Greedy tokens of a workload that crosses blocks every way: prompts shorter and longer
    than a block, chunks that start mid-block (8 tokens a step) beside decodes, two samples
    of one prompt (the second shares the first's blocks), and a repeated prompt (the prefix
    cache's blocks copied in)."""
    long_prompt = [(7 * i) % 3000 + 50 for i in range(37)]
    first = [
        submit(engine, long_prompt, versions["two"], max_new_tokens=20),
        submit(engine, PROMPTS[0], versions["one"], max_new_tokens=24),
        AllSamples(2),
        submit(engine, PROMPTS[1], versions["one"], max_new_tokens=18),
    ]
    params = SamplingParams(20, ignore_eos=True, n=2)
    engine.submit(EngineRequest("samples", PROMPTS[2] * 3, params, None, first[2]))
    for c in first:
        assert c.done.wait(120) and c.error is None
    again = submit(engine, long_prompt, versions["two"], max_new_tokens=20)
    assert again.done.wait(120) and again.error is None
    return [c.tokens for c in (*first, again)]


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_the_paged_cache_serves_the_tokens_of_the_row_cache(setup, kernels):
    """--kv-layout paged (torch's ops over gathered blocks; with --kernels triton, the Triton
    LoRA and paged-attention kernels, in Triton's interpreter here) gives the row cache's
    greedy tokens; every block is back in the pool afterwards."""
    if kernels == "triton":
        pytest.importorskip("triton", reason="triton comes with the dev extra (Linux)")
    settings = {"max_prefill_tokens": 8, "max_batch_size": 6}
    engine, versions = setup(kv_layout="rows", kernels="torch", **settings)
    want = layouts_workload(engine, versions)
    engine.stop()
    engine, versions = setup(kv_layout="paged", kernels=kernels, **settings)
    got = layouts_workload(engine, versions)
    assert got == want
    assert want[4] == want[0]  # the prefix cache's copy served the same tokens
    state = engine.snapshot().result(30)
    assert state.kv_blocks is not None and state.kv_blocks[1] == 0
    assert state.kv_cache_usage == 0 and state.kv_rows_used == 0
    assert state.prefix_cache is not None and state.prefix_cache.hits > 0
    # the block gauges, as Prometheus scrapes them
    runtime = SimpleNamespace(gc_pauses=GcPauses(), engine=engine)
    scraped = {}
    for family in StateCollector(runtime).collect():  # the engine's gauges come first
        scraped[family.name] = family.samples[0].value if family.samples else None
        if "loraplex_kv_cache_blocks_used" in scraped:
            break
    assert scraped["loraplex_kv_cache_blocks_total"] == state.kv_blocks[0] > 0
    assert scraped["loraplex_kv_cache_blocks_used"] == 0


def test_a_paged_cache_is_sized_to_the_device_after_a_profiling_step(load_tiny, monkeypatch):
    """fit_paged_cache (run at start on CUDA, here with the device's memory faked): the
    blocks fill the utilization's share of the device less the profiling step's peak, and the
    forward reads the new pools."""
    from loraplex.server.engine import model_runner
    from loraplex.server.engine.paged_kv import block_bytes

    runner = ModelRunner(
        load_tiny(), num_slots=2, max_rank=8, kv_layout="paged", dense_cache_bytes=1 << 20
    )
    per_block = block_bytes(runner.cache.shape)
    profiled = []

    def peak(fn, device):
        fn()
        profiled.append(device)
        return 10 * per_block

    monkeypatch.setattr(model_runner, "profile_peak_bytes", peak)
    first = runner.cache.num_blocks * per_block  # freed by the resize
    monkeypatch.setattr(
        model_runner, "device_memory", lambda device: (1000 * per_block - first, 1000 * per_block)
    )
    room = runner.linears.merge_room()
    blocks = runner.fit_paged_cache(0.5, profile_tokens=16)
    assert profiled and blocks == runner.cache.num_blocks
    assert blocks == (500 * per_block - 10 * per_block - room) // per_block
    assert runner.forward.layers[0].keys is runner.cache.keys[0]
    assert runner.prefill([[5, 17, 300]], [-1]).shape[0] == 1


class Recorder(AllSamples):
    """AllSamples that also records the thread each output reached it on."""

    def __init__(self, n: int = 1) -> None:
        super().__init__(n)
        self.threads: set[str] = set()

    def __call__(self, item: RequestOutput | BaseException) -> None:
        self.threads.add(threading.current_thread().name)
        super().__call__(item)


def outputs_workload(engine, versions) -> tuple[list[list[tuple]], set[str]]:
    """Every output (sample, text, tokens, finish, stop reason, usage, logprobs) of a mix:
    requests without stop strings (their text rendered off the engine thread when outputs
    are asynchronous), with stop strings (rendered on it), with a stop token, two samples
    with log-probabilities, and the end of a stopping engine."""
    cases = [
        (PROMPTS[0], versions["one"], SamplingParams(16, ignore_eos=True)),
        (PROMPTS[1], None, SamplingParams(24, ignore_eos=True, stop=("e", "th"))),
        (PROMPTS[2], versions["two"], SamplingParams(12, ignore_eos=True, n=2, logprobs=2)),
        (PROMPTS[3], None, SamplingParams(20, ignore_eos=True, stop_token_ids=(17, 300))),
    ]
    recorders = []
    for i, (prompt, adapter, params) in enumerate(cases):
        recorder = Recorder(params.n)
        engine.submit(EngineRequest(f"o{i}", prompt, params, adapter, recorder))
        recorders.append(recorder)
    for recorder in recorders:
        assert recorder.done.wait(60) and recorder.error is None
    cut = Recorder()  # still running when the engine stops: it hears NotReady, after its tokens
    engine.submit(EngineRequest("cut", PROMPTS[0], SamplingParams(400, ignore_eos=True), None, cut))
    assert cut.first.wait(60)
    engine.stop()
    assert isinstance(cut.error, NotReady) and cut.outputs
    seen = [
        [
            (o.index, o.text, o.token_ids, o.finish_reason, o.stop_reason, o.usage, o.logprobs)
            for o in recorder.outputs
        ]
        for recorder in recorders
    ]
    return seen, set().union(*(r.threads for r in (*recorders, cut)))


def test_outputs_emitted_off_the_engine_thread_are_the_same_and_in_order(setup):
    """--async-output on: the same outputs, text and ends as on the engine thread, every one
    of them (an error that ends a request included) emitted from the output thread."""
    results = {}
    for mode in ("off", "on"):
        engine, versions = setup(async_output=mode)
        results[mode] = outputs_workload(engine, versions)
    (want, on_engine), (got, off_engine) = results["off"], results["on"]
    assert got == want
    assert on_engine == {"loraplex-engine"} and off_engine == {"loraplex-output"}
    stopped = want[1][-1]
    assert stopped[3] == "stop" and stopped[4] in ("e", "th")  # a stop string ended it
    assert sum(o[3] is not None for o in want[2]) == 2  # both samples ended
