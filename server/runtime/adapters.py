"""Adapter management as the API offers it: register (from a path or URI, or uploaded), look up,
list, delete, pin, merge into the base, and the cache's view. Looking up and listing follow
tenancy; everything else needs an admin key (`principal` None: no authentication, or the server
itself). File work runs off the event loop; validation needs no engine time. Registration's
work (staging, downloads, uploads, validation) runs on threads of its own, so however long a
registration takes it never holds a thread that requests need (asyncio's default executor,
which tokenizes prompts).

Servers may share one store (replicas behind Ray Serve, or several plain servers on S3): what
this server holds follows the store, whoever changed it. A newer version takes over a pin and
a pinned merge; a deleted adapter is unpinned, unmerged and its compositions forgotten. Its own
register and delete go through the same path (`follow_store`) as a re-read does.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from loraplex.adapters.cache import HostCache
from loraplex.adapters.compositions import is_composed_id
from loraplex.adapters.registry import (
    AdapterRegistry,
    SourceRegistration,
    check_adapter_id,
    check_new_adapter_id,
)
from loraplex.adapters.sources import FileChunk, Upload
from loraplex.core.errors import AdapterNotFound, InvalidRequest, NotReady
from loraplex.core.types import AdapterVersion
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.state import EngineSnapshot
from loraplex.server.runtime.auth import Principal
from loraplex.server.runtime.pins import Pins
from loraplex.server.runtime.resolver import AdapterResolver
from loraplex.server.runtime.tenancy import check_admin, check_use, may_use, owner_for
from loraplex.server.runtime.views import (
    AdapterView,
    CacheView,
    MergeView,
    Registration,
    TierView,
)

log = logging.getLogger(__name__)
REGISTRATION_THREADS = 4
T = TypeVar("T")


class AdapterService:
    def __init__(
        self,
        registry: AdapterRegistry,
        cache: HostCache,
        engine: Engine,
        resolver: AdapterResolver,
        merge_policy: str,
    ) -> None:
        self.registry = registry
        self.cache = cache
        self.engine = engine
        self.resolver = resolver
        self.pins = Pins(engine, cache, resolver)
        self.merge_policy = merge_policy  # for the merge view ("auto" or "off")
        self._merge_pin: str | None = None  # the adapter id an operator merged
        self._registering = ThreadPoolExecutor(
            REGISTRATION_THREADS, thread_name_prefix="adapter-registration"
        )

    def close(self) -> None:
        self._registering.shutdown(wait=False, cancel_futures=True)

    async def _registration_work(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on the registration threads (with the caller's context: its request id
        reaches the log lines)."""
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._registering, call)

    # -- registration -------------------------------------------------------------------------
    async def register(
        self,
        adapter_id: str,
        path: str,
        *,
        pin: bool = False,
        tenant: str = "",
        shared: bool = False,
        principal: Principal | None = None,
    ) -> Registration:
        """Register an adapter owned by `tenant` (default: the caller's; usable by every
        tenant when `shared`)."""
        check_admin(principal, "registering an adapter")
        owner = owner_for(principal, tenant)
        registered = await self._registration_work(
            self.registry.register, adapter_id, path, owner, shared
        )
        return await self._registered(registered, pin)

    async def push(
        self,
        adapter_id: str,
        chunks: AsyncIterator[FileChunk],
        *,
        pin: bool = False,
        tenant: str = "",
        shared: bool = False,
        principal: Principal | None = None,
    ) -> Registration:
        """Register an adapter whose files arrive in pieces (as `register` does a path)."""
        check_admin(principal, "uploading an adapter")
        owner = owner_for(principal, tenant)
        check_new_adapter_id(adapter_id)  # before any byte is taken
        upload: Upload = await self._registration_work(self.registry.new_upload)
        try:
            async for chunk in chunks:
                await self._registration_work(upload.write, chunk.file_name, chunk.data)
        except BaseException:
            await self._registration_work(self.registry.discard_upload, upload)
            raise
        registered = await self._registration_work(
            self.registry.register_upload, adapter_id, upload, owner, shared
        )
        return await self._registered(registered, pin)

    async def _registered(self, registered: SourceRegistration, pin: bool) -> Registration:
        """A new version of a pinned adapter takes over its pin (and its pinned merge), and
        its older versions' cached prefixes go."""
        version = registered.version
        if registered.created:  # the older versions' cached prefixes are unreachable now
            await asyncio.wrap_future(self.engine.forget_prefixes(version.adapter_id))
        pinned = self.pins.version(version.adapter_id)
        if pin or (pinned is not None and pinned != version):
            await self.pins.pin(version.adapter_id)
        if self._merge_pin == version.adapter_id:
            try:
                await self.merge(version.adapter_id)
            except Exception:  # registered all the same; the older version stays merged
                log.exception("merging %s v%d in place of its older version failed",
                              *version.key)  # fmt: skip
        return Registration(
            adapter=await self.get(version.adapter_id),
            created=registered.created,
            ignored_files=registered.ignored_files,
        )

    # -- lookups ------------------------------------------------------------------------------
    async def get(self, adapter_id: str, principal: Principal | None = None) -> AdapterView:
        """An adapter's latest version, every version held, and how it is held."""
        if is_composed_id(adapter_id):
            version = self.resolver.composed(adapter_id, principal)
            versions: tuple[int, ...] = (1,)
        else:
            try:
                held = self.registry.store.versions(check_adapter_id(adapter_id))
            except AdapterNotFound:
                check_use(principal, adapter_id, None)
                raise
            version, versions = held[-1], tuple(v.version for v in held)
            check_use(principal, adapter_id, version)
        return self._view(version, versions, await self._snapshot())

    async def available(self, principal: Principal | None = None) -> list[AdapterView]:
        """The adapters `principal` may use."""
        store, snapshot = self.registry.store, await self._snapshot()
        found = []
        for latest in store.latest_versions():
            if may_use(principal, latest):
                try:
                    versions = tuple(v.version for v in store.versions(latest.adapter_id))
                except AdapterNotFound:  # deleted meanwhile
                    continue
                found.append(self._view(latest, versions, snapshot))
        return found

    def _view(
        self, version: AdapterVersion, versions: tuple[int, ...], snapshot: EngineSnapshot
    ) -> AdapterView:
        merged = snapshot.merge.adapter
        return AdapterView(
            version=version,
            versions=versions,
            pinned=self.pins.version(version.adapter_id) is not None,
            merged=merged is not None and merged.adapter_id == version.adapter_id,
            composition=self.resolver.composition_of(version.adapter_id),
        )

    async def cache_view(self, principal: Principal | None = None) -> CacheView:
        check_admin(principal, "reading the cache statistics")
        return self.cache_view_of(await self._snapshot())

    def cache_view_of(self, snapshot: EngineSnapshot) -> CacheView:
        """Both tiers: the device one as `snapshot` saw it, the host one now."""
        device = TierView(
            tier="device",
            resident=len(snapshot.slots),
            capacity=snapshot.num_slots,
            used_bytes=0,
            budget_bytes=0,
            stats=snapshot.device_tier,
        )
        host = TierView(
            tier="host",
            resident=self.cache.resident(),
            capacity=0,
            used_bytes=self.cache.used_bytes,
            budget_bytes=self.cache.budget_bytes,
            stats=self.cache.stats,
        )
        return CacheView(
            tiers=(device, host), pinned=self.pins.ids(), prefix_cache=snapshot.prefix_cache
        )

    # -- removal ------------------------------------------------------------------------------
    async def delete(self, adapter_id: str, principal: Principal | None = None) -> list[int]:
        """New requests get NOT_FOUND at once; those in flight hold the weights and finish.
        Blobs go unless a load still needs them (those are collected as orphans later)."""
        check_admin(principal, "deleting an adapter")
        versions = await asyncio.to_thread(self.registry.delete, adapter_id)
        await self.follow_store()  # its pin, merge and compositions go
        await asyncio.wrap_future(self.engine.forget_prefixes(adapter_id))
        digests = {v.digest for v in versions}
        self.cache.forget(digests)
        keep = self.cache.in_use()
        await asyncio.to_thread(self.registry.store.remove_blobs, digests, keep)
        return [v.version for v in versions]

    async def collect_orphans(self) -> None:
        """Remove blobs nothing references any more (a load in progress keeps its own)."""
        await asyncio.to_thread(self.registry.store.collect_orphans, keep=self.cache.in_use())

    # -- pins ---------------------------------------------------------------------------------
    async def pin(self, adapter_id: str, principal: Principal | None = None) -> AdapterView:
        check_admin(principal, "pinning an adapter")
        version = await self.pins.pin(adapter_id)
        return await self.get(version.adapter_id)

    async def unpin(self, adapter_id: str, principal: Principal | None = None) -> AdapterView:
        check_admin(principal, "unpinning an adapter")
        version = await self.pins.unpin(adapter_id)
        return await self.get(version.adapter_id)

    # -- merging into the base ----------------------------------------------------------------
    async def merge(self, adapter_id: str, principal: Principal | None = None) -> MergeView:
        """Fold an adapter's latest version into the base and keep it there (the policy
        leaves a pinned merge alone) until `unmerge`."""
        check_admin(principal, "merging an adapter")
        if is_composed_id(adapter_id):
            raise InvalidRequest("adapter_id", "a composed adapter cannot be merged")
        version = await self.resolver.resolve(adapter_id)
        lease = await self.resolver.lease(version)
        try:
            await asyncio.wrap_future(self.engine.merge(version, lease.weights))
        finally:
            lease.release()  # the device slot holds the weights now
        self._merge_pin = adapter_id
        return await self.merge_state()

    async def unmerge(self, principal: Principal | None = None) -> MergeView:
        """Undo the merge now, pinned or automatic."""
        check_admin(principal, "unmerging")
        self._merge_pin = None
        await asyncio.wrap_future(self.engine.unmerge())
        return await self.merge_state()

    async def merge_state(self, principal: Principal | None = None) -> MergeView:
        check_admin(principal, "reading the merge state")
        return self.merge_view_of(await self._snapshot())

    def merge_view_of(self, snapshot: EngineSnapshot) -> MergeView:
        merge = snapshot.merge
        key, leader = merge.adapter, merge.leader
        return MergeView(
            adapter_id=key.adapter_id if key else "",
            version=key.version if key else 0,
            pinned=merge.pinned,
            policy=self.merge_policy,
            token_share=merge.merged_share if key else merge.leader_share,
            leading_adapter_id=leader.adapter_id if leader else "",
            merges=merge.merges,
            unmerges=merge.unmerges,
            last_merge_seconds=merge.last_merge_s,
            last_unmerge_seconds=merge.last_unmerge_s,
        )

    # -- following the shared store -----------------------------------------------------------
    async def refresh_store(self) -> None:
        await asyncio.to_thread(self.registry.store.refresh)
        await self.follow_store()

    async def follow_store(self) -> None:
        """Bring what this server holds in line with the store (see the module docstring)."""
        latest = {v.adapter_id: v for v in self.registry.store.latest_versions()}
        for adapter_id in self.pins.ids():
            version, newest = self.pins.version(adapter_id), latest.get(adapter_id)
            if newest == version:
                continue
            if newest is None:
                await self.pins.drop(adapter_id)
                continue
            try:
                await self.pins.pin(adapter_id)
            except AdapterNotFound:  # deleted again meanwhile
                await self.pins.drop(adapter_id)
            except Exception:  # e.g. no slot for the new version: the old one stays pinned
                log.exception("pinning the newer version of %s failed", adapter_id)
        merged = (await self._snapshot()).merge.adapter
        if (merged is not None and merged.adapter_id not in latest) or (
            self._merge_pin is not None and self._merge_pin not in latest
        ):
            await self.unmerge()
        elif (
            merged is not None
            and self._merge_pin == merged.adapter_id
            and latest[merged.adapter_id].version != merged.version
        ):
            try:
                await self.merge(merged.adapter_id)
            except Exception:  # the older version stays merged, as after a register
                log.exception("merging the newer version of %s failed", merged.adapter_id)
        self.resolver.forget_compositions(set(latest))

    async def _snapshot(self) -> EngineSnapshot:
        """The engine's state for a view (see Engine.recent_snapshot), off the event loop."""
        snapshot = await asyncio.to_thread(self.engine.recent_snapshot)
        if snapshot is None:
            raise NotReady("the engine is not serving")
        return snapshot
