"""The Ray Serve ingress' guard on uploads: it gathers a PushAdapter stream before a replica
sees it, so it refuses callers who may not upload, and uploads over the size limit, first."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from loraplex.adapters.sources import EXTRA_BYTES
from loraplex.server.config import EngineConfig, ServerConfig
from loraplex.v1 import adapters_pb2
from tests.helpers import write_key_file

pytest.importorskip("ray", reason="Ray Serve is a dev dependency")


class Context:
    """What the ingress reads from and sets on Ray's gRPC context."""

    def __init__(self, metadata: dict[str, str]) -> None:
        self.metadata = metadata
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def invocation_metadata(self) -> list[tuple[str, str]]:
        return list(self.metadata.items())

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing: object) -> None:
        pass


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


@pytest.fixture
def ingress(tmp_path, monkeypatch):
    from loraplex.server import ray_serve

    roles = {"admin": ("t", "admin"), "client": ("t", "client")}
    keys = write_key_file(tmp_path / "keys.toml", roles)
    monkeypatch.setattr(ray_serve, "_generation_actor", lambda: None)  # no Ray cluster
    limit = EngineConfig(max_adapter_bytes=64)
    replica = ray_serve.IngressReplica(
        None, ServerConfig(auth_keys=tmp_path / "keys.toml", engine=limit)
    )

    async def forward(*args: object) -> tuple[bytes, tuple[int, str, list]]:
        raise AssertionError("an upload the ingress refuses reaches no replica")

    monkeypatch.setattr(replica, "forward", forward)
    return replica, keys


@pytest.mark.parametrize(
    ("who", "code"),
    [
        (None, grpc.StatusCode.UNAUTHENTICATED),
        ("wrong", grpc.StatusCode.UNAUTHENTICATED),
        ("client", grpc.StatusCode.PERMISSION_DENIED),
    ],
)
def test_an_upload_is_refused_before_it_is_read(ingress, who, code):
    replica, keys = ingress
    metadata = {} if who is None else {"authorization": f"Bearer {keys.get(who, who)}"}
    context, upload = Context(metadata), Upload([10, 10])
    asyncio.run(replica.PushAdapter(upload, context))
    assert (context.code, upload.read) == (code, 0)


def test_an_upload_over_the_limit_is_refused_while_it_is_read(ingress):
    replica, keys = ingress
    context = Context({"authorization": f"Bearer {keys['admin']}"})
    limit = 64 + EXTRA_BYTES
    upload = Upload([limit // 2, limit // 2, 10, 10, 10])
    asyncio.run(replica.PushAdapter(upload, context))
    assert context.code == grpc.StatusCode.INVALID_ARGUMENT and "larger than" in context.details
    assert upload.read == 3  # stopped at the piece that went over
