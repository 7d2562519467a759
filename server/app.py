"""The gRPC server process: services, health, reflection, and the model loaded in the
background so health can say NOT_SERVING until the model is loaded and warmed up."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from loraplex.adapters.store import ORPHAN_MIN_AGE_S
from loraplex.server.auth import KeyRing
from loraplex.server.config import ServerConfig
from loraplex.server.errors import NotReady
from loraplex.server.frontend import Frontend
from loraplex.server.interceptor import CallInterceptor
from loraplex.server.metrics import GrpcMetricsInterceptor, Metrics
from loraplex.server.service import AdaptersServicer, InferenceServicer
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

log = logging.getLogger(__name__)

SERVICES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"].full_name,
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"].full_name,
)
MAX_MESSAGE_BYTES = 16 << 20


def server_credentials(config: ServerConfig) -> grpc.ServerCredentials | None:
    """TLS (mutual when a client CA is given) from the configured PEM files; None: plaintext."""
    if config.tls_cert is None or config.tls_key is None:
        return None
    ca = config.tls_client_ca.read_bytes() if config.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


class LoraplexServer:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.frontend: Frontend | None = None
        self.port: int | None = None
        self.metrics_port: int | None = None  # bound once started, when metrics are on
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._ready = asyncio.Event()
        self._load_task: asyncio.Task[None] | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self.load_error: BaseException | None = None

    async def start(self) -> int:
        """Bind and start serving (health NOT_SERVING); the model loads in the background."""
        config = self.config
        keys = None
        if config.auth_keys is not None:
            keys = KeyRing.from_file(config.auth_keys)
            log.info("authentication on: %d API keys from %s", len(keys), config.auth_keys)
        else:
            log.warning(
                "authentication is off (no --auth-keys)%s",
                "" if config.insecure else ": serving loopback only",
            )
        self.metrics = Metrics(config.metrics_adapter_labels)
        server = grpc.aio.server(
            # The metrics interceptor first: it sees every call, refused ones included.
            interceptors=[GrpcMetricsInterceptor(self.metrics), CallInterceptor(keys)],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ],
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(
            InferenceServicer(self._serving_frontend), server
        )
        adapters_pb2_grpc.add_AdaptersServicer_to_server(
            AdaptersServicer(self._serving_frontend), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        address = f"{config.host}:{config.port}"
        credentials = server_credentials(config)
        if credentials is None:
            self.port = server.add_insecure_port(address)
        else:
            self.port = server.add_secure_port(address, credentials)
        if not self.port:
            raise OSError(f"could not bind {address}")
        await server.start()
        self._server = server
        if config.metrics_port is not None:
            self.metrics_port = self.metrics.serve(config.host, config.metrics_port)
        log.info("listening on %s:%d; loading the model", self.config.host, self.port)
        self._load_task = asyncio.create_task(self._load())
        return self.port

    def _serving_frontend(self) -> Frontend:
        if self.frontend is not None and self._ready.is_set():
            return self.frontend
        if self.load_error is not None:
            raise NotReady("the model failed to load; see the server log")
        raise NotReady("the model is still loading; retry shortly")

    async def _load(self) -> None:
        try:
            frontend = await asyncio.to_thread(Frontend.create, self.config)
            self.frontend = frontend
            frontend.observers.observers.append(self.metrics)
            self.metrics.watch(frontend)
            await frontend.warmup()
            for adapter_id in self.config.pinned_adapters:
                await frontend.pin_adapter(adapter_id)
        except Exception as exc:
            self.load_error = exc
            log.exception("the model failed to load")
            self._ready.set()
            return
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info("serving %s", frontend.loaded.model_id)
        self._ready.set()
        self._refresh_task = asyncio.create_task(self._refresh_store(frontend))

    async def _refresh_store(self, frontend: Frontend) -> None:
        """Re-read the adapter store now and then (other replicas register into it too), and
        collect its orphan blobs about once an hour."""
        loop = asyncio.get_running_loop()
        collected_at = loop.time()
        while True:
            await asyncio.sleep(self.config.store_refresh_s)
            try:
                await frontend.refresh_store()
                if loop.time() - collected_at >= ORPHAN_MIN_AGE_S:
                    collected_at = loop.time()
                    await frontend.collect_orphans()
            except Exception:
                log.exception("maintaining the adapter store failed; will retry")

    async def wait_ready(self) -> None:
        """Wait until the model is loaded (raises what stopped it loading, if anything)."""
        await self._ready.wait()
        if self.load_error is not None:
            raise RuntimeError("the model failed to load") from self.load_error

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def stop(self, grace: float = 5.0) -> None:
        """Say NOT_SERVING, finish in-flight RPCs within `grace` seconds, then stop the engine."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        if self._server is not None:
            await self._server.stop(grace)
        if self._load_task is not None:
            await self._load_task
        if self._refresh_task is not None:
            self._refresh_task.cancel()
        if self.frontend is not None:
            await asyncio.to_thread(self.frontend.close)

    async def _set_health(self, status: int) -> None:
        await self._health.set("", status)
        for name in SERVICES:
            await self._health.set(name, status)
