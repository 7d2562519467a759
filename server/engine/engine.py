"""The engine loop, on one thread that owns the model, the KV cache and the adapter slots:

    admit waiting requests (a KV cache row each) -> one forward: a decode token for every
    decoding sequence plus a budget of prompt chunks -> sample, emit new text, retire finished
    sequences and free their cache rows and adapter slots.

Everything else talks to it through `submit` (thread-safe) and the per-request `emit` callback.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from loraplex.adapters.lora import NO_ADAPTER
from loraplex.adapters.slots import SlotTable
from loraplex.adapters.store import AdapterVersion
from loraplex.adapters.validate import AdapterWeights
from loraplex.server.config import EngineConfig
from loraplex.server.engine.batch import RunningBatch, Sequence
from loraplex.server.engine.merging import AdapterKey, MergePolicy, TokenCounts
from loraplex.server.engine.model_runner import DecodeWork, ModelRunner, PrefillWork
from loraplex.server.engine.output import OutputProcessor, StepText
from loraplex.server.engine.request import EngineRequest, RequestOutput, Usage
from loraplex.server.engine.sampling import make_generator, sample
from loraplex.server.engine.scheduler import Admission, Scheduler
from loraplex.server.errors import Exhausted, NotReady, TooLong

log = logging.getLogger(__name__)

WeightsLoader = Callable[[AdapterVersion], AdapterWeights]
T = TypeVar("T")
PREFETCH_PER_STEP = 2  # device loads for queued requests per step (each pauses the step)
PIN_RETRY_S = 1.0  # the retry advice when no slot can be pinned now
MERGE_CHECK_S = 0.25  # how often the merge policy is asked
MERGE_QUEUE_LOOKAHEAD = 64  # queued requests counted in the merge policy's token shares


@dataclass
class EngineStats:
    """Counters the engine keeps (read by tests, benchmarks and, later, metrics)."""

    prefill_steps: int = 0
    decode_steps: int = 0
    generated_tokens: int = 0
    max_batch_size: int = 0
    mixed_adapter_steps: int = 0  # decode steps whose batch held more than one adapter (or base)
    mixed_prefill_decode_steps: int = 0  # steps that decoded and prefilled in one forward
    prefill_tokens: int = 0
    adapter_loads: int = 0


@dataclass
class MergeStatus:
    """The adapter folded into the base, if any, and the merge counters."""

    key: AdapterKey | None = None
    slot: int | None = None
    pinned: bool = False  # by an operator: the policy leaves it alone
    merges: int = 0
    unmerges: int = 0
    last_merge_s: float = 0.0
    last_unmerge_s: float = 0.0
    leader: AdapterKey | None = None  # at the policy's last look
    leader_share: float = 0.0
    merged_share: float = 0.0


class Engine:
    """Owns one thread on which ALL of its tensor work runs: loading the model (`make_runner`),
    the steps, and whatever `call` hands it (e.g. validating an adapter).

    Why one thread: torch's OpenMP runtime (libgomp) stops spin-waiting once more OpenMP threads
    exist than cores, and each thread that runs a parallel op gets a pool of its own; a second
    torch thread made every engine step ~30% slower on a 2-core machine.
    """

    def __init__(
        self,
        make_runner: Callable[[], ModelRunner],
        config: EngineConfig,
        load_weights: WeightsLoader | None = None,
    ) -> None:
        self.config = config
        # Reads an adapter version's weights from the store; set before adapters are served.
        self.load_weights = load_weights
        self.slots = SlotTable(config.max_loras)
        self.scheduler = Scheduler(config, self.slots)
        self.stats = EngineStats()
        self.merge = MergeStatus()
        self.merge_policy = MergePolicy(config.merge)
        self._next_merge_check = 0.0
        self._make_runner = make_runner
        self._runner: ModelRunner | None = None
        self._eos_token_ids: set[int] = set()
        self._batch = RunningBatch()
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._calls_lock = threading.Lock()
        self._calls_closed = False  # under _calls_lock: no call is accepted once set
        self._started = Future[ModelRunner]()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the public, thread-safe side ---------------------------------------------------------
    def start(self, timeout: float | None = None) -> ModelRunner:
        """Start the engine thread; returns once it built the model runner (or raises why not)."""
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()
        return self._started.result(timeout)

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise NotReady("the engine has not started")
        return self._runner

    def submit(self, request: EngineRequest) -> None:
        """Queue a request (raises QueueFull, or NotReady once the engine is stopping)."""
        self.scheduler.add(request)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread between two steps; its result comes in the future."""
        future: Future[T] = Future()
        with self._calls_lock:
            if self._calls_closed:
                future.set_exception(NotReady("the engine is shutting down"))
                return future
            self._calls.put((fn, future))
        self.scheduler.wake()
        return future

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, fail those still queued or running, and join the thread."""
        self.scheduler.close()
        self._stopping.set()
        self.scheduler.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def num_running(self) -> int:
        return len(self._batch)

    def running_adapters(self) -> list[str]:
        """Ids of the adapters running requests use (safe from any thread: a snapshot)."""
        seqs = list(self._batch.seqs)
        return sorted({s.request.adapter.adapter_id for s in seqs if s.request.adapter})

    # -- the engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._runner = self._make_runner()
            self._eos_token_ids = eos_ids_of(self._runner.model, self._runner.loaded.tokenizer)
        except BaseException as exc:
            self._started.set_exception(exc)
            self.scheduler.close()
            with self._calls_lock:
                self._calls_closed = True
            return
        self._started.set_result(self._runner)
        log.info("engine started")
        while not self._stopping.is_set():
            try:
                self._run_calls()
                self._step()
            except Exception as exc:  # keep serving: fail only the requests in this batch
                log.exception("engine step failed; failing %d running requests", len(self._batch))
                self._fail_all(exc)
        self._fail_all(NotReady("the engine stopped"))
        for request in self.scheduler.drain():
            request.emit(NotReady("the engine stopped"))
        with self._calls_lock:
            self._calls_closed = True
        self._run_calls()
        log.info("engine stopped")

    def _run_calls(self) -> None:
        while not self._calls.empty():
            fn, future = self._calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

    def _step(self) -> None:
        self._drop_cancelled()
        admitted, dropped = self.scheduler.admit(self._allocate, self._unallocate)
        for request in dropped:
            log.debug("request %s cancelled while waiting", request.request_id)
        if admitted:
            self._start(admitted)
        self._prefetch()
        self._consider_merge()
        if not self._batch.seqs:
            self.scheduler.wait(timeout=0.5, unless=lambda: not self._calls.empty())
            return
        self._run_step()

    # -- admission ----------------------------------------------------------------------------
    def _reservation(self, request: EngineRequest) -> int:
        """KV cache tokens a request may need: its prompt and every token it may generate."""
        return len(request.prompt_ids) + request.params.max_new_tokens

    def _allocate(self, request: EngineRequest) -> int | None:
        cache = self.runner.cache
        tokens = self._reservation(request)
        if cache.num_used_rows >= self.config.max_batch_size or not cache.can_admit(tokens):
            return None
        return cache.allocate(tokens)

    def _unallocate(self, row: int, request: EngineRequest) -> None:
        self.runner.cache.free(row, self._reservation(request), 0)  # the last row: nothing moves

    def _start(self, admitted: list[Admission]) -> None:
        failed = self._load_adapters(admitted)
        dropped = [a for a in admitted if a.slot in failed]
        for admission in admitted:
            if admission.slot in failed:
                continue
            try:
                seq = self._new_sequence(admission)
            except Exception as exc:  # fail this request alone, leaving nothing held
                log.exception("starting request %s failed", admission.request.request_id)
                if admission.grant is not None:
                    self.slots.release(admission.slot)
                admission.request.emit(exc)
                dropped.append(admission)
                continue
            admission.request.admitted = time.monotonic()
            self._batch.add(seq)
        for admission in sorted(dropped, key=lambda a: -a.row):
            self._free_row(admission.row, self._reservation(admission.request))
            self.scheduler.finished(admission.request)

    # -- one step: every decode and a budget of prompt chunks in one forward ----------------
    def _run_step(self) -> None:
        """Chunked prefill: each step decodes every decoding sequence and prefills at most
        max_prefill_tokens prompt tokens (first come, first served, a long prompt over several
        steps), so a long prompt delays running decodes by one chunk's compute, not its own.
        Prompt chunks ride along with the decodes rather than taking steps of their own: on a
        CPU a forward's fixed cost is a large part of a step, and prefill-only steps measured
        worse for both TTFT and inter-token latency (see the README's benchmark notes)."""
        decodes: list[DecodeWork] = []
        prefills: list[PrefillWork] = []
        decoding: list[Sequence] = []
        chunked: list[tuple[Sequence, int]] = []
        budget = self.config.max_prefill_tokens
        for seq in self._batch.seqs:
            if not seq.prefilling:
                decoding.append(seq)
            elif budget > 0:
                n = min(budget, seq.prompt_len - seq.num_cached)
                start = seq.num_cached
                tokens = seq.request.prompt_ids[start : start + n]
                done = start + n == seq.prompt_len
                prefills.append(PrefillWork(seq.row, seq.slot, tokens, start, done))
                chunked.append((seq, n))
                budget -= n
        # In slot order: each adapter's decode tokens are then contiguous (see lora_ops); the
        # merged adapter's first, so that everyone else's are one run (ModelRunner._plans).
        merged = self.merge.slot
        decoding.sort(key=lambda seq: (seq.slot != merged, seq.slot))
        for seq in decoding:
            decodes.append(DecodeWork(seq.row, seq.slot, seq.last_token, seq.num_cached))
        logits = self.runner.step(decodes, prefills)
        for seq in decoding:
            seq.num_cached += 1
        finishing = []
        for seq, n in chunked:
            seq.num_cached += n
            if not seq.prefilling:
                finishing.append(seq)
        sampled = decoding + finishing  # the order of the logits rows
        self._count_step(decoding, chunked)
        tokens = sample(logits, [s.request.params for s in sampled], [s.generator for s in sampled])
        self.merge_policy.observe(_token_counts(decoding, chunked))
        generated: Counter[str] = Counter()
        for seq, token in zip(sampled, tokens, strict=True):
            generated[seq.request.tenant] += 1
            if self._advance(seq, token):
                self._retire(seq)
        self.scheduler.charge(generated)

    def _count_step(self, decoding: list[Sequence], chunked: list[tuple[Sequence, int]]) -> None:
        stats = self.stats
        if chunked:
            stats.prefill_steps += 1
            stats.prefill_tokens += sum(n for _, n in chunked)
        if decoding:
            stats.decode_steps += 1
            stats.max_batch_size = max(stats.max_batch_size, len(decoding))
            if len({s.slot for s in decoding}) > 1:
                stats.mixed_adapter_steps += 1
            if chunked:
                stats.mixed_prefill_decode_steps += 1

    def _load_adapters(self, admitted: list[Admission]) -> set[int]:
        """Write newly granted adapters into their slots; returns the slots whose load failed,
        after failing every admitted request that shares them and freeing the slots."""
        failed: dict[int, Exception] = {}
        for admission in admitted:
            grant, request = admission.grant, admission.request
            if grant is None or not grant.needs_load:
                continue
            try:
                self._load_slot(grant.slot, request.adapter, request.weights)
            except Exception as exc:
                failed[grant.slot] = exc
        for admission in admitted:
            if admission.slot in failed:
                self.slots.release(admission.slot)
                admission.request.emit(failed[admission.slot])
        for slot in failed:
            self.slots.discard(slot)
        return set(failed)

    def _load_slot(
        self, slot: int, adapter: AdapterVersion | None, weights: AdapterWeights | None
    ) -> None:
        """Write an adapter into `slot` (host -> device; weights None: read them with
        `load_weights`); on failure the slot is cleared and the error raised."""
        assert adapter is not None
        start = time.perf_counter()
        try:
            if weights is None:
                assert self.load_weights is not None, "set Engine.load_weights to serve adapters"
                weights = self.load_weights(adapter)
            self.runner.load_adapter(slot, weights)
        except Exception as exc:
            log.warning("loading adapter %s v%d failed: %s", *adapter.key, exc)
            self.runner.clear_slot(slot)
            self.slots.stats.load_failures += 1
            raise
        self.slots.stats.loaded(time.perf_counter() - start)
        self.stats.adapter_loads += 1
        log.debug("adapter %s v%d loaded into slot %d", *adapter.key, slot)

    def _prefetch(self) -> None:
        """Load the adapters of queued requests into free (or idle) slots while they wait, so
        they start without a load; slots wanted by requests further ahead are left alone."""
        wanted: set[tuple[str, int]] = set()
        loads = 0
        for request in self.scheduler.peek(self.config.max_loras):
            if request.adapter is None or request.cancelled.is_set():
                continue
            key = request.adapter.key
            if key not in wanted and self.slots.lookup(key) is None:
                grant = self.slots.prefetch(key, protect=wanted)
                if grant is None:
                    return
                try:
                    self._load_slot(grant.slot, request.adapter, request.weights)
                except Exception:
                    self.slots.discard(grant.slot)  # the request fails when admitted
                    return
                loads += 1
                if loads >= PREFETCH_PER_STEP:
                    return
            wanted.add(key)

    def pin(self, adapter: AdapterVersion, weights: AdapterWeights | None = None) -> None:
        """Keep an adapter in a device slot until `unpin` (call on the engine thread)."""
        grant = self.slots.pin(adapter.key)
        if grant is None:
            raise Exhausted(
                "no device slot can be pinned: every slot is in use or pinned "
                f"(max_loras={self.slots.num_slots}, one slot stays unpinned)",
                PIN_RETRY_S,
            )
        if grant.needs_load:
            try:
                self._load_slot(grant.slot, adapter, weights)
            except Exception:
                self.slots.unpin(adapter.key)
                self.slots.discard(grant.slot)
                raise

    def unpin(self, adapter: AdapterVersion) -> None:
        self.slots.unpin(adapter.key)

    # -- merging an adapter into the base -----------------------------------------------------
    def _consider_merge(self) -> None:
        """Ask the merge policy (every MERGE_CHECK_S, idle or not) and merge or unmerge as it
        says; unmerge at once when a queued request needs the slot the merge holds."""
        now = time.monotonic()
        if self.merge.pinned or now < self._next_merge_check:
            return
        self._next_merge_check = now + MERGE_CHECK_S
        queued: TokenCounts = Counter()
        starved = False
        for request in self.scheduler.peek(MERGE_QUEUE_LOOKAHEAD):
            key = request.adapter.key if request.adapter is not None else None
            queued[key] += len(request.prompt_ids) + request.params.max_new_tokens
            starved |= key is not None and self.slots.lookup(key) is None
        starved = starved and self.merge.key is not None and not self.slots.has_room()
        policy = self.merge_policy
        shares = policy.shares(self.merge.key, queued)
        self.merge.leader, self.merge.leader_share = shares.leader, shares.leader_share
        self.merge.merged_share = shares.merged_share
        want = None if starved else policy.decide(self.merge.key, queued)
        if want == self.merge.key:
            return
        if self.merge.key is not None:
            self._unmerge()
        slot = self.slots.lookup(want) if want is not None else None
        # Resident (it leads the traffic, so it normally is), and a slot stays for the rest.
        if (
            want is not None
            and slot is not None
            and self.slots.reserved() < self.slots.num_slots - 1
        ):
            self.slots.acquire(want)
            try:
                self._merge_slot(want, slot)
            except Exception:
                log.exception("merging adapter %s v%d failed; serving it unmerged", *want)
                self.slots.release(slot)
        policy.changed()

    def _merge_slot(self, key: AdapterKey, slot: int) -> None:
        """Fold the adapter in `slot` (the caller took a reference to it) into the base."""
        start = time.perf_counter()
        layers = self.runner.merge(slot)
        seconds = time.perf_counter() - start
        self.merge.key, self.merge.slot = key, slot
        self.slots.held = {slot}
        self.merge.merges += 1
        self.merge.last_merge_s = seconds
        log.info("adapter %s v%d merged into the base (%d layers, %.0f ms)", *key, layers,
                 seconds * 1e3)  # fmt: skip

    def _unmerge(self) -> None:
        assert self.merge.key is not None and self.merge.slot is not None
        start = time.perf_counter()
        self.runner.unmerge()
        self.slots.held = set()
        self.slots.release(self.merge.slot)
        seconds = time.perf_counter() - start
        log.info("adapter %s v%d unmerged (%.1f ms)", *self.merge.key, seconds * 1e3)
        self.merge.key, self.merge.slot, self.merge.pinned = None, None, False
        self.merge.unmerges += 1
        self.merge.last_unmerge_s = seconds

    def merge_pinned(self, adapter: AdapterVersion, weights: AdapterWeights | None = None) -> None:
        """Merge `adapter` into the base and keep it merged until `unmerge_pinned` (call on
        the engine thread). What was merged before stays merged when no slot can be had or
        the adapter fails to load."""
        key = adapter.key
        if self.merge.key == key:
            self.merge.pinned = True
            return
        taken = self.slots.reserved() - (1 if self.merge.key is not None else 0)
        grant = self.slots.acquire(key) if taken < self.slots.num_slots - 1 else None
        if grant is None:
            raise Exhausted(
                "no device slot can hold the adapter to merge: every slot is in use, pinned "
                f"or merged (max_loras={self.slots.num_slots}, one slot stays for the rest)",
                PIN_RETRY_S,
            )
        try:
            if grant.needs_load:
                self._load_slot(grant.slot, adapter, weights)
            if self.merge.key is not None:
                self._unmerge()
            self._merge_slot(key, grant.slot)
        except Exception:
            self.slots.release(grant.slot)
            if grant.needs_load:
                self.slots.discard(grant.slot)
            raise
        self.merge.pinned = True
        self.merge_policy.changed()

    def unmerge_pinned(self) -> None:
        """Undo the merge, pinned or not (call on the engine thread); the policy decides
        again after its minimum interval."""
        if self.merge.key is not None:
            self._unmerge()
            self.merge_policy.changed()

    def _new_sequence(self, admission: Admission) -> Sequence:
        request = admission.request
        return Sequence(
            request=request,
            slot=admission.slot,
            output=OutputProcessor(self.runner.loaded.tokenizer, request.params.stop),
            generator=make_generator(request.params, self.runner.device),
            row=admission.row,
            reserved=self._reservation(request),
        )

    def _advance(self, seq: Sequence, token: int) -> bool:
        """Feed one sampled token to a sequence and emit its news; True when it finished."""
        seq.num_generated += 1
        seq.last_token = token
        self.stats.generated_tokens += 1
        finish: str | None = None
        if token in self._eos_token_ids and not seq.request.params.ignore_eos:
            step, finish = seq.output.finish(), "stop"
        else:
            step = seq.output.append(token)
            if step.stop_reason is not None:
                finish = "stop"
            elif (
                seq.num_generated >= seq.request.params.max_new_tokens
                or seq.num_tokens >= self.runner.max_context
            ):
                rest = seq.output.finish()
                step = StepText(step.delta + rest.delta, rest.stop_reason)
                finish = "stop" if rest.stop_reason is not None else "length"
        text, stop_reason = step.delta, step.stop_reason
        usage = None
        if finish is not None:
            usage = Usage(len(seq.request.prompt_ids), seq.num_generated)
        seq.request.emit(RequestOutput(text, [token], finish, stop_reason, usage))
        return finish is not None

    def _drop_cancelled(self) -> None:
        """Retire cancelled sequences, and end those past the time limit (queued ones too)."""
        for seq in [s for s in self._batch.seqs if s.request.cancelled.is_set()]:
            self._retire(seq)
        limit = self.config.max_request_seconds
        too_old = time.monotonic() - limit
        overdue = [s for s in self._batch.seqs if s.request.arrival < too_old]
        for request in self.scheduler.remove_older_than(too_old):
            overdue_request(request, limit)
        for seq in overdue:
            self._retire(seq)
            overdue_request(seq.request, limit)

    def _retire(self, seq: Sequence) -> None:
        """Free a finished (or failed, or cancelled) sequence's cache row and adapter slot."""
        self._release(seq)
        self._batch.remove(seq)
        self._free_row(seq.row, seq.reserved)
        self.scheduler.finished(seq.request)

    def _free_row(self, row: int, reserved: int) -> None:
        """Give a row back to the cache; the sequence in the last row moves into it."""
        cache = self.runner.cache
        last = self._batch.by_row.get(cache.num_used_rows - 1)
        moved = cache.free(row, reserved, last.num_cached if last else 0)
        if moved is not None:
            self._batch.move(moved, row)

    def _release(self, seq: Sequence) -> None:
        """Drop the sequence's reference to its adapter slot (once, whatever calls it)."""
        if seq.slot != NO_ADAPTER and not seq.released:
            seq.released = True
            self.slots.release(seq.slot)

    def _fail_all(self, exc: BaseException) -> None:
        for seq in list(self._batch.seqs):
            self._retire(seq)
            seq.request.emit(exc)


def _token_counts(decoding: list[Sequence], chunked: list[tuple[Sequence, int]]) -> TokenCounts:
    """Tokens of one step per adapter version (None: the base model)."""
    counts: TokenCounts = Counter()
    for seq in decoding:
        adapter = seq.request.adapter
        counts[adapter.key if adapter is not None else None] += 1
    for seq, n in chunked:
        adapter = seq.request.adapter
        counts[adapter.key if adapter is not None else None] += n
    return counts


def overdue_request(request: EngineRequest, limit: float) -> None:
    request.emit(TooLong(f"the request ran past the server's limit of {limit:g} s"))


def eos_ids_of(model: torch.nn.Module, tokenizer: object) -> set[int]:
    """End-of-sequence ids from the generation config and the tokenizer."""
    ids: set[int] = set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    tok_eos = getattr(tokenizer, "eos_token_id", None)
    if tok_eos is not None:
        ids.add(int(tok_eos))
    return ids
