"""The Ray Serve ingress on its own, with stand-ins for Ray: it admits every call by the gRPC
interceptor's rule before anything reaches a replica or the store generation, refuses
uploads over the size limit while gathering them, and bumps the store generation only for a
change that may have reached the store."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from loraplex.adapters.sources import EXTRA_BYTES
from loraplex.server.config import EngineConfig, ServerConfig
from loraplex.server.grpc_api.interceptor import ADMIN_METHODS, REQUEST_ID_KEY
from loraplex.v1 import adapters_pb2, inference_pb2
from tests.helpers import write_key_file

pytest.importorskip("ray", reason="Ray Serve is a dev dependency")

OK, INVALID = grpc.StatusCode.OK.value[0], grpc.StatusCode.INVALID_ARGUMENT.value[0]


class Context:
    """What the ingress reads from and sets on Ray's gRPC context."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self.metadata = metadata
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: dict[str, Any] = {}

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self.metadata.items())

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing: list[tuple[str, Any]]) -> None:
        self.trailing = dict(trailing)


class Upload:
    """A PushAdapter stream as Ray hands it over; counts the messages read."""

    def __init__(self, sizes: list[int]) -> None:
        self.sizes = sizes
        self.read = 0

    def __aiter__(self) -> AsyncIterator[adapters_pb2.PushAdapterRequest]:
        return self._messages()

    async def _messages(self) -> AsyncIterator[adapters_pb2.PushAdapterRequest]:
        for size in self.sizes:
            self.read += 1
            yield adapters_pb2.PushAdapterRequest(adapter_id="a", file_name="f", data=b"x" * size)

    def is_cancelled(self) -> bool:
        return False


class Remote:
    """A Ray method stand-in: `.remote(...)` records the call and runs `answer`."""

    def __init__(self, calls: list[str], name: str, answer: Any) -> None:
        self.calls, self.name, self.answer = calls, name, answer

    def remote(self, *args: Any) -> Any:
        self.calls.append(self.name)
        return self.answer(*args)


class Counter:
    """The store generation actor: every use is recorded."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.value = 0
        self.get = Remote(self.calls, "get", self._get)
        self.bump = Remote(self.calls, "bump", self._bump)

    async def _get(self) -> tuple[str, int]:
        return ("epoch", self.value)

    async def _bump(self) -> tuple[str, int]:
        self.value += 1
        return ("epoch", self.value)


class Replica:
    """The engine replicas' handle: answers every unary call with `answer`, or raises it."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.answer: Any = None
        self.unary = Remote(self.calls, "unary", self._unary)
        self.stream = Remote(self.calls, "stream", self._stream)

    def options(self, **_: Any) -> Replica:
        return self

    async def _unary(self, *_: Any) -> Any:
        from loraplex.server.ray_serve import Answer, Status

        if isinstance(self.answer, BaseException):
            raise self.answer
        return self.answer or Answer(b"", Status(OK, "", []))

    async def _stream(self, *_: Any) -> AsyncIterator[Any]:
        from loraplex.server.ray_serve import Status

        yield inference_pb2.GenerateResponse(text="hi", finish_reason="stop").SerializeToString()
        yield Status(OK, "", [])


@pytest.fixture
def keys(tmp_path) -> dict[str, str]:
    roles = {"admin": ("t", "admin"), "client": ("t", "client")}
    return write_key_file(tmp_path / "keys.toml", roles)


@pytest.fixture
def make_ingress(tmp_path, monkeypatch):
    """(ingress, its replicas' handle, its store generation counter) for a config."""
    from loraplex.server import ray_generation, ray_serve

    def make(config: ServerConfig) -> tuple[Any, Replica, Counter]:
        counter, replica = Counter(), Replica()
        monkeypatch.setattr(ray_generation, "generation_actor", lambda: counter)  # no Ray cluster
        return ray_serve.IngressReplica(replica, config), replica, counter

    return make


@pytest.fixture
def ingress(tmp_path, keys, make_ingress):
    limit = EngineConfig(max_adapter_bytes=64)
    return make_ingress(ServerConfig(auth_keys=tmp_path / "keys.toml", engine=limit))


