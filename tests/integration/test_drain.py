"""Shutdown: the drain's end names the requests it cuts."""

from __future__ import annotations

import logging
import threading
import time

import grpc
import pytest

from loraplex.core.config import ModelConfig
from loraplex.server.client import LoraplexClient
from loraplex.server.config import ServerConfig
from loraplex.v1 import inference_pb2 as pb
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration


def test_requests_still_running_when_the_drain_ends_are_named_in_the_log(
    tiny_model_dir, tmp_path, caplog
):
    config = ServerConfig(
        port=0,
        adapter_store=tmp_path / "store",
        model=ModelConfig(
            model=str(tiny_model_dir), quantization="none", dtype="float32", device="cpu"
        ),
    )
    thread = ServerThread(config).start()
    ended: list[grpc.StatusCode] = []

    def endless() -> None:
        with LoraplexClient(thread.address, timeout=120) as client:
            request = pb.GenerateRequest(prompt="hi", max_new_tokens=500, ignore_eos=True)
            metadata = (("x-request-id", "drained-1"),)
            try:
                for _ in client.inference.GenerateStream(request, metadata=metadata):
                    pass
            except grpc.RpcError as exc:
                ended.append(exc.code())

    caller = threading.Thread(target=endless)
    caller.start()
    deadline = time.monotonic() + 60
    while thread.state().running == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="loraplex.server.app"):
        thread.call(thread.server.stop(grace=0.2))
    caller.join(30)
    thread.loop.call_soon_threadsafe(thread.loop.stop)
    cut = [r.getMessage() for r in caplog.records if "cut" in r.getMessage()]
    assert cut and "drained-1" in cut[0], caplog.text
    assert ended and ended[0] != grpc.StatusCode.OK
