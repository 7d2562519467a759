"""The HTTP server's probes and route table on a real uvicorn server, before any model loads."""

from __future__ import annotations

import asyncio
import http.client

import pytest

from loraplex.core.errors import NotReady, Unrecoverable
from loraplex.server.config import ServerConfig
from loraplex.server.http_api.server import ROUTES, Access, HttpServer
from loraplex.server.runtime.auth import KeyRing


def get(port: int, path: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


async def probe(
    error: NotReady, paths: list[str], metrics: bool = False, keys: KeyRing | None = None
) -> list[int]:
    def runtime():
        raise error

    config = ServerConfig(http_port=0, metrics_port=0 if metrics else None)
    server = HttpServer(config, runtime, keys, registry=_registry())
    port = await server.start()
    try:
        return [await asyncio.to_thread(get, port, p) for p in paths]
    finally:
        await server.stop(1)


def _registry():
    from prometheus_client import CollectorRegistry

    return CollectorRegistry()


def test_loading_is_alive_but_not_ready():
    assert asyncio.run(probe(NotReady("loading"), ["/health", "/ready"])) == [200, 503]


def test_metrics_are_served_only_when_metrics_are_on():
    assert asyncio.run(probe(NotReady("loading"), ["/metrics"])) == [404]  # no --metrics-port
    assert asyncio.run(probe(NotReady("loading"), ["/metrics"], metrics=True)) == [200]
    # with API keys (tenants), metrics stay on --metrics-port, where operators bind them
    keys = KeyRing([])
    assert asyncio.run(probe(NotReady("loading"), ["/metrics"], metrics=True, keys=keys)) == [404]


def test_a_model_that_failed_to_load_is_not_alive():
    answers = asyncio.run(probe(Unrecoverable("the model failed to load"), ["/health"]))
    assert answers == [503]


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
def test_only_probes_are_open_and_only_client_routes_take_client_keys(route):
    # The allow-lists are explicit: a new route needs an admin key until it is listed.
    open_routes = {("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics")}
    client_routes = {
        ("GET", "/v1/models"),
        ("GET", "/v1/models/{model_id:path}"),
        ("POST", "/v1/chat/completions"),
        ("POST", "/v1/completions"),
    }
    key = (route.method, route.path)
    expected = (
        Access.OPEN
        if key in open_routes
        else Access.CLIENT
        if key in client_routes
        else Access.ADMIN
    )
    assert route.access is expected