SERVICES = (
    inference_pb2.DESCRIPTOR.services_by_name["Inference"],
    adapters_pb2.DESCRIPTOR.services_by_name["Adapters"],
)
PATHS = {m.name: f"/{service.full_name}/{m.name}" for service in SERVICES for m in service.methods}


def every_rpc() -> list[str]:
    """Every RPC of the loraplex services, from their descriptors (a new one is tested too)."""
    return sorted(PATHS)


def path_of(rpc: str) -> str:
    return PATHS[rpc]


def test_the_ingress_serves_every_rpc_of_the_services():
    from loraplex.server.ray_serve import UNARY, IngressReplica

    assert set(PATHS) == {*UNARY, "GenerateStream", "PushAdapter"}
    assert all(callable(getattr(IngressReplica, rpc, None)) for rpc in PATHS)


def call(ingress: Any, rpc: str, metadata: dict[str, str]) -> Context:
    """One call of `rpc` on the ingress, as Ray's proxy makes it; the context holds its end."""
    from loraplex.server.ray_serve import UNARY, StreamFailed

    context = Context(metadata)

    async def run() -> None:
        if rpc == "PushAdapter":
            await ingress.PushAdapter(Upload([10]), context)
        elif rpc == "GenerateStream":
            request = inference_pb2.GenerateRequest(adapter_id="a", prompt="hi")
            try:
                async for _ in ingress.GenerateStream(request, context):
                    pass
            except StreamFailed:
                pass
        else:
            request_type = {
                "Inference": inference_pb2.GenerateRequest,
                "Adapters": adapters_pb2.GetAdapterRequest,
            }[UNARY[rpc][0]]
            # Any message of the service parses for the stand-ins: the ingress reads only
            # `adapter_id` and `name`, and only after it admitted the caller.
            await getattr(ingress, rpc)(request_type(), context)

    asyncio.run(run())
    return context


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}", REQUEST_ID_KEY: "req-1"}


@pytest.mark.parametrize("rpc", every_rpc())
@pytest.mark.parametrize("who", [None, "wrong"])
def test_a_caller_without_a_valid_key_reaches_nothing(ingress, rpc, who):
    replica_ingress, replica, counter = ingress
    metadata = {REQUEST_ID_KEY: "req-1"} if who is None else bearer("not-a-key")
    context = call(replica_ingress, rpc, metadata)
    assert context.code == grpc.StatusCode.UNAUTHENTICATED
    assert (replica.calls, counter.calls) == ([], [])  # no replica, no store generation
    assert context.trailing[REQUEST_ID_KEY] == "req-1"  # as the interceptor answers


@pytest.mark.parametrize("rpc", every_rpc())
def test_a_client_key_reaches_only_the_client_rpcs(ingress, keys, rpc):
    replica_ingress, replica, counter = ingress
    context = call(replica_ingress, rpc, bearer(keys["client"]))
    if path_of(rpc) in ADMIN_METHODS:
        assert context.code == grpc.StatusCode.PERMISSION_DENIED
        assert "admin" in context.details
        assert (replica.calls, counter.calls) == ([], [])
    else:
        assert context.code == grpc.StatusCode.OK
        assert len(replica.calls) == 1


@pytest.mark.parametrize("rpc", every_rpc())
def test_an_admin_key_reaches_every_rpc(ingress, keys, rpc):
    replica_ingress, replica, _ = ingress
    context = call(replica_ingress, rpc, bearer(keys["admin"]))
    assert context.code == grpc.StatusCode.OK and len(replica.calls) == 1


def test_without_keys_every_caller_is_admitted(make_ingress):
    """--insecure: the ingress admits everyone, as the plain server does."""
    for rpc in every_rpc():
        replica_ingress, replica, _ = make_ingress(ServerConfig(insecure=True))
        assert call(replica_ingress, rpc, {}).code == grpc.StatusCode.OK, rpc
        assert len(replica.calls) == 1, rpc


