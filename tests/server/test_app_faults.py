"""A device that fails for good takes the server out of service: gRPC health NOT_SERVING,
HTTP /health and /ready 503, every call UNAVAILABLE, so that the orchestrator restarts it."""

from __future__ import annotations

import asyncio
import http.client
import threading
import types

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.core.errors import Unrecoverable
from loraplex.server.app import LoraplexServer
from loraplex.server.config import ServerConfig


def test_a_failed_device_takes_the_server_out_of_service(monkeypatch):
    async def loaded(self) -> None:  # a stand-in runtime whose engine can fail, no model
        engine = types.SimpleNamespace(failure=None, on_failure=[])
        requests = types.SimpleNamespace(in_flight=list)
        self.runtime = types.SimpleNamespace(engine=engine, requests=requests, close=lambda: None)
        self._watch_engine(self.runtime)
        await self._grpc.set_serving(True)
        self._ready.set()

    monkeypatch.setattr(LoraplexServer, "_load", loaded)

    def probes(server: LoraplexServer) -> tuple[int, int, int]:
        with grpc.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        statuses = []
        for path in ("/health", "/ready"):
            conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=10)
            conn.request("GET", path)
            statuses.append(conn.getresponse().status)
            conn.close()
        return health.status, statuses[0], statuses[1]

    async def main() -> None:
        server = LoraplexServer(ServerConfig(port=0, http_port=0))
        await server.start()
        await server.wait_ready()
        try:
            serving = health_pb2.HealthCheckResponse.SERVING
            assert await asyncio.to_thread(probes, server) == (serving, 200, 200)
            engine = server.runtime.engine
            failure = Unrecoverable("the device failed; the server must be restarted")

            def fail() -> None:  # as the engine thread does
                engine.failure = failure
                for observe in engine.on_failure:
                    observe(failure)

            thread = threading.Thread(target=fail)
            thread.start()
            thread.join()
            await asyncio.sleep(0.2)
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            assert await asyncio.to_thread(probes, server) == (not_serving, 503, 503)
        finally:
            await server.stop(grace=0)

    asyncio.run(main())
