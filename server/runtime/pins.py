"""Pins: adapters an operator keeps in a device slot and in host memory (`adapters pin`, or
`serve --pin`), whatever the traffic. A pin holds one version; a newer version of a pinned
adapter takes the pin over (AdapterService does that when it registers or re-reads the store).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from loraplex.adapters.cache import HostCache, Lease
from loraplex.adapters.compositions import is_composed_id
from loraplex.adapters.registry import check_adapter_id
from loraplex.core.errors import InvalidRequest
from loraplex.core.types import AdapterVersion
from loraplex.server.engine.engine import Engine
from loraplex.server.runtime.resolver import AdapterResolver

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pin:
    version: AdapterVersion
    lease: Lease  # holds the host-tier entry (the engine holds the device slot)


class Pins:
    def __init__(self, engine: Engine, cache: HostCache, resolver: AdapterResolver) -> None:
        self.engine = engine
        self.cache = cache
        self.resolver = resolver
        self._pins: dict[str, Pin] = {}  # adapter id -> its pin
        self._lock = asyncio.Lock()

    def version(self, adapter_id: str) -> AdapterVersion | None:
        """The pinned version of `adapter_id`, if it is pinned."""
        pin = self._pins.get(adapter_id)
        return pin.version if pin is not None else None

    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self._pins))

    async def pin(self, adapter_id: str) -> AdapterVersion:
        """Keep the latest version in a device slot and host memory (it replaces a pin on an
        older version)."""
        async with self._lock:
            if is_composed_id(adapter_id):
                raise InvalidRequest("adapter_id", "a composed adapter cannot be pinned")
            version = await self.resolver.resolve(adapter_id)
            old = self._pins.get(adapter_id)
            if old is not None and old.version == version:
                return version
            lease = await self.cache.lease(version)
            try:
                await asyncio.wrap_future(self.engine.pin(version, lease.weights))
            except BaseException:
                lease.release()
                raise
            self.cache.pin(version.digest, True)
            self._pins[adapter_id] = Pin(version=version, lease=lease)
            if old is not None:
                await self._unpin(old)
            log.info("adapter %s v%d pinned", *version.key)
            return version

    async def unpin(self, adapter_id: str) -> AdapterVersion:
        async with self._lock:
            check_adapter_id(adapter_id)
            pin = self._pins.pop(adapter_id, None)
            if pin is None:
                self.resolver.registry.store.latest(adapter_id)  # NOT_FOUND for an unknown id
                raise InvalidRequest("adapter_id", f"adapter {adapter_id!r} is not pinned")
            await self._unpin(pin)
            return pin.version

    async def drop(self, adapter_id: str) -> None:
        """Unpin `adapter_id` if it is pinned (quietly: a deleted adapter's pin goes)."""
        async with self._lock:
            pin = self._pins.pop(adapter_id, None)
            if pin is not None:
                await self._unpin(pin)

    async def _unpin(self, pin: Pin) -> None:
        await asyncio.wrap_future(self.engine.unpin(pin.version))
        if not any(p.version.digest == pin.version.digest for p in self._pins.values()):
            self.cache.pin(pin.version.digest, False)
        pin.lease.release()
