"""The gRPC front end's server: the loraplex services, health and reflection on grpc.aio, behind
the metrics and authentication interceptors, on plaintext or TLS, within the limits of
--grpc-* (ServerConfig.grpc_limits): concurrent calls and streams, keepalive enforcement,
connection idle time and age."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from loraplex.server.config import ServerConfig
from loraplex.server.grpc_api.interceptor import CallInterceptor
from loraplex.server.grpc_api.metrics import GrpcMetricsInterceptor
from loraplex.server.grpc_api.servicers import (
    AdaptersServicer,
    InferenceServicer,
    RuntimeGetter,
)
from loraplex.server.runtime.auth import KeyRing
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

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


class GrpcServer:
    """Health says NOT_SERVING from `start` until `set_serving(True)`."""

    def __init__(
        self,
        config: ServerConfig,
        runtime: RuntimeGetter,
        keys: KeyRing | None,
        registry: CollectorRegistry,
    ) -> None:
        self.config = config
        self.port: int | None = None
        self._health = health.aio.HealthServicer()
        limits = config.grpc_limits
        self._server = grpc.aio.server(
            # The metrics interceptor first: it sees every call, refused ones included.
            interceptors=[
                GrpcMetricsInterceptor(registry),
                CallInterceptor(keys, limits.max_keyless_streams),
            ],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                *limits.server_options(config.engine.max_request_seconds),
            ],
            maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        )
        inference_pb2_grpc.add_InferenceServicer_to_server(InferenceServicer(runtime), self._server)
        adapters_pb2_grpc.add_AdaptersServicer_to_server(AdaptersServicer(runtime), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )

    async def start(self) -> int:
        """Bind and serve; returns the port."""
        await self.set_serving(False)
        address = f"{self.config.host}:{self.config.port}"
        credentials = server_credentials(self.config)
        if credentials is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, credentials)
        if not self.port:
            raise OSError(f"could not bind {address}")
        await self._server.start()
        return self.port

    async def set_serving(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self._health.set("", status)
        for name in SERVICES:
            await self._health.set(name, status)

    async def stop(self, grace: float) -> None:
        """Refuse new calls; those in flight get `grace` seconds to finish."""
        await self._server.stop(grace)

    async def wait_closed(self) -> None:
        await self._server.wait_for_termination()
