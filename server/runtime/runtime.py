"""The runtime: one engine and the adapter tiers behind it, wired once, and the two services the
front ends call (`requests`, `adapters`). See this package's docstring for how a front end
uses it."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

from loraplex.adapters.cache import MEMORY_SHARE, HostCache, default_budget
from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.store import AdapterStore
from loraplex.core import __version__
from loraplex.core.machine import TuningCache, available_memory_bytes
from loraplex.core.model import LORA_TARGETS, load_model
from loraplex.core.types import BaseModelSpec
from loraplex.server.config import ServerConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.model_runner import ModelRunner
from loraplex.server.engine.state import EngineInfo
from loraplex.server.runtime.adapters import AdapterService
from loraplex.server.runtime.auth import KeyRing
from loraplex.server.runtime.heap import GcPauses, freeze_heap, unfreeze_heap
from loraplex.server.runtime.quotas import Quotas, load_tenant_limits
from loraplex.server.runtime.requests import Requests
from loraplex.server.runtime.resolver import AdapterResolver
from loraplex.server.runtime.telemetry import Observers, RequestLog
from loraplex.server.runtime.views import ModelInfo

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, engine: Engine, registry: AdapterRegistry, config: ServerConfig) -> None:
        self.engine = engine
        self.registry = registry
        self.config = config
        self.info: EngineInfo = engine.info
        self.cache = HostCache(registry.load_weights, host_cache_budget(config.host_cache_bytes))
        per_tenant = load_tenant_limits(config.auth_keys) if config.auth_keys else {}
        self.quotas = Quotas(config.tenant_limits, per_tenant)
        self.observers = Observers([RequestLog(config.log_prompts)])  # each request, at its end
        self.resolver = AdapterResolver(
            registry,
            self.cache,
            engine,
            max_rank=config.engine.max_lora_rank,
            refresh_store=self._refresh_store,
        )
        self.adapters = AdapterService(
            registry, self.cache, engine, self.resolver, config.engine.merge.policy
        )
        self.requests = Requests(
            engine,
            self.resolver,
            self.quotas,
            self.observers,
            default_max_new_tokens=config.engine.default_max_new_tokens,
            log_prompts=config.log_prompts,
        )
        self.gc_pauses = GcPauses()  # last: nothing after it may fail and leave it installed
        self.gc_pauses.install()
        self._frozen = False

    @classmethod
    def create(cls, config: ServerConfig) -> Runtime:
        """Load the model and build everything behind the front ends (blocking; seconds). The
        model is loaded on the engine thread, the one thread that runs tensor work."""
        ec = config.engine
        if ec.tenant_max_running is None:  # automatic: headroom only when tenants share
            keys = KeyRing.from_file(config.auth_keys) if config.auth_keys else None
            tenants = keys.client_tenants if keys is not None else set()
            share = max(1, ec.max_batch_size * 3 // 4) if len(tenants) > 1 else 0
            ec = dataclasses.replace(ec, tenant_max_running=share)

        def make_runner() -> ModelRunner:
            tuning = TuningCache(config.model.home / "tuning")
            return ModelRunner.from_config(load_model(config.model), ec, tuning)

        engine = Engine(make_runner, ec)
        info = engine.start()
        spec = BaseModelSpec(
            linear_shapes=info.target_shapes,
            max_rank=ec.max_lora_rank,
            fingerprint=info.fingerprint,
            max_bytes=ec.max_adapter_bytes,
        )
        store = AdapterStore(config.store_url, config.storage_options)
        store.collect_orphans()
        registry = AdapterRegistry(
            store, spec, config.allowed_adapter_roots, config.storage_options
        )
        return cls(engine, registry, config)

    def close(self) -> None:
        self.engine.stop()
        self.cache.close()
        self.adapters.close()
        self.gc_pauses.uninstall()
        if self._frozen:
            unfreeze_heap()
            self._frozen = False

    async def _refresh_store(self) -> None:
        await self.adapters.refresh_store()

    async def start(self) -> None:
        """Warm the request path up, pin the adapters the configuration names, and freeze the
        heap built so far (see heap.py)."""
        await self.requests.warmup()
        for adapter_id in self.config.pinned_adapters:
            await self.adapters.pins.pin(adapter_id)
        # What start-up built stays to the end: out of the collector's walks (heap.py).
        freeze_heap()
        self._frozen = True

    def model_info(self) -> ModelInfo:
        info, ec = self.info, self.config.engine
        max_loras, max_loras_choice = self.engine.slot_limit()
        return ModelInfo(
            model_id=info.model_id,
            model_type=info.model_type,
            quantization=info.quantization,
            device=info.device,
            dtype=info.dtype,
            max_context_length=info.max_context,
            vocab_size=info.vocab_size,
            num_layers=info.num_layers,
            supported_target_modules=LORA_TARGETS,
            max_lora_rank=ec.max_lora_rank,
            max_loras=max_loras,
            max_loras_choice=max_loras_choice,
            max_batch_size=ec.max_batch_size,
            base_model_fingerprint=info.fingerprint,
            version=__version__,
            has_chat_template=bool(getattr(info.tokenizer, "chat_template", None)),
            dtype_choice=info.dtype_choice,
            machine=info.machine,
            base_kernels=info.base_kernels,
            dense_cache_bytes=info.dense_cache_bytes,
        )

    def observe_adapter_loads(self, tier: str, observer: Callable[[float], None]) -> None:
        """Call `observer(seconds)` after each adapter load into `tier` ("device": a slot,
        "host": host memory); it must not block."""
        if tier == "device":
            self.engine.observe_adapter_loads(observer)
        else:
            self.cache.stats.load_observers.append(observer)


def host_cache_budget(configured: int | None) -> int:
    """--host-cache-mb in bytes, or by default a share of the memory available now (logged)."""
    if configured is not None:
        log.info("host tier of the adapter cache: %d MiB (--host-cache-mb)", configured >> 20)
        return configured
    budget = default_budget(available_memory_bytes())
    log.info(
        "host tier of the adapter cache: %d MiB (auto: 1/%d of the memory available)",
        budget >> 20,
        MEMORY_SHARE,
    )
    return budget
