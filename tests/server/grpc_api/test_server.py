"""The gRPC server on its own, with no model behind it (every loraplex call past the
interceptor answers UNAVAILABLE, "still loading"): who may call what, and the server's limits
on calls, streams and connections."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from loraplex.core.errors import NotReady
from loraplex.server.config import GrpcLimits, ServerConfig
from loraplex.server.grpc_api import interceptor
from loraplex.server.grpc_api.server import GrpcServer
from loraplex.server.runtime.auth import KeyRing, Principal, hash_key, new_key
from loraplex.v1 import adapters_pb2, inference_pb2

CLIENT, ADMIN = new_key(), new_key()
KEYS = KeyRing(
    [
        (hash_key(CLIENT), Principal(tenant="acme", role="client", key_name="app")),
        (hash_key(ADMIN), Principal(tenant="acme", role="admin", key_name="ops")),
    ]
)


def loading() -> Any:
    raise NotReady("the model is still loading; retry shortly")


def serve(
    scenario: Callable[[GrpcServer, str], Awaitable[None]], keys: KeyRing | None = None, **limits
) -> None:
    """Run `scenario(server, address)` against a started GrpcServer with these limits."""
    config = ServerConfig(port=0, grpc_limits=GrpcLimits(**limits))

    async def run() -> None:
        server = GrpcServer(config, loading, keys, CollectorRegistry())
        port = await server.start()
        await server.set_serving(True)
        try:
            await scenario(server, f"127.0.0.1:{port}")
        finally:
            await server.stop(0)

    asyncio.run(run())


def watch(channel: grpc.aio.Channel) -> Any:
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())


async def opened(call: Any) -> Any:
    """A Watch stream once its first status came (so the server counts it open)."""
    first = await asyncio.wait_for(call.read(), 10)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    return call


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        await asyncio.wait_for(call.read(), 10)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def every_loraplex_method() -> set[str]:
    return {
        f"/{service.full_name}/{method.name}"
        for module in (inference_pb2, adapters_pb2)
        for service in module.DESCRIPTOR.services_by_name.values()
        for method in service.methods
    }


def test_client_rpcs_are_an_explicit_allow_list_and_any_other_needs_an_admin_key():
    """A method nobody listed (a new RPC, a new method of another service, even of health or
    reflection) needs an admin key; a client key calls only CLIENT_METHODS; the health and
    reflection methods listed in EXEMPT_METHODS need none."""
    client = (("authorization", f"Bearer {CLIENT}"),)
    admin = (("authorization", f"Bearer {ADMIN}"),)
    assert every_loraplex_method() >= interceptor.CLIENT_METHODS
    assert every_loraplex_method() == interceptor.CLIENT_METHODS | interceptor.ADMIN_METHODS
    assert "/loraplex.v1.Adapters/RegisterAdapter" in interceptor.ADMIN_METHODS
    for method in (
        "/loraplex.v1.Adapters/SomeNewRpc",
        "/loraplex.v1.Inference/SomeNewRpc",
        "/loraplex.v2.Other/Method",
        "/grpc.health.v1.Health/CheckX",
        "/grpc.health.v1.Health/Forget",
        "/grpc.reflection.v1alpha.ServerReflection/Other",
        *interceptor.ADMIN_METHODS,
    ):
        refusal = interceptor.admit(KEYS, method, client)
        assert isinstance(refusal, interceptor.Refusal), method
        assert refusal.code == grpc.StatusCode.PERMISSION_DENIED, method
        assert interceptor.admit(KEYS, method, admin) == Principal("acme", "admin", "ops")
        assert interceptor.admit(KEYS, method, ()).code == grpc.StatusCode.UNAUTHENTICATED
    for method in interceptor.CLIENT_METHODS:
        assert interceptor.admit(KEYS, method, client) == Principal("acme", "client", "app")
    for method in interceptor.EXEMPT_METHODS:
        assert interceptor.admit(KEYS, method, ()) is None


def test_health_and_reflection_need_no_key_where_other_methods_do():
    async def scenario(server: GrpcServer, address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            asked = [reflection_pb2.ServerReflectionRequest(list_services="")]
            async for answer in reflection.ServerReflectionInfo(iter(asked)):
                services = {s.name for s in answer.list_services_response.service}
                assert "loraplex.v1.Inference" in services
            unknown = channel.unary_unary("/grpc.health.v1.Health/Forget")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await unknown(b"")
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # no such method here
            info = channel.unary_unary("/loraplex.v1.Inference/ModelInfo")
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await info(b"")
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED

    serve(scenario, keys=KEYS)


def test_health_watch_streams_are_capped():
    """They need no key: past --grpc-max-keyless-streams a new one is refused at once, and
    one that ends makes room."""

    async def scenario(server: GrpcServer, address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            first = await opened(watch(channel))
            await opened(watch(channel))
            assert await code_of(watch(channel)) == grpc.StatusCode.RESOURCE_EXHAUSTED
            first.cancel()
            deadline = time.monotonic() + 10
            while (code := await code_of(watch(channel))) != grpc.StatusCode.OK:
                assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the cancelled stream's place never freed"
                await asyncio.sleep(0.05)

    serve(scenario, keys=KEYS, max_keyless_streams=2)


def test_concurrent_rpcs_are_capped():
    async def scenario(server: GrpcServer, address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            held = [await opened(watch(channel)) for _ in range(3)]
            stub = health_pb2_grpc.HealthStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            held[0].cancel()
            deadline = time.monotonic() + 30  # the cancel reaches the server, then frees it
            while True:
                try:
                    await stub.Check(health_pb2.HealthCheckRequest(), timeout=10)
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    assert time.monotonic() < deadline, "the cancelled RPC's place never freed"
                    await asyncio.sleep(0.05)

    serve(scenario, max_concurrent_rpcs=3, max_keyless_streams=10)


def test_streams_per_connection_are_capped():
    """A connection's third stream waits (HTTP/2 flow) until one of its two ends; another
    connection is not held back."""

    async def scenario(server: GrpcServer, address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            first = await opened(watch(channel))
            await opened(watch(channel))
            third = asyncio.ensure_future(watch(channel).read())
            await asyncio.sleep(0.5)
            assert not third.done()  # held by the client: the connection has two open
            # Its own connection (channels of the same arguments would share one).
            own = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(address, options=own) as other:
                await opened(watch(other))
            first.cancel()
            serving = health_pb2.HealthCheckResponse.SERVING
            assert (await asyncio.wait_for(third, 10)).status == serving

    serve(scenario, max_streams_per_connection=2)


def test_a_client_pinging_too_often_is_disconnected():
    """Keepalive enforcement: pings closer than --grpc-min-ping-interval-s are strikes, and the
    connection gets GOAWAY too_many_pings."""

    async def scenario(server: GrpcServer, address: str) -> None:
        pinging = [
            ("grpc.keepalive_time_ms", 50),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        async with grpc.aio.insecure_channel(address, options=pinging) as channel:
            stream = await opened(watch(channel))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(stream.read(), 30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "ping" in (err.value.details() or "").lower()
        async with grpc.aio.insecure_channel(address) as polite:  # the server is unharmed
            await opened(watch(polite))

    serve(scenario, min_ping_interval_s=5)


def test_connections_are_closed_at_their_age_after_a_grace():
    async def scenario(server: GrpcServer, address: str) -> None:
        async with grpc.aio.insecure_channel(address) as channel:
            start = time.monotonic()
            stream = await opened(watch(channel))
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(stream.read(), 30)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert 0.7 < time.monotonic() - start < 20

    serve(scenario, max_connection_age_s=0.5, max_connection_age_grace_s=0.5)


def test_the_defaults_bound_every_limit():
    limits = GrpcLimits()
    options = dict(limits.server_options(max_request_seconds=600))
    assert options["grpc.max_concurrent_streams"] == limits.max_streams_per_connection
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000
    assert options["grpc.max_connection_age_ms"] == 3_600_000
    # Calls in flight when a connection reaches its age are not cut short by default.
    assert options["grpc.max_connection_age_grace_ms"] == 600_000
    assert options["grpc.max_connection_idle_ms"] == 1_800_000
    engine = ServerConfig().engine
    assert limits.max_concurrent_rpcs > engine.max_queue + engine.max_batch_size
    off = dataclasses.replace(limits, max_connection_age_s=0, max_connection_idle_s=0)
    assert not {"grpc.max_connection_age_ms", "grpc.max_connection_idle_ms"} & set(
        dict(off.server_options(600))
    )
    for bad in ({"max_concurrent_rpcs": 0}, {"keepalive_s": 0}, {"max_connection_age_s": -1}):
        with pytest.raises(ValueError):
            GrpcLimits(**bad)


def test_a_burst_of_calls_reaches_the_server_none_cancelled_by_grpc():
    """Thousands of calls at once arrive faster than the server's loop takes them up; gRPC
    holds them (--grpc-max-pending-calls) instead of cancelling some before the server sees
    them (its own default starts at 1000, at random): every call gets the server's answer
    (here UNAVAILABLE, the model still loading), none a bare CANCELLED."""
    burst = 4000

    async def scenario(server: GrpcServer, address: str) -> None:
        own = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
        channels = [grpc.aio.insecure_channel(address, options=own) for _ in range(8)]
        try:
            calls = [
                channels[i % len(channels)].unary_unary(
                    "/loraplex.v1.Inference/Generate",
                    request_serializer=inference_pb2.GenerateRequest.SerializeToString,
                    response_deserializer=inference_pb2.GenerateResponse.FromString,
                )(inference_pb2.GenerateRequest(prompt="Hi"), timeout=60)
                for i in range(burst)
            ]
            codes = await asyncio.gather(*(code_of_unary(c) for c in calls))
        finally:
            for channel in channels:
                await channel.close()
        assert Counter(codes) == {grpc.StatusCode.UNAVAILABLE: burst}

    # (the concurrent-call limit above the burst: its refusals are not what is tested)
    serve(scenario, max_concurrent_rpcs=2 * burst)


async def code_of_unary(call: Any) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK
