"""From what a request names to what serves it: an adapter id (or a composition of several) is
resolved to one adapter version the caller may use, and that version's weights are held in the
host tier while the request needs them (a composed adapter's are built from its inputs', once).

Tenancy is checked here, in one place, before existence: a client naming another tenant's
adapter hears PERMISSION_DENIED whether or not it exists (see tenancy.py). A composition is
checked against the current version of every input at every use (an input re-registered
unshared, or for another tenant, is no longer usable through compositions made before), and a
tenant builds at most MAX_BUILDS_PER_TENANT compositions at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from loraplex.adapters.cache import HostCache, Lease
from loraplex.adapters.compose import CompositionError, compose_steps
from loraplex.adapters.compositions import (
    Composition,
    CompositionRequest,
    Compositions,
    describe,
    is_composed_id,
)
from loraplex.adapters.registry import MISS_REFRESH_S, AdapterRegistry, check_adapter_id
from loraplex.core.errors import AdapterNotFound, InvalidRequest, OverQuota
from loraplex.core.types import AdapterVersion, AdapterWeights
from loraplex.server.engine.engine import Engine
from loraplex.server.runtime.auth import Principal
from loraplex.server.runtime.tenancy import check_use, may_use

log = logging.getLogger(__name__)

MAX_BUILDS_PER_TENANT = 2  # compositions one tenant's requests build at once (on the engine)
BUILD_RETRY_S = 1.0
# A build's work between two engine steps: modules until this much time is spent (a linear
# composition of two r16 adapters takes a few slices; ties and DARE take seconds in all)
COMPOSE_SLICE_S = 0.001


class AdapterResolver:
    def __init__(
        self,
        registry: AdapterRegistry,
        cache: HostCache,
        engine: Engine,
        max_rank: int,
        refresh_store: Callable[[], Awaitable[None]],
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.engine = engine
        self.max_rank = max_rank
        self.compositions = Compositions()
        self._refresh_store = refresh_store  # re-reads the store (another replica's changes)
        self._refreshed_at = -math.inf  # when a client's unknown id last made us re-read
        self._background: set[asyncio.Task[None]] = set()
        # Compositions being built (from the request that starts one until its build ends,
        # whether or not that request is still waiting): per tenant, and by content digest.
        self._builds_lock = threading.Lock()
        self._building: Counter[str] = Counter()
        self._built_now: set[str] = set()

    async def for_request(
        self, adapter_id: str, compose: CompositionRequest | None, principal: Principal | None
    ) -> AdapterVersion | None:
        """The adapter version serving a request: named, composed, or none (the base)."""
        if compose is None:
            return await self.resolve(adapter_id, principal) if adapter_id else None
        if adapter_id:
            raise InvalidRequest("compose", "give adapter_id or compose, not both")
        compose.check()
        inputs = []
        for i, weighted in enumerate(compose.adapters):
            if is_composed_id(weighted.adapter_id):
                raise InvalidRequest(
                    f"compose.adapters[{i}].adapter_id",
                    "a composed adapter cannot be an input: compose its inputs directly",
                )
            inputs.append(await self.resolve(weighted.adapter_id, principal))
        fingerprint = self.engine.info.fingerprint
        composition = describe(compose, inputs, fingerprint, self.max_rank)
        tenant = principal.tenant if principal is not None else ""
        known, pushed_out = self.compositions.add(composition, tenant)
        if pushed_out:
            self.cache.forget(set(pushed_out))
        return known.version

    async def resolve(self, adapter_id: str, principal: Principal | None = None) -> AdapterVersion:
        """The version a new request for `adapter_id` gets, if `principal` may use it."""
        if is_composed_id(adapter_id):
            return self.composed(adapter_id, principal)
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

    def composed(self, adapter_id: str, principal: Principal | None) -> AdapterVersion:
        """A composed adapter named by its derived id, while this replica holds it and its
        inputs are still registered; usable by whoever may use every input."""
        check_adapter_id(adapter_id, composed=True)  # the exact form of a derived id
        composition = self.compositions.get(adapter_id)
        if composition is None or not all(self._registered(v) for v in composition.inputs):
            check_use(principal, adapter_id, None)
            raise AdapterNotFound(
                f"composed adapter {adapter_id!r} is not known here (compositions are kept per "
                "server, and go when an input is deleted): send the composition itself"
            )
        for v in composition.inputs:  # as it was made, and as it is now
            check_use(principal, adapter_id, v)
            check_use(principal, adapter_id, self.registry.store.latest(v.adapter_id))
        return composition.version

    def composition_of(self, adapter_id: str) -> Composition | None:
        return self.compositions.get(adapter_id) if is_composed_id(adapter_id) else None

    def forget_compositions(self, live_ids: set[str]) -> None:
        """Drop the compositions with an input no longer among `live_ids` (deleted)."""
        for adapter_id in self.compositions.input_ids() - live_ids:
            gone = self.compositions.forget_input(adapter_id)
            self.cache.forget({c.version.digest for c in gone})

    async def lease(self, version: AdapterVersion, tenant: str = "") -> Lease:
        """Hold an adapter's weights in the host tier: read from the store, or for a composed
        adapter built from its inputs' (once; later requests find it cached) for a request of
        `tenant`, which may have MAX_BUILDS_PER_TENANT builds running (OverQuota beyond; a
        request for a composition being built waits for that build)."""
        if not is_composed_id(version.adapter_id):
            return await self.cache.lease(version)
        composition = self.compositions.get(version.adapter_id)
        if composition is None or composition.version != version:
            raise AdapterNotFound(
                f"composed adapter {version.adapter_id!r} is gone (an input was deleted, or too "
                "many compositions came at once): send the composition again"
            )
        lease = self.cache.try_lease(version)
        if lease is not None:
            return lease
        digest = version.digest
        with self._builds_lock:
            joins = digest in self._built_now
            if not joins:
                if self._building[tenant] >= MAX_BUILDS_PER_TENANT:
                    raise OverQuota(
                        f"{self._building[tenant]} compositions of this tenant are being built: "
                        "wait for them",
                        BUILD_RETRY_S,
                    )
                self._building[tenant] += 1
                self._built_now.add(digest)
        started = threading.Event()  # the cache ran our build (it ends the count then)

        def build(parts: list[tuple[AdapterWeights, float]]) -> AdapterWeights:
            started.set()
            try:
                return self._build(composition, parts)
            finally:
                self._build_ended(tenant, digest)

        inputs: dict[str, Lease] = {}
        try:
            for v in composition.inputs:
                if v.digest not in inputs:
                    inputs[v.digest] = await self.cache.lease(v)
            parts = [
                (inputs[v.digest].weights, w)
                for v, w in zip(composition.inputs, composition.weights, strict=True)
            ]
            return await self.cache.lease(version, load=lambda: build(parts))
        finally:
            for held in inputs.values():
                held.release()
            if not joins and not started.is_set():
                self._build_ended(tenant, digest)  # no build of ours ran (nor will)

    def _build_ended(self, tenant: str, digest: str) -> None:
        with self._builds_lock:
            self._built_now.discard(digest)
            self._building[tenant] -= 1
            if self._building[tenant] <= 0:
                del self._building[tenant]

    def _build(
        self, composition: Composition, parts: list[tuple[AdapterWeights, float]]
    ) -> AdapterWeights:
        """Compose on the engine thread (the one thread that runs torch), a slice of modules
        (COMPOSE_SLICE_S) between two engine steps, so that a slow method (ties, DARE) delays
        steps a little instead of stalling them all; called on a host cache worker, which
        waits for it."""
        start = time.perf_counter()
        steps = compose_steps(
            parts,
            composition.method,
            density=composition.density,
            seed=composition.seed,
            majority_sign_method=composition.majority_sign_method,
            module_order=list(self.engine.info.target_shapes),
            max_rank=self.max_rank,
        )

        def advance() -> AdapterWeights | None:
            start = time.perf_counter()
            while time.perf_counter() - start < COMPOSE_SLICE_S:
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

    def _registered(self, version: AdapterVersion) -> bool:
        try:
            return version in self.registry.store.versions(version.adapter_id)
        except AdapterNotFound:
            return False

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
            await self._refresh_store()
        except Exception:
            log.exception("re-reading the adapter store failed")
