"""`loraplex serve` as users run it: a subprocess serving the embedded model, driven by the
`loraplex` CLI, then stopped with SIGTERM while a stream is in flight. One server for the module
(the CLI test first, the drain last: it stops the server)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loraplex.server.client import LoraplexClient
from loraplex.v1 import inference_pb2 as pb

pytestmark = pytest.mark.e2e

CLI = [sys.executable, "-m", "loraplex.server.cli"]


@pytest.fixture(scope="module")
def adapter_dir(peft_reference, adapter_root, tmp_path_factory):
    """A private copy of the r8 adapter under the allowed root."""
    _, _, dirs = peft_reference
    path = adapter_root / f"copy-{tmp_path_factory.mktemp('n').name}"
    shutil.copytree(dirs["attn-r8"], path)
    return path


@pytest.fixture(scope="module")
def served(model_home, adapter_dir, tmp_path_factory):
    """(address, process, environment, log path) of a `loraplex serve` subprocess, once it
    serves."""
    tmp = tmp_path_factory.mktemp("serve")
    env = {**os.environ, "LORAPLEX_HOME": str(model_home)}
    log_path = tmp / "server.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            [*CLI, "serve", "--port", "0", "--http-port", "0", "--metrics-port", "0",
             "--drain-seconds", "60", "--adapter-root", str(adapter_dir.parent),
             "--adapter-store", str(tmp / "store")],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield wait_serving(log_path, server), server, env, log_path
    finally:
        if server.poll() is None:
            server.kill()


def wait_for_port(log_path, server) -> int:
    """The port the server bound (it logs it), once it does."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert server.poll() is None, log_path.read_text()
        match = re.search(r"listening on [^:]+:(\d+)", log_path.read_text())
        if match:
            return int(match.group(1))
        time.sleep(0.2)
    raise AssertionError("the server never said where it listens")


def wait_serving(log_path, server) -> str:
    """The address of a `loraplex serve` subprocess, once its health says SERVING."""
    address = f"127.0.0.1:{wait_for_port(log_path, server)}"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + 300
        while True:
            assert server.poll() is None, log_path.read_text()
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == 1:
                    return address
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.5)


def test_cli_serve_register_generate(served, adapter_dir):
    address, _, env, log_path = served

    def run(*args: str) -> str:
        done = subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stdout

    registered = json.loads(
        run("adapters", "register", "cli-adapter", str(adapter_dir), "--server", address)
    )
    assert registered["adapter"]["adapter_id"] == "cli-adapter"
    assert [a["adapter_id"] for a in json.loads(run("adapters", "--server", address, "list"))] == [
        "cli-adapter"
    ]
    assert json.loads(run("adapters", "--server", address, "get", "cli-adapter"))["version"] == 1
    ask = [
        "generate",
        "--server",
        address,
        "--adapter",
        "cli-adapter",
        "--chat",
        "--max-new-tokens",
        "8",
        "Name three colours.",
    ]
    first = json.loads(run(*ask, "--json"))
    assert first["adapter_id"] == "cli-adapter" and first["usage"]["completion_tokens"] > 0
    # The first request prefills the whole prompt; the next ones find its blocks in the prefix
    # cache and prefill the rest, at another row count, where another kernel may round
    # differently and flip a greedy near-tie. So the stream is compared with a request that
    # took its path.
    out = json.loads(run(*ask, "--json"))
    streamed = run(*ask, "--stream")
    assert streamed.rstrip("\n") == out["text"], log_path.read_text()[-4000:]
    # `register DIR --name ID` is the same content under a second id; `register DIR` names
    # the adapter after its directory.
    named = json.loads(
        run(
            "adapters",
            "--server",
            address,
            "register",
            str(adapter_dir),
            "--name",
            "cli-second",
        )
    )
    assert named["adapter"]["digest"] == registered["adapter"]["digest"]
    by_dir = json.loads(run("adapters", "--server", address, "register", str(adapter_dir)))
    assert by_dir["adapter"]["adapter_id"] == adapter_dir.name
    for adapter_id in ("cli-second", adapter_dir.name):
        run("adapters", "rm", adapter_id, "--server", address)
    assert json.loads(run("adapters", "--server", address, "rm", "cli-adapter"))["deleted"]
    failed = subprocess.run(
        [*CLI, "generate", "--server", address, "--adapter", "cli-adapter", "hi"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert failed.returncode == 1 and "NOT_FOUND" in failed.stderr


def test_the_openai_api_is_served_beside_grpc(served):
    """`loraplex serve` answers OpenAI's client on its HTTP port, from the same engine."""
    import openai

    address, _, _, log_path = served
    port = re.search(r"HTTP API \S+ on [^\s]+:(\d+)", log_path.read_text()).group(1)
    api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
    base = api.models.list().data[0].id
    question = [{"role": "user", "content": "Name three colours."}]
    asked = pb.GenerateRequest(
        messages=[pb.ChatMessage(role="user", content="Name three colours.")], max_new_tokens=8
    )
    with LoraplexClient(address, timeout=120) as client:
        client.generate(asked)  # the prompt's blocks cached: both answers below take one path
        answer = api.chat.completions.create(
            model=base, messages=question, max_tokens=8, temperature=0
        )
        same = client.generate(asked)
    assert answer.choices[0].message.content == same.text
    assert answer.usage.completion_tokens == same.usage.completion_tokens


def test_sigterm_drains_streams_refuses_new_rpcs_and_exits_0(served):
    address, server, _, _ = served
    with LoraplexClient(address, timeout=120) as client:
        request = pb.GenerateRequest(prompt="Once upon a time", max_new_tokens=16)
        stream = client.generate_stream(request)
        first = next(stream)  # in flight
        server.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with LoraplexClient(address, timeout=10) as late, pytest.raises(grpc.RpcError) as err:
            late.generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=2))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        rest = list(stream)  # the stream in flight finishes
        assert rest[-1].finish_reason in ("stop", "length")
        assert sum(len(c.token_ids) for c in [first, *rest]) == rest[-1].usage.completion_tokens
    assert server.wait(60) == 0