@pytest.mark.parametrize("rpc", ["RegisterAdapter", "PushAdapter", "DeleteAdapter"])
def test_the_store_generation_moves_only_for_a_change_that_may_have_happened(ingress, keys, rpc):
    import ray

    from loraplex.server.ray_serve import Answer, Status

    replica_ingress, replica, counter = ingress
    admin = bearer(keys["admin"])
    outcomes = [
        (Answer(b"", Status(INVALID, "refused", [])), 0),  # refused: nothing changed
        (Answer(b"", Status(grpc.StatusCode.NOT_FOUND.value[0], "no such adapter", [])), 0),
        (Answer(b"", Status(OK, "", [])), 1),  # committed
        # Refused after its commit (a registration whose pin failed): the store did change.
        (Answer(b"", Status(grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], "", []), True), 1),
        (Answer(b"", Status(grpc.StatusCode.INTERNAL.value[0], "", [])), 1),  # unknown
        (ray.exceptions.RayActorError(), 1),  # the replica was lost: unknown
    ]
    for answer, bumps in outcomes:
        replica.answer, before = answer, counter.value
        call(replica_ingress, rpc, admin)
        assert counter.value - before == bumps, answer
    for who in (None, "client"):  # refused at the ingress: not even read
        metadata = {} if who is None else bearer(keys[who])
        before = counter.value
        assert call(replica_ingress, rpc, metadata).code != grpc.StatusCode.OK
        assert counter.value == before


def test_calls_that_change_nothing_leave_the_store_generation(ingress, keys):
    replica_ingress, _, counter = ingress
    for rpc in every_rpc():
        if rpc not in ("RegisterAdapter", "PushAdapter", "DeleteAdapter"):
            assert call(replica_ingress, rpc, bearer(keys["admin"])).code == grpc.StatusCode.OK
    assert "bump" not in counter.calls


@pytest.mark.parametrize(
    ("who", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("wrong", grpc.StatusCode.UNAUTHENTICATED),
        ("client", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_an_upload_is_refused_before_it_is_read(ingress, keys, who, code):
    replica_ingress, replica, _ = ingress
    metadata = {} if who is None else {"authorization": f"Bearer {keys.get(who, who)}"}
    context, upload = Context(metadata), Upload([10, 10])
    asyncio.run(replica_ingress.PushAdapter(upload, context))
    assert (context.code, upload.read, replica.calls) == (code, 0, [])


def test_an_upload_over_the_limit_is_refused_while_it_is_read(ingress, keys):
    replica_ingress, replica, counter = ingress
    context = Context({"authorization": f"Bearer {keys['admin']}"})
    limit = 64 + EXTRA_BYTES
    upload = Upload([limit // 2, limit // 2, 10, 10, 10])
    asyncio.run(replica_ingress.PushAdapter(upload, context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "larger than" in context.details
    assert upload.read == 3  # stopped at the piece that went over
    assert (replica.calls, counter.calls) == ([], [])


def test_a_revoked_key_stops_working_at_the_ingress_without_a_redeploy(tmp_path, make_ingress):
    """The key file is read again when it changed (at most every --auth-keys-reload-s): a key
    taken out of it is refused from then on; a file that no longer parses keeps the keys."""
    path = tmp_path / "keys.toml"
    keys = write_key_file(path, {"kept": ("t", "client"), "revoked": ("t", "client")})
    config = ServerConfig(auth_keys=path, auth_keys_reload_s=0.05)
    replica_ingress, _, _ = make_ingress(config)
    rpc = next(r for r in every_rpc() if path_of(r) not in ADMIN_METHODS)
    assert call(replica_ingress, rpc, bearer(keys["revoked"])).code == grpc.StatusCode.OK
    lines = path.read_text().split("[[keys]]")
    path.write_text("[[keys]]" + next(part for part in lines if '"kept-key"' in part))
    replica_ingress._keys_checked -= 1.0  # the interval is over
    assert call(replica_ingress, rpc, bearer(keys["revoked"])).code == (
        grpc.StatusCode.UNAUTHENTICATED
    )
    assert call(replica_ingress, rpc, bearer(keys["kept"])).code == grpc.StatusCode.OK
    path.write_text("not toml [")
    replica_ingress._keys_checked -= 1.0
    assert call(replica_ingress, rpc, bearer(keys["kept"])).code == grpc.StatusCode.OK
