"""The front end of the engine: requests in domain terms (validated, tokenized, resolved to an
adapter version), outputs as async iterators. The gRPC servicers only translate to and from it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from loraplex.adapters.cache import HostCache, Lease, TierStats
from loraplex.adapters.compose import CompositionError, compose_steps
from loraplex.adapters.errors import AdapterNotFound
from loraplex.adapters.registry import MISS_REFRESH_S, AdapterRegistry, check_adapter_id
from loraplex.adapters.sources import Upload
from loraplex.adapters.store import AdapterStore, AdapterVersion
from loraplex.adapters.validate import AdapterWeights, BaseModelSpec
from loraplex.server import __version__
from loraplex.server.admission import Quotas, Ticket, load_tenant_limits
from loraplex.server.auth import KeyRing, Principal
from loraplex.server.compositions import (
    Composition,
    CompositionRequest,
    Compositions,
    describe,
    is_composed_id,
)
from loraplex.server.config import ServerConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.model_runner import ModelRunner
from loraplex.server.engine.request import EngineRequest, RequestOutput, SamplingParams
from loraplex.server.errors import InvalidRequest
from loraplex.server.model_loader import LORA_TARGETS, LoadedModel, load_model
from loraplex.server.telemetry import Observers, RequestLog, RequestRecord
from loraplex.server.tenancy import check_use, may_use

log = logging.getLogger(__name__)

CHAT_ROLES = ("system", "user", "assistant", "tool")
MAX_TEXT_CHARS = 1 << 20  # prompt or messages, before tokenizing (the context bounds tokens)
MAX_MESSAGES = 1024


@dataclass(frozen=True)
class GenerateInput:
    adapter_id: str = ""
    prompt: str = ""
    messages: tuple[tuple[str, str], ...] = ()  # (role, content)
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    compose: CompositionRequest | None = None  # several adapters composed (not adapter_id)


@dataclass
class Generation:
    """A submitted request: what serves it, and its outputs as they come."""

    request_id: str
    adapter: AdapterVersion | None
    outputs: AsyncIterator[RequestOutput]


@dataclass(frozen=True)
class TierView:
    """One cache tier's state and counters, as the API reports it."""

    tier: str
    resident: int
    capacity: int
    used_bytes: int
    budget_bytes: int
    stats: TierStats


@dataclass(frozen=True)
class EngineState:
    running: int
    waiting: int
    kv_cache_usage: float  # share of the KV cache's token budget reserved
    running_adapters: list[str]
    waiting_adapters: list[str]
    max_lora: int


@dataclass(frozen=True)
class MergeView:
    """What is folded into the base now, and the merge policy's view of the traffic."""

    adapter_id: str
    version: int
    pinned: bool
    policy: str
    token_share: float  # of the merged adapter, else of the leading one
    leading_adapter_id: str
    merges: int
    unmerges: int
    last_merge_seconds: float
    last_unmerge_seconds: float


@dataclass(frozen=True)
class ModelInfo:
    model_id: str
    model_type: str
    quantization: str
    device: str
    dtype: str
    max_context_length: int
    vocab_size: int
    num_layers: int
    supported_target_modules: tuple[str, ...]
    max_lora_rank: int
    max_loras: int
    max_batch_size: int
    base_model_fingerprint: str
    version: str
    has_chat_template: bool


