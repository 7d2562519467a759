"""The engine loop, on one thread that owns the model, the KV cache and the adapter slots:

    admit waiting requests (a KV cache row each) -> one forward: a decode token for every
    decoding sequence plus a budget of prompt chunks -> sample, emit new text, retire finished
    sequences and free their cache rows and adapter slots.

The engine is sealed: other threads act on it only through its thread-safe methods (`submit`,
`cancel`, `call` and the slot and merge operations, which run between two steps) and see its
state only through `info` and the snapshots the engine thread builds (`snapshot`); outputs
leave through each request's `emit` callback.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

import torch

from loraplex.core.errors import (
    DeviceOutOfMemory,
    InvalidRequest,
    NotReady,
    TooLong,
    Unmeetable,
    Unrecoverable,
)
from loraplex.core.machine import machine_key
from loraplex.core.model import eos_ids_of
from loraplex.core.types import AdapterVersion, AdapterWeights
from loraplex.server.config import EngineConfig, MergeSettings
from loraplex.server.engine.batch import RunningBatch, Sequence
from loraplex.server.engine.controls import RowControls, apply_controls
from loraplex.server.engine.emitter import OutputThread, QueuedEmit
from loraplex.server.engine.logprobs import token_logprobs
from loraplex.server.engine.lora import NO_ADAPTER
from loraplex.server.engine.merging import MergeControl, TokenCounts
from loraplex.server.engine.model_runner import DecodeWork, ModelRunner, PrefillWork
from loraplex.server.engine.output import OutputProcessor, StepText
from loraplex.server.engine.pacing import Pacing
from loraplex.server.engine.paged_kv import PagedKVCache
from loraplex.server.engine.prefix_cache import BLOCK_TOKENS, Namespace, PrefixCache
from loraplex.server.engine.request import EngineRequest, RequestOutput, TokenLogprob, Usage
from loraplex.server.engine.sampling import make_generator, sample
from loraplex.server.engine.scheduler import QUEUE_RETRY_S, Admission, Scheduler
from loraplex.server.engine.slot_loader import SlotLoader, WeightsLoader
from loraplex.server.engine.slots import SlotTable
from loraplex.server.engine.state import (
    EngineInfo,
    EngineSnapshot,
    EngineStats,
    PrefixCacheView,
    SlotView,
)
from loraplex.server.engine.structured import allocate_bitmask, apply_masks, fill_masks
from loraplex.server.logs import shown_ids

log = logging.getLogger(__name__)

T = TypeVar("T")
SNAPSHOT_WAIT_S = 5.0  # how long recent_snapshot waits for the next step boundary
DEADLINE_CHECK_S = 0.25  # how often queued requests' deadlines are checked
OOM_RETRY_S = 1.0  # the retry advice to the requests of a step that ran out of device memory


class Engine:
    """Owns one thread on which ALL of its tensor work runs: loading the model (`make_runner`),
    the steps, and whatever `call` hands it (e.g. composing adapters).

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
        self._slots = SlotTable(config.max_loras or 1)  # auto: sized once the runner is built
        self._pacing = Pacing(config.max_batch_size, config.max_prefill_tokens)
        self._scheduler = Scheduler(config, self._slots, self._pacing)
        self._deadlines_checked = 0.0
        self._stats = EngineStats()
        self._loader = SlotLoader(self._slots, self._model, self._stats, load_weights)
        self._merges = MergeControl(config.merge, self._slots, self._model, self._loader.load)
        self._make_runner = make_runner
        self._runner: ModelRunner | None = None
        self._info: EngineInfo | None = None
        self._eos_token_ids: set[int] = set()
        self._batch = RunningBatch()
        self._bitmask: torch.Tensor | None = None  # the constrained rows' token masks
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._calls_lock = threading.Lock()
        self._calls_closed = False  # under _calls_lock: no call is accepted once set
        self._started = Future[EngineInfo]()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_snapshot: EngineSnapshot | None = None
        # Set once the device failed for good (a CUDA error sticks to its context): every
        # request is refused from then on, and `on_failure` hears it (health NOT_SERVING).
        self.failure: Unrecoverable | None = None
        self.on_failure: list[Callable[[Unrecoverable], None]] = []
        # outputs rendered and emitted off the engine thread (--async-output), or None
        self._outputs: OutputThread | None = None

    # -- the public, thread-safe side ---------------------------------------------------------
    def start(self, timeout: float | None = None) -> EngineInfo:
        """Start the engine thread; returns once it loaded the model (or raises why not)."""
        self._thread = threading.Thread(target=self._run, name="loraplex-engine", daemon=True)
        self._thread.start()
        return self._started.result(timeout)

    @property
    def info(self) -> EngineInfo:
        if self._info is None:
            raise NotReady("the engine has not started")
        return self._info

    def check(self) -> None:
        """Raise QueueFull (or NotReady) if a request would be refused now: a cheap check
        before any work on a request (`submit` decides; this only refuses early)."""
        if self.failure is not None:
            raise self.failure
        self._scheduler.check()

    def submit(self, request: EngineRequest) -> None:
        """Queue a request (raises QueueFull, or NotReady once the engine is stopping;
        InvalidRequest when its samples could never run at once)."""
        n = request.params.n
        if n > 1:
            cache = self._model().cache  # its sizes: fixed once built
            if n > min(self.config.max_batch_size, cache.num_rows):
                raise InvalidRequest(
                    "n", f"{n} samples; at most {min(self.config.max_batch_size, cache.num_rows)}"
                )
            tokens = min(self._reservation(request), cache.max_len)
            if not cache.holds(tokens, n):
                raise InvalidRequest(
                    "n",
                    f"{n} samples of {tokens} tokens each (prompt + max_new_tokens) exceed the "
                    f"KV cache's {cache.token_budget} tokens",
                )
        if self._outputs is not None:
            self._outputs.adopt(request)
        self._scheduler.add(request)

    def cancel(self, request: EngineRequest) -> None:
        """Stop a request: a queued one leaves the queue now, a running one is dropped at the
        next step (its outputs stop; nothing more is emitted but what is under way)."""
        request.cancel()
        self._scheduler.remove(request)

    def call(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread between two steps; its result comes in the future.
        Called on the engine thread itself (from inside a call), `fn` runs at once."""
        future: Future[T] = Future()
        if threading.current_thread() is self._thread:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
            return future
        with self._calls_lock:
            if self._calls_closed:
                future.set_exception(NotReady("the engine is shutting down"))
                return future
            self._calls.put((fn, future))
        self._scheduler.wake()
        return future

    def with_model(self, fn: Callable[[ModelRunner], T]) -> Future[T]:
        """Run `fn(model runner)` on the engine thread between two steps (tools and tests that
        need the model itself, e.g. one prefill's logits)."""
        return self.call(lambda: fn(self._model()))

    def snapshot(self) -> Future[EngineSnapshot]:
        """The engine's state, built on the engine thread between two steps."""
        return self.call(self._snapshot)

    def recent_snapshot(self, wait_s: float = SNAPSHOT_WAIT_S) -> EngineSnapshot | None:
        """Blocking: the state at the next step boundary, or, when that takes longer than
        `wait_s` (a long step) or the engine has stopped, the last snapshot it built (a step or
        more old; None if it never built one). For readers that must answer regardless."""
        try:
            return self.snapshot().result(wait_s)
        except (TimeoutError, NotReady):
            return self._last_snapshot

    def slot_limit(self) -> tuple[int, str]:
        """The number of adapter slots now and why (--max-loras auto follows the adapters'
        ranks: see ModelRunner.slot_limit); any thread."""
        return self._loader.limit

    def pin(self, adapter: AdapterVersion, weights: AdapterWeights | None = None) -> Future[None]:
        """Keep an adapter in a device slot until `unpin` (Exhausted when no slot can be
        pinned: one always stays unpinned)."""
        return self.call(lambda: self._loader.pin(adapter, weights))

    def unpin(self, adapter: AdapterVersion) -> Future[None]:
        return self.call(lambda: self._slots.unpin(adapter.key))

    def merge(self, adapter: AdapterVersion, weights: AdapterWeights | None = None) -> Future[None]:
        """Fold an adapter into the base and keep it there until `unmerge` (the merge policy
        leaves a merge made here alone)."""
        return self.call(lambda: self._merges.merge_pinned(adapter, weights))

    def unmerge(self) -> Future[None]:
        """Undo the merge, whoever made it."""
        return self.call(self._merges.unmerge_pinned)

    def configure_merges(self, settings: MergeSettings) -> Future[None]:
        """Replace the merge policy's settings (its token window starts empty)."""
        return self.call(lambda: self._merges.configure(settings))

    def observe_adapter_loads(self, observer: Callable[[float], None]) -> Future[None]:
        """Call `observer(seconds)` on the engine thread after each adapter load into a slot
        (it must not block); from the next step on."""
        return self.call(lambda: self._slots.stats.load_observers.append(observer))

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new requests, fail those still queued or running, and join the thread."""
        self._scheduler.close()
        self._stopping.set()
        self._scheduler.wake()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the engine thread --------------------------------------------------------------------
    def _model(self) -> ModelRunner:
        if self._runner is None:
            raise NotReady("the engine has not started")
        return self._runner

    def _run(self) -> None:
        try:
            runner = self._runner = self._make_runner()
            self._loader.fit()
            self._eos_token_ids = eos_ids_of(runner.model, runner.loaded.tokenizer)
            self._info = engine_info(runner, self._eos_token_ids)
            self._time_full_batch(runner)
            if async_output(self.config.async_output, runner.device):
                self._outputs = OutputThread()
                self._outputs.start()
        except BaseException as exc:
            self._started.set_exception(exc)
            self._scheduler.close()
            with self._calls_lock:
                self._calls_closed = True
            return
        self._started.set_result(self._info)
        log.info("engine started")
        while not self._stopping.is_set():
            try:
                self._run_calls()
                self._step()
            except Exception as exc:
                self._step_failed(exc)
        running = [seq.request for seq in self._batch.seqs]
        queued = self._scheduler.drain()
        if running or queued:
            log.warning(
                "stopping: %d running and %d queued requests cut: %s",
                len(running),
                len(queued),
                shown_ids([r.request_id for r in running + queued]),
            )
        self._fail_all(NotReady("the engine stopped"))
        for request in queued:
            request.emit(NotReady("the engine stopped"))
        with self._calls_lock:
            self._calls_closed = True
        self._run_calls()
        if self._outputs is not None:
            self._outputs.stop()  # everything queued is emitted
        log.info("engine stopped")

    def _time_full_batch(self, runner: ModelRunner) -> None:
        """Time a decode step of a full batch (one cached token per row, base model) for the
        pacing, which otherwise would judge the first burst by the warm-up's one-row steps."""
        cache = runner.cache
        rows: list[int] = []
        while len(rows) < self.config.max_batch_size and cache.can_admit(1):
            rows.append(cache.allocate(1))
        if not rows:
            return
        work = [DecodeWork(row=r, slot=NO_ADAPTER, token=0, position=0) for r in rows]
        try:
            runner.step(work, [])  # the first of a size pays for one-time work
            start = time.monotonic()
            runner.step(work, [])
            self._pacing.step(time.monotonic() - start, len(rows))
        finally:
            for row in reversed(rows):
                cache.free(row, 1, 0)

    def _run_calls(self) -> None:
        """Run the calls queued now, not those queued while they run: a caller that chains
        calls (a composition's build, a slice at a time) gets one between two steps, instead
        of holding the steps back for as long as it keeps the queue filled."""
        for _ in range(self._calls.qsize()):
            fn, future = self._calls.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as exc:
                    future.set_exception(exc)

    def _step(self) -> None:
        self._drop_cancelled()
        admitted, dropped = self._scheduler.admit(self._allocate, self._unallocate)
        for request in dropped:
            log.debug("request %s cancelled while waiting", request.request_id)
        if admitted:
            self._start(admitted)
        self._loader.prefetch(self._scheduler.peek(self._slots.num_slots))
        self._merges.consider(self._scheduler.peek, not self._batch.seqs, self._wanted)
        if not self._batch.seqs:
            self._scheduler.wait(timeout=0.5, unless=lambda: not self._calls.empty())
            return
        self._run_step()

    def _wanted(self) -> bool:
        """Whether a request or a call waits for the engine (an idle engine's side work,
        preparing a merge, gives way)."""
        return self._scheduler.num_waiting() > 0 or not self._calls.empty()

    def _snapshot(self) -> EngineSnapshot:
        cache, slots = self._model().cache, self._slots
        pinned = set(slots.pinned_keys())
        seqs = self._batch.seqs
        waiting = self._scheduler.peek(self.config.max_queue)
        self._last_snapshot = EngineSnapshot(
            running=len(seqs),
            waiting=self._scheduler.num_waiting(),
            queued_tokens=self._scheduler.queued_tokens(),
            running_adapters=_adapter_ids(s.request for s in seqs),
            waiting_adapters=_adapter_ids(waiting),
            kv_cache_usage=cache.usage,
            kv_rows_used=cache.num_used_rows,
            kv_blocks=(
                (cache.num_blocks, cache.allocator.num_used)
                if isinstance(cache, PagedKVCache)
                else None
            ),
            num_slots=slots.num_slots,
            slots=tuple(
                SlotView(
                    slot=slot, adapter=key, refcount=slots.refcount(slot), pinned=key in pinned
                )
                for slot, key in sorted(slots.resident().items())
            ),
            device_tier=dataclasses.replace(slots.stats, load_observers=[]),
            merge=self._merges.state(),
            stats=dataclasses.replace(self._stats),
            prefix_cache=_prefix_view(self._model().prefix),
        )
        return self._last_snapshot

    # -- admission ----------------------------------------------------------------------------
    def _reservation(self, request: EngineRequest) -> int:
        """KV cache tokens a request may need: its prompt and every token it may generate."""
        return len(request.prompt_ids) + request.params.max_new_tokens

    def _allocate(self, request: EngineRequest) -> tuple[int, ...] | None:
        """A row for each of the request's samples, or None if they do not all fit."""
        cache = self._model().cache
        tokens, n = self._reservation(request), request.params.n
        if cache.num_used_rows + n > self.config.max_batch_size or not cache.can_admit(tokens, n):
            return None
        return tuple(cache.allocate(tokens) for _ in range(n))

    def _unallocate(self, rows: tuple[int, ...], request: EngineRequest) -> None:
        for row in sorted(rows, reverse=True):  # the last rows: nothing moves
            self._model().cache.free(row, self._reservation(request), 0)

    def _start(self, admitted: list[Admission]) -> None:
        chosen = time.monotonic()
        failed = self._loader.load_admitted(admitted)
        loaded = time.monotonic()
        dropped = [a for a in admitted if a.slot in failed]
        for admission in admitted:
            if admission.slot in failed:
                continue
            try:
                seqs = self._new_sequences(admission)
            except Exception as exc:  # fail this request alone, leaving nothing held
                log.exception("starting request %s failed", admission.request.request_id)
                if admission.grant is not None:
                    self._slots.release(admission.slot)
                admission.request.emit(exc)
                dropped.append(admission)
                continue
            admission.request.admitted, admission.request.loaded = chosen, loaded
            for seq in seqs:
                self._batch.add(seq)
        rows = [(row, a.request) for a in dropped for row in a.rows]
        for row, request in sorted(rows, key=lambda r: -r[0]):  # the highest first: each is
            # the last row then, or a running sequence moves into it
            self._free_row(row, self._reservation(request))
        for admission in dropped:
            self._scheduler.finished(admission.request)

    # -- one step: every decode and a budget of prompt chunks in one forward ----------------
    def _run_step(self) -> None:
        """Chunked prefill: each step decodes every decoding sequence and prefills at most
        max_prefill_tokens prompt tokens (first come, first served, a long prompt over several
        steps), so a long prompt delays running decodes by one chunk's compute, not its own.
        Prompt chunks ride along with the decodes rather than taking steps of their own: on a
        CPU a forward's fixed cost is a large part of a step, and prefill-only steps measured
        worse for both TTFT and inter-token latency (see the README's benchmark notes)."""
        started = time.monotonic()
        decodes: list[DecodeWork] = []
        prefills: list[PrefillWork] = []
        decoding: list[Sequence] = []
        chunked: list[tuple[Sequence, int]] = []
        budget = self.config.max_prefill_tokens
        for seq in self._batch.seqs:
            if seq.waits_for is not None:  # a sample waiting for its prompt's first sample
                continue
            if not seq.prefilling:
                decoding.append(seq)
            elif budget > 0:
                if seq.prefix_pending:
                    self._load_prefix(seq)
                n = min(budget, seq.prompt_len - seq.num_cached)
                start = seq.num_cached
                tokens = seq.request.prompt_ids[start : start + n]
                done = start + n == seq.prompt_len
                prefills.append(
                    PrefillWork(
                        row=seq.row,
                        slot=seq.slot,
                        tokens=tokens,
                        start=start,
                        wants_logits=done,
                        all_logits=seq.prompt_logprobs is not None,
                    )
                )
                chunked.append((seq, n))
                budget -= n
                if seq.request.prefill_started is None:
                    seq.request.prefill_started = started
        # In slot order: each adapter's decode tokens are then contiguous (see lora_ops); the
        # merged adapter's first, so that everyone else's are one run (ModelRunner._plans);
        # in row order within a slot (base-only steps then read the cache rows in place).
        merged = self._merges.slot
        decoding.sort(key=lambda seq: (seq.slot != merged, seq.slot, seq.row))
        for seq in decoding:
            decodes.append(
                DecodeWork(
                    row=seq.row, slot=seq.slot, token=seq.last_token, position=seq.num_cached
                )
            )
        logits = self._model().step(decodes, prefills)
        for seq in decoding:
            seq.num_cached += 1
        # The logits rows: one per decode, then per prompt chunk all its positions (prompt
        # log-probabilities) or its last when it ends the prompt, or none.
        at = [*range(len(decoding))]  # the logits row each sampled sequence reads
        finishing = []
        offset = len(decoding)
        for (seq, n), work in zip(chunked, prefills, strict=True):
            width = n if work.all_logits else int(work.wants_logits)
            if seq.prompt_logprobs is not None:
                self._score_prompt(seq, logits[offset : offset + width])
            seq.num_cached += n
            if not seq.prefilling:
                finishing.append(seq)
                at.append(offset + width - 1)
            offset += width
        forked = self._fork(finishing, at)
        sampled = decoding + finishing + forked
        if at != [*range(logits.shape[0])]:
            logits = logits.index_select(
                0, torch.tensor(at, dtype=torch.long, device=logits.device)
            )
        self._count_step(decoding, chunked)
        params = [s.request.params for s in sampled]
        chosen = self._constrain(apply_controls(logits, [s.controls for s in sampled]), sampled)
        tokens = sample(chosen, params, [s.generator for s in sampled])
        logprobs = self._logprobs(logits, sampled, tokens)
        self._merges.observe(_token_counts(decoding, chunked))
        generated: Counter[str] = Counter()
        ended = []
        for seq, token, logprob in zip(sampled, tokens, logprobs, strict=True):
            generated[seq.request.tenant] += 1
            if seq.controls is not None:
                seq.controls.accept(token)
            if seq.matcher is not None:
                seq.matcher.accept(token)
            if self._advance(seq, token, logprob):
                if not seq.request.params.ignore_eos:
                    self._pacing.generated(seq.num_generated)
                ended.append(seq)
        self._keep_prefixes([seq for seq, _ in chunked], ended)
        for seq in ended:
            self._retire(seq)
        self._scheduler.charge(generated)
        if decoding and not chunked:  # a running request's pace: one token a step (prompt
            # chunks are the pacing's to count apart)
            self._pacing.step(time.monotonic() - started, len(decoding))

    def _fork(self, finishing: list[Sequence], at: list[int]) -> list[Sequence]:
        """The samples waiting for a prompt that just finished: each takes a copy of the
        prompt's keys and values, and its first token from the same logits (`at` gets their
        rows). Returns them, in the order of their rows in `at`."""
        forked = []
        cache = self._model().cache
        rows = at[len(at) - len(finishing) :]
        for seq, row in zip(finishing, rows, strict=True):
            for sibling in seq.family:
                if sibling.waits_for is seq:
                    cache.copy_prefix(seq.row, sibling.row, seq.prompt_len)
                    sibling.num_cached = seq.prompt_len
                    sibling.waits_for = None
                    forked.append(sibling)
                    at.append(row)
        return forked

    def _keep_prefixes(self, prompted: list[Sequence], ended: list[Sequence]) -> None:
        """Cache, for later requests, the whole blocks of the prompts chunked in this step,
        as far as they are computed (a long prompt's first chunks serve the requests that
        start after them, before it ends), and of the sequences that end in it (prompt and
        answer: the next turn of their conversation starts with both), all in one copy per
        layer."""
        prefix = self._model().prefix
        if prefix is None:
            return
        items = []
        for seq in ended:  # everything fed to it: all but its last token
            fed = seq.generated[: seq.num_cached - seq.prompt_len]
            items.append((seq, seq.request.prompt_ids + fed))
        items += [
            (seq, seq.request.prompt_ids[: seq.num_cached]) for seq in prompted if seq not in ended
        ]
        stored = []
        for seq, tokens in items:
            if seq.prompt_logprobs is None:
                namespace = _namespace(seq.request)
                seq.prefix_chain = prefix.digests(namespace, tokens, seq.prefix_chain)
                stored.append((namespace, seq.prefix_chain, seq.row))
        prefix.store_many(stored, self._model().cache)

    def forget_prefixes(self, adapter_id: str) -> Future[int]:
        """Drop the cached prefixes made with an adapter (a new version or its deletion makes
        them unreachable): the number of blocks freed."""
        return self.call(lambda: self._drop_prefixes(adapter_id))

    def _drop_prefixes(self, adapter_id: str) -> int:
        prefix = self._model().prefix
        return prefix.drop(adapter_id) if prefix is not None else 0

    def _constrain(self, logits: torch.Tensor, sampled: list[Sequence]) -> torch.Tensor:
        """logits (S, V) of the sampled sequences with every token their constraints do not
        allow next at -inf (the rows of unconstrained sequences untouched); a copy, when any
        row is constrained, so that the raw logits stay for log-probabilities."""
        rows = [(s.matcher, i) for i, s in enumerate(sampled) if s.matcher is not None]
        if not rows:
            return logits
        if self._bitmask is None or self._bitmask.shape[0] < len(sampled):
            self._bitmask = allocate_bitmask(max(len(sampled), self.config.max_batch_size),
                                             logits.shape[-1])  # fmt: skip
        fill_masks(self._bitmask, rows)
        out = logits if any(s.controls is not None for s in sampled) else logits.clone()
        apply_masks(out, [i for _, i in rows], self._bitmask)
        return out

    def _score_prompt(self, seq: Sequence, logits: torch.Tensor) -> None:
        """Add a prompt chunk's log-probabilities: logits (n, V), one row per chunk position,
        each scoring the prompt's next token (the last prompt position scores nothing)."""
        assert seq.prompt_logprobs is not None
        prompt, start = seq.request.prompt_ids, seq.num_cached
        count = min(logits.shape[0], len(prompt) - 1 - start)
        if count > 0:
            top = seq.request.params.prompt_logprobs or 0
            seq.prompt_logprobs += token_logprobs(
                logits[:count], prompt[start + 1 : start + 1 + count], [top] * count
            )

    def _logprobs(
        self, logits: torch.Tensor, sampled: list[Sequence], tokens: list[int]
    ) -> list[TokenLogprob | None]:
        """Each sampled token's log-probability, for the sequences that ask (else None)."""
        rows = [i for i, s in enumerate(sampled) if s.request.params.logprobs is not None]
        out: list[TokenLogprob | None] = [None] * len(sampled)
        if not rows:
            return out
        index = torch.tensor(rows, device=logits.device)
        tops = [sampled[i].request.params.logprobs or 0 for i in rows]
        found = token_logprobs(logits.index_select(0, index), [tokens[i] for i in rows], tops)
        for i, logprob in zip(rows, found, strict=True):
            out[i] = logprob
        return out

    def _count_step(self, decoding: list[Sequence], chunked: list[tuple[Sequence, int]]) -> None:
        stats = self._stats
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

    def _new_sequences(self, admission: Admission) -> list[Sequence]:
        """A sequence for each of the request's samples: the first prefills the prompt, the
        others wait for it (see batch.py)."""
        request, params = admission.request, admission.request.params
        runner = self._model()
        family: list[Sequence] = []
        for index, row in enumerate(admission.rows):
            seq = Sequence(
                request=request,
                slot=admission.slot,
                output=OutputProcessor(
                    runner.loaded.tokenizer,
                    params.stop,
                    params.min_tokens,
                    params.include_stop_str_in_output,
                ),
                generator=make_generator(params, index),
                row=row,
                reserved=self._reservation(request),
                index=index,
                family=family,
                waits_for=family[0] if family else None,
                matcher=request.constraint.matcher() if request.constraint else None,
                controls=RowControls.create(
                    params,
                    request.prompt_ids,
                    self._eos_token_ids,
                    self.info.vocab_size,
                    runner.device,
                ),
            )
            family.append(seq)
        if params.prompt_logprobs is not None:
            family[0].prompt_logprobs = [None]  # the first token has nothing before it
        else:  # (prompt log-probabilities need every position)
            family[0].prefix_pending = runner.prefix is not None
        return family

    def _load_prefix(self, first: Sequence) -> None:
        """Copy the cached part of a prompt into its row, just before its first chunk: looked
        up then rather than at admission, a request admitted with others that share its
        start (a system prompt) finds the blocks of those prefilled before it."""
        first.prefix_pending = False
        runner = self._model()
        assert runner.prefix is not None
        request = first.request
        first.num_cached = runner.prefix.load(
            _namespace(request), request.prompt_ids, runner.cache, first.row
        )
        for seq in first.family:  # the samples share the prompt, its cached part too
            seq.cached_tokens = first.num_cached

    def _advance(self, seq: Sequence, token: int, logprob: TokenLogprob | None = None) -> bool:
        """Feed one sampled token to a sequence and emit its news; True when it finished."""
        seq.num_generated += 1
        seq.last_token = token
        self._stats.generated_tokens += 1
        params = seq.request.params
        stop_token: int | None = None  # the stop token id that ends it
        if token in self._eos_token_ids and not params.ignore_eos:
            ends = True
        else:
            ends = token in params.stop_token_ids
            stop_token = token if ends else None
        if not ends:  # fed at the next step: part of the text and of the cached tokens
            seq.generated.append(token)
        at_limit = not ends and (
            seq.num_generated >= params.max_new_tokens
            or seq.num_tokens >= self._model().max_context
            or (seq.matcher is not None and seq.matcher.is_finished)
        )
        emit = seq.request.emit
        step: StepText | None = None  # the text, where rendered here
        if not (isinstance(emit, QueuedEmit) and not params.stop):
            step = seq.output.render(token, ends, at_limit)
        finish: str | None = None
        if ends or (step is not None and step.stop_reason is not None):
            finish = "stop"
        elif at_limit:
            # a constraint complete (nothing but EOS may follow) ends as EOS would; one that
            # failed (over the library's limits: logged) ends as cut short
            matcher = seq.matcher
            complete = matcher is not None and matcher.is_finished and matcher.error is None
            finish = "stop" if complete else "length"
        usage = None
        if finish is not None:
            usage = Usage(
                prompt_tokens=len(seq.request.prompt_ids),
                completion_tokens=seq.num_generated,
                cached_tokens=seq.cached_tokens,
            )
        prompt_logprobs = None
        if seq.prompt_logprobs is not None and seq.num_generated == 1:
            prompt_logprobs = tuple(seq.prompt_logprobs)
        if isinstance(emit, QueuedEmit):
            if seq.num_generated == 1 and seq.index == 0:
                emit.delivered(seq.request)  # queued right before its first output
        elif seq.request.first_emitted is None:
            seq.request.first_emitted = time.monotonic()

        def output(step: StepText) -> RequestOutput:
            return RequestOutput(
                text=step.delta,
                token_ids=[token],
                finish_reason=finish,
                stop_reason=step.stop_reason if stop_token is None else stop_token,
                usage=usage,
                index=seq.index,
                logprobs=None if logprob is None else (logprob,),
                prompt_logprobs=prompt_logprobs,
            )

        if step is not None:
            emit(output(step))
        else:  # the text rendered on the output thread: it decides nothing here
            assert isinstance(emit, QueuedEmit)
            text = seq.output
            emit.later(lambda: output(text.render(token, ends, at_limit)))
        return finish is not None

    def _drop_cancelled(self) -> None:
        """Retire cancelled sequences, and end those past the time limit (queued ones too)."""
        for seq in [s for s in self._batch.seqs if s.request.cancelled.is_set()]:
            self._retire(seq)
        limit = self.config.max_request_seconds
        too_old = time.monotonic() - limit
        overdue = [s for s in self._batch.seqs if s.request.arrival < too_old]
        for request in self._scheduler.remove_older_than(too_old):
            overdue_request(request, limit)
        for seq in overdue:
            self._retire(seq)
        for request in _requests_of(overdue):
            overdue_request(request, limit)
        now = time.monotonic()
        if now - self._deadlines_checked >= DEADLINE_CHECK_S:
            self._deadlines_checked = now
            for request in self._scheduler.remove_unmeetable(margin=2 * DEADLINE_CHECK_S):
                request.emit(
                    Unmeetable(
                        "the request can no longer finish before its deadline", QUEUE_RETRY_S
                    )
                )

    def _retire(self, seq: Sequence) -> None:
        """Free a finished (or failed, or cancelled) sequence's cache row; the last of its
        request's samples gives back the adapter slot and ends the request."""
        self._batch.remove(seq)
        self._free_row(seq.row, seq.reserved)
        seq.family.remove(seq)
        if not seq.family:
            if seq.slot != NO_ADAPTER:
                self._slots.release(seq.slot)
            self._scheduler.finished(seq.request)

    def _free_row(self, row: int, reserved: int) -> None:
        """Give a row back to the cache; the sequence in the last row moves into it."""
        cache = self._model().cache
        last = self._batch.by_row.get(cache.num_used_rows - 1)
        moved = cache.free(row, reserved, last.num_cached if last else 0)
        if moved is not None:
            self._batch.move(moved, row)

    def _step_failed(self, exc: Exception) -> None:
        """A step raised. Out of device memory: its requests end RESOURCE_EXHAUSTED and the
        next steps go on. Another device error (CUDA's stick to the context): every request
        ends and none is taken again, so that health says NOT_SERVING and the server is
        restarted. Anything else fails the batch's requests and serving goes on."""
        if isinstance(exc, torch.OutOfMemoryError):
            log.error("out of device memory in a step; failing its %d requests", len(self._batch))
            self._fail_all(DeviceOutOfMemory(f"the device ran out of memory: {exc}", OOM_RETRY_S))
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        elif isinstance(exc, torch.AcceleratorError) or "CUDA error" in str(exc):
            log.critical("the device failed; the server must be restarted", exc_info=exc)
            failure = Unrecoverable("the device failed; the server must be restarted")
            self.failure = failure
            self._scheduler.close()
            self._fail_all(failure)
            for request in self._scheduler.drain():
                request.emit(failure)
            for observe in self.on_failure:
                observe(failure)
        else:  # keep serving: fail only the requests in this batch
            log.exception("engine step failed; failing %d running requests", len(self._batch))
            self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        seqs = list(self._batch.seqs)
        for seq in seqs:
            self._retire(seq)
        for request in _requests_of(seqs):
            request.emit(exc)


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


def _prefix_view(prefix: PrefixCache | None) -> PrefixCacheView | None:
    if prefix is None:
        return None
    return PrefixCacheView(
        queries=prefix.stats.queries,
        hits=prefix.stats.hits,
        used_blocks=prefix.used_blocks,
        blocks=prefix.num_blocks,
        block_tokens=BLOCK_TOKENS,
    )


def _namespace(request: EngineRequest) -> Namespace:
    adapter = request.adapter.key if request.adapter is not None else None
    return Namespace(adapter=adapter, tenant=request.tenant, salt=request.cache_salt)


def _requests_of(seqs: list[Sequence]) -> list[EngineRequest]:
    """The requests of some sequences, each once (a request with `n` samples has n)."""
    return list({id(s.request): s.request for s in seqs}.values())


def overdue_request(request: EngineRequest, limit: float) -> None:
    request.emit(TooLong(f"the request ran past the server's limit of {limit:g} s"))


def _adapter_ids(requests: Iterable[EngineRequest]) -> tuple[str, ...]:
    return tuple(sorted({r.adapter.adapter_id for r in requests if r.adapter is not None}))


def async_output(choice: str, device: torch.device) -> bool:
    """`--async-output`: auto is on with a GPU (the host renders text while the device
    computes the next step), off on a CPU (whose cores the step itself uses)."""
    return choice == "on" or (choice == "auto" and device.type == "cuda")


def engine_info(runner: ModelRunner, eos_token_ids: set[int]) -> EngineInfo:
    loaded, config = runner.loaded, runner.model.config
    slots, slots_choice = runner.slot_limit()
    return EngineInfo(
        model_id=loaded.model_id,
        model_type=str(getattr(config, "model_type", "")),
        quantization=loaded.quantization,
        device=str(loaded.device),
        dtype=str(loaded.dtype).removeprefix("torch."),
        vocab_size=int(config.vocab_size),
        num_layers=int(config.num_hidden_layers),
        fingerprint=loaded.fingerprint,
        max_context=runner.max_context,
        target_shapes=dict(runner.target_shapes),
        tokenizer=loaded.tokenizer,
        dtype_choice=loaded.dtype_reason,
        machine=machine_key(loaded.device),
        base_kernels=tuple(runner.linears.choices()),
        dense_cache_bytes=runner.linears.dense_bytes,
        max_loras=slots,
        max_loras_choice=slots_choice,
        eos_token_ids=tuple(sorted(eos_token_ids)),
    )
