"""The server process: one runtime (the model loads in the background, so health can say
NOT_SERVING until it is loaded and warmed up), the gRPC and HTTP front ends on it (one event
loop), the Prometheus exposition, the upkeep of the adapter store, and the API key file's
reloads."""

from __future__ import annotations

import asyncio
import logging

from loraplex.adapters.store import ORPHAN_MIN_AGE_S
from loraplex.core.errors import NotReady, Unrecoverable
from loraplex.server.config import ServerConfig, is_loopback
from loraplex.server.grpc_api.server import GrpcServer
from loraplex.server.http_api.server import HttpServer
from loraplex.server.logs import shown_ids
from loraplex.server.metrics import Metrics
from loraplex.server.runtime.auth import KeyRing
from loraplex.server.runtime.runtime import Runtime

log = logging.getLogger(__name__)

CUT_NOTICE_S = 0.5  # how long before the drain ends the requests it will cut are logged


def metrics_for(config: ServerConfig) -> Metrics:
    """The server's metrics: with API keys (tenants), /metrics (which takes no key) names no
    request's adapter unless --metrics-adapter-ids says so."""
    return Metrics(
        config.metrics_adapter_labels,
        adapter_ids=config.metrics_adapter_ids or config.auth_keys is None,
    )


class LoraplexServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.runtime: Runtime | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None  # bound once started, when metrics are on
        self.http_port: int | None = None  # bound once started, when HTTP is on
        self.load_error: BaseException | None = None
        self._grpc: GrpcServer | None = None
        self._http: HttpServer | None = None
        self._draining = False
        self._background: set[asyncio.Future[None]] = set()
        self._ready = asyncio.Event()
        self._load_task: asyncio.Task[None] | None = None
        self._upkeep_task: asyncio.Task[None] | None = None
        self._keys_task: asyncio.Task[None] | None = None
        self.keys: KeyRing | None = None

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING); the model loads in the background."""
        config = self.config
        keys = None
        if config.auth_keys is not None:
            keys = self.keys = KeyRing.from_file(config.auth_keys)
            log.info("authentication on: %d API keys from %s", len(keys), config.auth_keys)
            if config.tls_cert is None and not is_loopback(config.host):
                # Only with --allow-plaintext-keys (the config refuses it otherwise).
                log.warning(
                    "API keys over plaintext on %s (--allow-plaintext-keys): TLS must end in "
                    "front of the server, or clients' keys cross the network readable",
                    config.host,
                )
            if config.auth_keys_reload_s > 0:
                self._keys_task = asyncio.create_task(self._watch_keys(keys))
        else:
            log.warning(
                "authentication is off (no --auth-keys)%s",
                "" if config.insecure else ": serving loopback only",
            )
        self.metrics = metrics_for(config)
        self._grpc = GrpcServer(config, self.serving_runtime, keys, self.metrics.registry)
        self.port = await self._grpc.start()
        if config.http_port is not None:
            self._http = HttpServer(config, self.serving_runtime, keys, self.metrics.registry)
            self.http_port = await self._http.start()
            log.info("HTTP API (OpenAI-compatible) on %s:%d", config.host, self.http_port)
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
        log.info("listening on %s:%d; loading the model", config.host, self.port)
        self._load_task = asyncio.create_task(self._load())
        return self.port

    async def reload_keys(self) -> bool:
        """Re-read the API key file (SIGHUP): a key no longer in it is refused from the next
        call on. False if there are no keys, the file did not change, or it no longer parses
        (logged; the keys stay as they were)."""
        if self.keys is None:
            log.warning("no API key file (--auth-keys) to reload")
            return False
        # asked for: say again why it fails, if it does
        return await asyncio.to_thread(self.keys.refresh, say_again=True)

    async def _watch_keys(self, keys: KeyRing) -> None:
        """Reload the key file when it changes (checked every --auth-keys-reload-s): a file
        replaced in place, or a mounted Secret that Kubernetes updated."""
        while True:
            await asyncio.sleep(self.config.auth_keys_reload_s)
            try:
                await asyncio.to_thread(keys.refresh)
            except Exception:
                log.exception("checking the API key file failed; will retry")

    def serving_runtime(self) -> Runtime:
        """The runtime, for a call that needs it: NotReady while the model loads or the server
        drains, Unrecoverable once the model failed to load or the device failed."""
        if self._draining:
            raise NotReady("the server is shutting down; retry on another replica")
        if self.runtime is not None and self.runtime.engine.failure is not None:
            raise self.runtime.engine.failure  # the device failed: restart (health says so)
        if self.runtime is not None and self._ready.is_set():
            return self.runtime
        if self.load_error is not None:
            raise Unrecoverable("the model failed to load; see the server log")
        raise NotReady("the model is still loading; retry shortly")

    async def _load(self) -> None:
        try:
            runtime = await asyncio.to_thread(Runtime.create, self.config)
            self.runtime = runtime
            runtime.observers.observers.append(self.metrics)
            self.metrics.watch(runtime)
            await runtime.start()
        except Exception as exc:
            self.load_error = exc
            log.exception("the model failed to load")
            self._ready.set()
            return
        assert self._grpc is not None
        self._watch_engine(runtime)
        await self._grpc.set_serving(True)
        log.info("serving %s", runtime.info.model_id)
        self._ready.set()
        self._upkeep_task = asyncio.create_task(self._upkeep(runtime))

    def _watch_engine(self, runtime: Runtime) -> None:
        loop = asyncio.get_running_loop()
        runtime.engine.on_failure.append(  # called on the engine thread
            lambda failure: loop.call_soon_threadsafe(self._device_failed)
        )

    def _device_failed(self) -> None:
        """The engine's device failed for good: health says NOT_SERVING (and /health 503), so
        that the orchestrator restarts the server."""
        if self._grpc is not None:
            task = asyncio.ensure_future(self._grpc.set_serving(False))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _upkeep(self, runtime: Runtime) -> None:
        """Re-read the adapter store now and then (other replicas register into it too), and
        collect its orphan blobs about once an hour."""
        loop = asyncio.get_running_loop()
        collected_at = loop.time()
        while True:
            await asyncio.sleep(self.config.store_refresh_s)
            try:
                await runtime.adapters.refresh_store()
                if loop.time() - collected_at >= ORPHAN_MIN_AGE_S:
                    collected_at = loop.time()
                    await runtime.adapters.collect_orphans()
            except Exception:
                log.exception("maintaining the adapter store failed; will retry")

    async def wait_ready(self) -> None:
        """Wait until the model is loaded (raises what stopped it loading, if anything)."""
        await self._ready.wait()
        if self.load_error is not None:
            raise RuntimeError("the model failed to load") from self.load_error

    async def wait_closed(self) -> None:
        if self._grpc is not None:
            await self._grpc.wait_closed()

    async def stop(self, grace: float = 5.0) -> None:
        """Say NOT_SERVING, finish in-flight calls (gRPC and HTTP) within `grace` seconds, then
        stop the engine."""
        self._draining = True
        if self._grpc is not None:
            await self._grpc.set_serving(False)
            fronts = [self._grpc.stop(grace)] + ([self._http.stop(grace)] if self._http else [])
            stopping = asyncio.ensure_future(asyncio.gather(*fronts))
            # Just before gRPC cancels what is left: the requests the drain will cut.
            notice = max(0.0, grace - min(CUT_NOTICE_S, grace / 10))
            done, _ = await asyncio.wait({stopping}, timeout=notice)
            if not done and self.runtime is not None:
                cut = self.runtime.requests.in_flight()
                if cut:
                    log.warning(
                        "the drain of %g s is running out: %d requests still in flight are cut: %s",
                        grace,
                        len(cut),
                        shown_ids(cut),
                    )
            await stopping
        if self._load_task is not None:
            await self._load_task
        if self._upkeep_task is not None:
            self._upkeep_task.cancel()
        if self._keys_task is not None:
            self._keys_task.cancel()
        if self.runtime is not None:
            await asyncio.to_thread(self.runtime.close)