class Frontend:
    def __init__(
        self, loaded: LoadedModel, engine: Engine, registry: AdapterRegistry, config: ServerConfig
    ) -> None:
        self.loaded = loaded
        self.engine = engine
        self.registry = registry
        self.config = config
        self.tokenizer = loaded.tokenizer
        self.cache = HostCache(registry.load_weights, config.host_cache_bytes)
        per_tenant = load_tenant_limits(config.auth_keys) if config.auth_keys else {}
        self.quotas = Quotas(config.tenant_limits, per_tenant)
        self._special_tokens = sorted(
            {str(t) for t in getattr(self.tokenizer, "all_special_tokens", ())} - {""}
        )
        self._pins: dict[str, tuple[AdapterVersion, Lease]] = {}  # adapter id -> pinned version
        self.compositions = Compositions()
        self._merge_pin: str | None = None  # the adapter id an operator merged
        self._pin_lock = asyncio.Lock()
        self.observers = Observers([RequestLog(config.log_prompts)])  # each request, at its end
        self._refreshed_at = -math.inf  # when a client's unknown id last made us re-read
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    def create(cls, config: ServerConfig) -> Frontend:
        """Load the model and build everything behind the front end (blocking; seconds). The
        model is loaded on the engine thread, the one thread that runs tensor work."""
        ec = config.engine
        if ec.tenant_max_running is None:  # automatic: headroom only when tenants share
            keys = KeyRing.from_file(config.auth_keys) if config.auth_keys else None
            tenants = keys.client_tenants if keys is not None else set()
            share = max(1, ec.max_batch_size * 3 // 4) if len(tenants) > 1 else 0
            ec = dataclasses.replace(ec, tenant_max_running=share)

        def make_runner() -> ModelRunner:
            return ModelRunner.from_config(load_model(config.model), ec)

        engine = Engine(make_runner, ec)
        runner = engine.start()
        spec = BaseModelSpec(
            runner.target_shapes, ec.max_lora_rank, runner.loaded.fingerprint, ec.max_adapter_bytes
        )
        store = AdapterStore(config.store_url, config.storage_options)
        store.collect_orphans()
        registry = AdapterRegistry(
            store, spec, config.allowed_adapter_roots, config.storage_options
        )
        return cls(runner.loaded, engine, registry, config)

    def close(self) -> None:
        self.engine.stop()
        self.cache.close()

    async def generate(
        self,
        inp: GenerateInput,
        request_id: str | None = None,
        principal: Principal | None = None,
    ) -> Generation:
        """Validate, admit and submit a request. Errors about the request raise here, before
        any output; the returned iterator yields outputs until one carries a finish_reason."""
        tenant = principal.tenant if principal is not None else ""
        record = RequestRecord(request_id or uuid.uuid4().hex, tenant, time.monotonic())
        record.adapter_id = inp.adapter_id
        if self.config.log_prompts:
            record.prompt = inp.prompt or json.dumps(inp.messages, ensure_ascii=False)
        try:
            return await self._submit(inp, record, principal)
        except BaseException as exc:  # refused: observed now (a started one when it ends)
            record.fail(exc)
            record.finished = time.monotonic()
            self.observers.finished(record)
            raise

    async def _submit(
        self, inp: GenerateInput, record: RequestRecord, principal: Principal | None
    ) -> Generation:
        request_id, tenant = record.request_id, record.tenant
        # Refuse early what would be refused anyway, before tokenizing: under overload the
        # refusals must cost the server (and the requests it runs) next to nothing.
        self.quotas.check(tenant)
        self.engine.scheduler.check()
        adapter = await self._adapter_for(inp, principal)
        if adapter is not None:
            record.adapter_version = adapter.version
        check_sizes(inp)
        prompt_ids = await asyncio.to_thread(self._tokenize, inp)
        record.prompt_tokens = len(prompt_ids)
        max_new = (
            self.config.engine.default_max_new_tokens
            if inp.max_new_tokens is None
            else inp.max_new_tokens
        )
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=inp.temperature,
            top_p=inp.top_p,
            top_k=inp.top_k,
            seed=inp.seed,
            stop=inp.stop,
        )
        limit = self.engine.runner.max_context
        if len(prompt_ids) >= limit:
            raise InvalidRequest(
                "prompt", f"{len(prompt_ids)} tokens; the model's context is {limit} tokens"
            )
        if len(prompt_ids) + max_new > limit:
            raise InvalidRequest(
                "max_new_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new}) exceeds the "
                f"model's context of {limit} tokens",
            )
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def emit(item: RequestOutput | BaseException) -> None:  # called on the engine thread
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
                request.cancel()

        ticket = self.quotas.admit(tenant, len(prompt_ids) + max_new)
        lease = None
        try:
            # The host tier holds the adapter's weights while the request lives: loaded once
            # however many requests want it, and fetched while the batch runs.
            lease = await self._lease(adapter) if adapter is not None else None
            request = EngineRequest(
                request_id,
                prompt_ids,
                params,
                adapter,
                emit,
                lease.weights if lease else None,
                tenant=tenant,
            )
            self.engine.submit(request)
        except BaseException:
            if lease is not None:
                lease.release()
            ticket.release(ticket.tokens)
            raise
        outputs = self._outputs(queue, request, lease, ticket, record)
        return Generation(request_id, adapter, outputs)

    async def _outputs(
        self,
        queue: asyncio.Queue[RequestOutput | BaseException],
        request: EngineRequest,
        lease: Lease | None,
        ticket: Ticket,
        record: RequestRecord,
    ) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    record.fail(item)
                    raise item
                finished = item.finish_reason is not None
                record.output(time.monotonic(), len(item.token_ids))
                if self.config.log_prompts:
                    record.text += item.text
                if finished:
                    record.finish_reason = item.finish_reason or ""
                yield item
        finally:
            if not finished:  # the consumer went away (client cancel, deadline): stop now
                request.cancel()  # running: the engine drops it at its next step
                self.engine.scheduler.remove(request)  # queued: it leaves the queue now
                record.code = "CANCELLED"
            if lease is not None:
                lease.release()
            ticket.release(request.params.max_new_tokens - record.completion_tokens)
            record.queued, record.admitted = request.arrival, request.admitted
            record.finished = time.monotonic()
            self.observers.finished(record)

    async def _adapter_for(
        self, inp: GenerateInput, principal: Principal | None
    ) -> AdapterVersion | None:
        """The adapter version serving a request: named, composed, or none (the base)."""
        if inp.compose is None:
            return await self._resolve(inp.adapter_id, principal) if inp.adapter_id else None
        if inp.adapter_id:
            raise InvalidRequest("compose", "give adapter_id or compose, not both")
        request = inp.compose
        request.check()
        inputs = []
        for i, (adapter_id, _) in enumerate(request.adapters):
            if is_composed_id(adapter_id):
                raise InvalidRequest(
                    f"compose.adapters[{i}].adapter_id",
                    "a composed adapter cannot be an input: compose its inputs directly",
                )
            inputs.append(await self._resolve(adapter_id, principal))
        composition = describe(
            request, inputs, self.loaded.fingerprint, self.config.engine.max_lora_rank
        )
        return self.compositions.add(composition).version

    async def _lease(self, version: AdapterVersion) -> Lease:
        """Hold an adapter's weights in the host tier: read from the store, or for a composed
        adapter built from its inputs' (once; later requests find it cached)."""
        if not is_composed_id(version.adapter_id):
            return await self.cache.lease(version)
        composition = self.compositions.get(version.adapter_id)
        if composition is None or composition.version != version:  # an input was deleted
            raise AdapterNotFound(
                f"composed adapter {version.adapter_id!r} is gone: an input was deleted"
            )
        lease = self.cache.try_lease(version)
        if lease is not None:
            return lease
        inputs: dict[str, Lease] = {}
        try:
            for v in composition.inputs:
                if v.digest not in inputs:
                    inputs[v.digest] = await self.cache.lease(v)
            parts = [
                (inputs[v.digest].weights, w)
                for v, w in zip(composition.inputs, composition.weights, strict=True)
            ]
            return await self.cache.lease(version, load=lambda: self._build(composition, parts))
        finally:
            for held in inputs.values():
                held.release()

    def _build(
        self, composition: Composition, parts: list[tuple[AdapterWeights, float]]
    ) -> AdapterWeights:
        """Compose on the engine thread (the one thread that runs torch), one module between
        two engine steps, so that a slow method (ties, DARE) delays steps a little instead of
        stalling them all; called on a host cache worker, which waits for it."""
        start = time.perf_counter()
        steps = compose_steps(
            parts,
            composition.method,
            density=composition.density,
            seed=composition.seed,
            majority_sign_method=composition.majority_sign_method,
            module_order=list(self.engine.runner.target_shapes),
            max_rank=self.config.engine.max_lora_rank,
        )

        def advance() -> AdapterWeights | None:
            try:
                next(steps)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            return None

        try:
            while (weights := self.engine.call(advance).result()) is None:
                pass
        except CompositionError as exc:
            raise InvalidRequest("compose", str(exc)) from None
        log.info(
            "composed %s (%s of %s) in %.0f ms",
            composition.version.adapter_id,
            composition.method,
            ", ".join(
                f"{v.adapter_id} v{v.version} x{w:g}"
                for v, w in zip(composition.inputs, composition.weights, strict=True)
            ),
            (time.perf_counter() - start) * 1e3,
        )
        return weights

    def composition_of(self, adapter_id: str) -> Composition | None:
        return self.compositions.get(adapter_id) if is_composed_id(adapter_id) else None

    def _composed(self, adapter_id: str, principal: Principal | None) -> AdapterVersion:
        """A composed adapter named by its derived id, while this replica holds it and its
        inputs are still registered; usable by whoever may use every input."""
        composition = self.compositions.get(adapter_id)
        if composition is None or not all(self._registered(v) for v in composition.inputs):
            check_use(principal, adapter_id, None)
            raise AdapterNotFound(
                f"composed adapter {adapter_id!r} is not known here (compositions are kept per "
                "server, and go when an input is deleted): send the composition itself"
            )
        for v in composition.inputs:
            check_use(principal, adapter_id, v)
        return composition.version

    def _registered(self, version: AdapterVersion) -> bool:
        try:
            return version in self.registry.store.versions(version.adapter_id)
        except AdapterNotFound:
            return False

    async def _resolve(self, adapter_id: str, principal: Principal | None = None) -> AdapterVersion:
        """The version a new request for `adapter_id` gets, if `principal` may use it."""
        if is_composed_id(adapter_id):
            return self._composed(adapter_id, principal)
        try:
            try:
                version = self.registry.store.latest(check_adapter_id(adapter_id))  # in memory
            except AdapterNotFound:
                if may_use(principal, None):
                    # Another replica may have registered it: re-read the store, off the loop.
                    version = await asyncio.to_thread(self.registry.resolve, adapter_id)
                else:
                    # A client is answered at once, as for another tenant's adapter (waiting
                    # for the store would tell the two apart); the store is re-read behind,
                    # so a retry finds an adapter another replica just registered.
                    self._refresh_behind()
                    raise
        except AdapterNotFound:
            check_use(principal, adapter_id, None)
            raise
        check_use(principal, adapter_id, version)
        return version

    def _refresh_behind(self) -> None:
        """Re-read the store in the background: one at a time, at most every MISS_REFRESH_S
        (clients naming unknown ids cannot make the server scan the store repeatedly)."""
        now = time.monotonic()
        if now - self._refreshed_at < MISS_REFRESH_S:
            return
        self._refreshed_at = now
        task = asyncio.create_task(self._refresh_logged())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _refresh_logged(self) -> None:
        try:
            await self.refresh_store()
        except Exception:
            log.exception("re-reading the adapter store failed")

    def _tokenize(self, inp: GenerateInput) -> list[int]:
        if inp.prompt and inp.messages:
            raise InvalidRequest("prompt", "give either prompt or messages, not both")
        if inp.messages:
            for i, (role, content) in enumerate(inp.messages):
                if role not in CHAT_ROLES:
                    raise InvalidRequest(
                        f"messages[{i}].role",
                        f"must be one of {', '.join(CHAT_ROLES)}, got {role!r}",
                    )
                # A control token in the content would forge turns of the conversation.
                for token in self._special_tokens:
                    if token in content:
                        raise InvalidRequest(
                            f"messages[{i}].content", f"contains the special token {token!r}"
                        )
            if not getattr(self.tokenizer, "chat_template", None):
                raise InvalidRequest("messages", "the served model has no chat template")
            text = self.tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in inp.messages],
                tokenize=False,
                add_generation_prompt=True,
            )
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
        elif inp.prompt:
            # Raw text: special-token strings in it stay text, never control tokens.
            ids = self.tokenizer(inp.prompt, split_special_tokens=True).input_ids
        else:
            raise InvalidRequest("prompt", "empty: give a prompt or messages")
        if not ids:
            raise InvalidRequest("prompt", "tokenizes to no tokens")
        return list(ids)

    async def warmup(self) -> None:
        """One tiny generation through the whole path, so the first client is not the one
        who pays for lazy initialisation."""
        generation = await self.generate(GenerateInput(prompt="Hello", max_new_tokens=2))
        async for _ in generation.outputs:
            pass

    # -- adapters (file work runs off the event loop; validation needs no engine time) -------
    async def register_adapter(
        self,
        adapter_id: str,
        path: str,
        pin: bool = False,
        tenant: str = "",
        shared: bool = False,
    ) -> tuple[AdapterVersion, bool]:
        """Register an adapter owned by `tenant` (usable by every tenant when `shared`)."""
        version, created = await asyncio.to_thread(
            self.registry.register, adapter_id, path, tenant, shared
        )
        await self._after_register(version, pin)
        return version, created

    async def push_adapter(
        self,
        adapter_id: str,
        chunks: AsyncIterator[tuple[str, bytes]],
        pin: bool = False,
        tenant: str = "",
        shared: bool = False,
    ) -> tuple[AdapterVersion, bool]:
        """Register an adapter whose files arrive as (file name, bytes) pieces."""
        check_adapter_id(adapter_id)
        upload: Upload = await asyncio.to_thread(self.registry.new_upload)
        try:
            async for file_name, data in chunks:
                await asyncio.to_thread(upload.write, file_name, data)
        except BaseException:
            await asyncio.to_thread(self.registry.discard_upload, upload)
            raise
        version, created = await asyncio.to_thread(
            self.registry.register_upload, adapter_id, upload, tenant, shared
        )
        await self._after_register(version, pin)
        return version, created

    async def _after_register(self, version: AdapterVersion, pin: bool) -> None:
        """A new version of a pinned adapter takes over its pin (and its pinned merge)."""
        pinned = self._pins.get(version.adapter_id)
        if pin or (pinned is not None and pinned[0] != version):
            await self.pin_adapter(version.adapter_id)
        if self._merge_pin == version.adapter_id:
            try:
                await self.merge_adapter(version.adapter_id)
            except Exception:  # registered all the same; the older version stays merged
                log.exception("merging %s v%d in place of its older version failed",
                              *version.key)  # fmt: skip

    # -- merging into the base ---------------------------------------------------------------
    async def merge_adapter(self, adapter_id: str) -> MergeView:
        """Fold an adapter's latest version into the base and keep it there (the policy
        leaves a pinned merge alone) until `unmerge_adapter`."""
        if is_composed_id(adapter_id):
            raise InvalidRequest("adapter_id", "a composed adapter cannot be merged")
        version = await self._resolve(adapter_id)
        lease = await self._lease(version)
        try:
            engine = self.engine
            await asyncio.wrap_future(
                engine.call(lambda: engine.merge_pinned(version, lease.weights))
            )
        finally:
            lease.release()  # the device slot holds the weights now
        self._merge_pin = adapter_id
        return self.merge_state()

    async def unmerge_adapter(self) -> MergeView:
        """Undo the merge now, pinned or automatic."""
        self._merge_pin = None
        await asyncio.wrap_future(self.engine.call(self.engine.unmerge_pinned))
        return self.merge_state()

    def merge_state(self) -> MergeView:
        merge = self.engine.merge  # read from another thread, field by field
        key, leader = merge.key, merge.leader
        return MergeView(
            adapter_id=key[0] if key else "",
            version=key[1] if key else 0,
            pinned=merge.pinned,
            policy=self.config.engine.merge.policy,
            token_share=merge.merged_share if key else merge.leader_share,
            leading_adapter_id=leader[0] if leader else "",
            merges=merge.merges,
            unmerges=merge.unmerges,
            last_merge_seconds=merge.last_merge_s,
            last_unmerge_seconds=merge.last_unmerge_s,
        )

    def is_merged(self, adapter_id: str) -> bool:
        key = self.engine.merge.key
        return key is not None and key[0] == adapter_id

    def get_adapter(
        self, adapter_id: str, principal: Principal | None = None
    ) -> tuple[AdapterVersion, list[int]]:
        """An adapter's latest version and every version number held."""
        if is_composed_id(adapter_id):
            return self._composed(adapter_id, principal), [1]
        try:
            versions = self.registry.store.versions(check_adapter_id(adapter_id))
        except AdapterNotFound:
            check_use(principal, adapter_id, None)
            raise
        check_use(principal, adapter_id, versions[-1])
        return versions[-1], [v.version for v in versions]

    def list_adapters(
        self, principal: Principal | None = None
    ) -> list[tuple[AdapterVersion, list[int]]]:
        """The adapters `principal` may use."""
        store = self.registry.store
        found = []
        for latest in store.latest_versions():
            if may_use(principal, latest):
                try:
                    found.append((latest, [v.version for v in store.versions(latest.adapter_id)]))
                except AdapterNotFound:  # deleted meanwhile
                    continue
        return found

    def is_pinned(self, adapter_id: str) -> bool:
        return adapter_id in self._pins

    async def delete_adapter(self, adapter_id: str) -> list[int]:
        """New requests get NOT_FOUND at once; those in flight hold the weights and finish.
        Blobs go unless a load still needs them (those are collected as orphans later)."""
        versions = await asyncio.to_thread(self.registry.delete, adapter_id)
        await self._follow_store()  # its pin, merge and compositions go
        digests = {v.digest for v in versions}
        self.cache.forget(digests)
        keep = self.cache.in_use()
        await asyncio.to_thread(self.registry.store.remove_blobs, digests, keep)
        return [v.version for v in versions]

    async def pin_adapter(self, adapter_id: str) -> AdapterVersion:
        """Keep the latest version in a device slot and host memory (it replaces a pin on an
        older version)."""
        async with self._pin_lock:
            if is_composed_id(adapter_id):
                raise InvalidRequest("adapter_id", "a composed adapter cannot be pinned")
            version = await self._resolve(adapter_id)
            old = self._pins.get(adapter_id)
            if old is not None and old[0] == version:
                return version
            lease = await self.cache.lease(version)
            try:
                await asyncio.wrap_future(
                    self.engine.call(lambda: self.engine.pin(version, lease.weights))
                )
            except BaseException:
                lease.release()
                raise
            self.cache.pin(version.digest, True)
            self._pins[adapter_id] = (version, lease)
            if old is not None:
                await self._unpin(old[0], old[1])
            log.info("adapter %s v%d pinned", *version.key)
            return version

    async def unpin_adapter(self, adapter_id: str) -> AdapterVersion:
        async with self._pin_lock:
            check_adapter_id(adapter_id)
            pinned = self._pins.pop(adapter_id, None)
            if pinned is None:
                self.registry.store.latest(adapter_id)  # NOT_FOUND for an unknown adapter
                raise InvalidRequest("adapter_id", f"adapter {adapter_id!r} is not pinned")
            await self._unpin(*pinned)
            return pinned[0]

    async def _drop_pin(self, adapter_id: str) -> None:
        """Unpin `adapter_id` if it is pinned (quietly: a deleted adapter's pin goes)."""
        async with self._pin_lock:
            pinned = self._pins.pop(adapter_id, None)
            if pinned is not None:
                await self._unpin(*pinned)

    async def _unpin(self, version: AdapterVersion, lease: Lease) -> None:
        await asyncio.wrap_future(self.engine.call(lambda: self.engine.unpin(version)))
        if not any(v.digest == version.digest for v, _ in self._pins.values()):
            self.cache.pin(version.digest, False)
        lease.release()

    def state(self) -> EngineState:
        """What runs and waits now (read from another thread: a snapshot, not a transaction)."""
        engine = self.engine
        return EngineState(
            running=engine.num_running,
            waiting=engine.scheduler.num_waiting(),
            kv_cache_usage=engine.runner.cache.usage,
            running_adapters=engine.running_adapters(),
            waiting_adapters=sorted(
                {r.adapter.adapter_id for r in engine.scheduler.peek(1 << 20) if r.adapter}
            ),
            max_lora=self.config.engine.max_loras,
        )

    def tier_stats(self) -> dict[str, TierStats]:
        return {"device": self.engine.slots.stats, "host": self.cache.stats}

    def cache_stats(self) -> tuple[list[TierView], list[str]]:
        """(tiers, pinned adapter ids)."""
        slots = self.engine.slots
        device = TierView("device", len(slots.resident()), slots.num_slots, 0, 0, slots.stats)
        host = TierView(
            "host",
            self.cache.resident(),
            0,
            self.cache.used_bytes,
            self.cache.budget_bytes,
            self.cache.stats,
        )
        return [device, host], sorted(self._pins)

    async def refresh_store(self) -> None:
        await asyncio.to_thread(self.registry.store.refresh)
        await self._follow_store()

    async def _follow_store(self) -> None:
        """What this server holds follows changes another server sharing the store made (as
        its own register and delete do here): a newer version takes over a pin and a pinned
        merge; a deleted adapter is unpinned, unmerged and its compositions forgotten."""
        latest = {v.adapter_id: v for v in self.registry.store.latest_versions()}
        for adapter_id, (version, _) in list(self._pins.items()):
            newest = latest.get(adapter_id)
            if newest == version:
                continue
            if newest is None:
                await self._drop_pin(adapter_id)
                continue
            try:
                await self.pin_adapter(adapter_id)
            except AdapterNotFound:  # deleted again meanwhile
                await self._drop_pin(adapter_id)
            except Exception:  # e.g. no slot for the new version: the old one stays pinned
                log.exception("pinning the newer version of %s failed", adapter_id)
        merged = self.engine.merge.key
        if (merged is not None and merged[0] not in latest) or (
            self._merge_pin is not None and self._merge_pin not in latest
        ):
            await self.unmerge_adapter()
        elif (
            merged is not None
            and self._merge_pin == merged[0]
            and latest[merged[0]].version != merged[1]
        ):
            try:
                await self.merge_adapter(merged[0])
            except Exception:  # the older version stays merged, as after a register
                log.exception("merging the newer version of %s failed", merged[0])
        for adapter_id in self.compositions.input_ids() - latest.keys():
            gone = self.compositions.forget_input(adapter_id)
            self.cache.forget({c.version.digest for c in gone})

    async def collect_orphans(self) -> None:
        """Remove blobs nothing references any more (a load in progress keeps its own)."""
        await asyncio.to_thread(self.registry.store.collect_orphans, keep=self.cache.in_use())

    def model_info(self) -> ModelInfo:
        model = self.loaded.model
        cfg = model.config
        ec = self.config.engine
        return ModelInfo(
            model_id=self.loaded.model_id,
            model_type=str(getattr(cfg, "model_type", "")),
            quantization=self.loaded.quantization,
            device=str(self.loaded.device),
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            max_context_length=self.engine.runner.max_context,
            vocab_size=int(cfg.vocab_size),
            num_layers=int(cfg.num_hidden_layers),
            supported_target_modules=LORA_TARGETS,
            max_lora_rank=ec.max_lora_rank,
            max_loras=ec.max_loras,
            max_batch_size=ec.max_batch_size,
            base_model_fingerprint=self.loaded.fingerprint,
            version=__version__,
            has_chat_template=bool(getattr(self.tokenizer, "chat_template", None)),
        )


def check_sizes(inp: GenerateInput) -> None:
    """Bound the text before tokenizing it (tokens are bounded by the context afterwards)."""
    if len(inp.prompt) > MAX_TEXT_CHARS:
        raise InvalidRequest("prompt", f"{len(inp.prompt)} characters; at most {MAX_TEXT_CHARS}")
    if len(inp.messages) > MAX_MESSAGES:
        raise InvalidRequest("messages", f"{len(inp.messages)} messages; at most {MAX_MESSAGES}")
    total = sum(len(content) for _, content in inp.messages)
    if total > MAX_TEXT_CHARS:
        raise InvalidRequest("messages", f"{total} characters; at most {MAX_TEXT_CHARS}")
