"""Adapter management over gRPC, restarts, and the CLI end to end."""

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
from safetensors.torch import load_file, save_file

from loraplex.server.client import LoraplexClient
from loraplex.server.config import ModelConfig, ServerConfig
from loraplex.v1 import adapters_pb2
from loraplex.v1 import inference_pb2 as pb
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration

ASK = [pb.ChatMessage(role="user", content="Name three colours.")]


@pytest.fixture
def adapter_dir(peft_reference, adapter_root, tmp_path_factory):
    """A private copy of the r8 adapter under the allowed root, free to modify."""
    _, _, dirs = peft_reference
    path = adapter_root / f"copy-{tmp_path_factory.mktemp('n').name}"
    shutil.copytree(dirs["attn-r8"], path)
    return path


def test_register_get_list_delete(client, adapter_dir):
    response = client.register("colours", str(adapter_dir))
    assert response.created and response.adapter.version == 1
    info = response.adapter
    assert info.rank == 8 and list(info.target_modules) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert info.digest.startswith("sha256:") and info.size_bytes > 0
    again = client.register("colours", str(adapter_dir))
    assert not again.created and again.adapter.digest == info.digest
    assert client.get("colours").versions == [1]
    assert "colours" in {a.adapter_id for a in client.list()}
    out = client.generate(pb.GenerateRequest(adapter_id="colours", messages=ASK, max_new_tokens=8))
    assert out.adapter_id == "colours" and out.adapter_version == 1
    deleted = client.delete("colours")
    assert deleted.deleted and list(deleted.versions) == [1]
    for call in (
        lambda: client.get("colours"),
        lambda: client.delete("colours"),
        lambda: client.generate(pb.GenerateRequest(adapter_id="colours", prompt="x")),
    ):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_new_content_becomes_next_version_and_serves(client, adapter_dir):
    client.register("evolving", str(adapter_dir))
    request = pb.GenerateRequest(adapter_id="evolving", messages=ASK, max_new_tokens=12)
    before = client.generate(request)
    weights = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 3 if "lora_B" in k else v for k, v in tensors.items()}, weights)
    response = client.register("evolving", str(adapter_dir))
    assert response.created and response.adapter.version == 2
    assert list(response.adapter.versions) == [1, 2]
    after = client.generate(request)
    assert after.adapter_version == 2
    assert after.token_ids != before.token_ids  # the new weights are what serve now
    client.delete("evolving")


def test_delete_then_reregister_never_serves_the_old_weights(client, adapter_dir, tmp_path):
    request = pb.GenerateRequest(adapter_id="phoenix", messages=ASK, max_new_tokens=12)
    client.register("phoenix", str(adapter_dir))
    old = client.generate(request)  # v1 is now resident in a slot
    client.delete("phoenix")
    weights = adapter_dir / "adapter_model.safetensors"
    save_file({k: v * 3 if "lora_B" in k else v for k, v in load_file(weights).items()}, weights)
    reborn = client.register("phoenix", str(adapter_dir))
    assert reborn.adapter.version == 2  # versions are never reused
    new = client.generate(request)
    assert new.adapter_version == 2 and new.token_ids != old.token_ids
    client.register("phoenix-twin", str(adapter_dir))
    twin = client.generate(
        pb.GenerateRequest(adapter_id="phoenix-twin", messages=ASK, max_new_tokens=12)
    )
    assert twin.token_ids == new.token_ids
    client.delete("phoenix")
    client.delete("phoenix-twin")


@pytest.mark.parametrize(
    ("mutate", "code", "needle"),
    [
        (lambda p: (p / "adapter_model.bin").write_bytes(b"\x80"), "INVALID_ARGUMENT", "pickle"),
        (
            lambda p: (p / "adapter_config.json").write_text(
                json.dumps({**json.loads((p / "adapter_config.json").read_text()), "r": 512})
            ),
            "INVALID_ARGUMENT",
            "max rank",
        ),
    ],
)
def test_bad_adapters_are_refused(client, adapter_dir, mutate, code, needle):
    mutate(adapter_dir)
    with pytest.raises(grpc.RpcError) as err:
        client.register("refused", str(adapter_dir))
    assert err.value.code().name == code and needle in err.value.details()
    assert "refused" not in {a.adapter_id for a in client.list()}


def test_paths_outside_the_allowed_roots_are_denied(client, tmp_path):
    with pytest.raises(grpc.RpcError) as err:
        client.register("outside", str(tmp_path))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        client.register("../../etc", "/etc")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_restart_restores_the_registry(model_home, adapter_root, adapter_dir, tmp_path):
    config = ServerConfig(
        port=0,
        adapter_roots=(adapter_root,),
        adapter_store=tmp_path / "store",
        model=ModelConfig(home=model_home),
    )
    first = ServerThread(config).start()
    with LoraplexClient(first.address, timeout=120) as c:
        c.register("kept", str(adapter_dir))
        request = pb.GenerateRequest(adapter_id="kept", messages=ASK, max_new_tokens=10)
        before = c.generate(request)
    first.stop()
    shutil.rmtree(adapter_dir)  # the store holds its own copy

    second = ServerThread(config).start(ready=False)
    try:
        with grpc.insecure_channel(second.address) as channel:  # still loading the model
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
        with LoraplexClient(second.address, timeout=120) as c:
            with pytest.raises(grpc.RpcError) as err:
                c.generate(request)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            second.call(second.server.wait_ready(), timeout=600)
            assert [a.adapter_id for a in c.list()] == ["kept"]
            after = c.generate(request)
        assert (after.adapter_version, after.text) == (1, before.text)
    finally:
        second.stop()


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


def test_sigterm_drains_streams_refuses_new_rpcs_and_exits_0(model_home, tmp_path):
    env = {**os.environ, "LORAPLEX_HOME": str(model_home)}
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            [sys.executable, "-m", "loraplex.server.cli", "serve", "--port", "0",
             "--metrics-port", "0", "--drain-seconds", "60",
             "--adapter-store", str(tmp_path / "store")],
            env=env, stdout=log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        address = wait_serving(log_path, server)
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
    finally:
        if server.poll() is None:
            server.kill()


def test_cli_serve_register_generate(model_home, adapter_dir, tmp_path):
    env = {**os.environ, "LORAPLEX_HOME": str(model_home)}
    cli = [sys.executable, "-m", "loraplex.server.cli"]
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log_file:
        server = subprocess.Popen(
            [
                *cli,
                "serve",
                "--port",
                "0",
                "--metrics-port",
                "0",
                "--adapter-root",
                str(adapter_dir.parent),
                "--adapter-store",
                str(tmp_path / "store"),
            ],
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        address = wait_serving(log_path, server)

        def run(*args: str) -> str:
            done = subprocess.run(
                [*cli, *args], env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, done.stderr
            return done.stdout

        registered = json.loads(
            run("adapters", "register", "cli-adapter", str(adapter_dir), "--server", address)
        )
        assert registered["adapter"]["adapter_id"] == "cli-adapter"
        assert [
            a["adapter_id"] for a in json.loads(run("adapters", "--server", address, "list"))
        ] == ["cli-adapter"]
        assert (
            json.loads(run("adapters", "--server", address, "get", "cli-adapter"))["version"] == 1
        )
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
        out = json.loads(run(*ask, "--json"))
        assert out["adapter_id"] == "cli-adapter" and out["usage"]["completion_tokens"] > 0
        streamed = run(*ask, "--stream")
        assert streamed.rstrip("\n") == out["text"]
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
            [*cli, "generate", "--server", address, "--adapter", "cli-adapter", "hi"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert failed.returncode == 1 and "NOT_FOUND" in failed.stderr
    finally:
        server.send_signal(2)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
    assert server.returncode == 0


def test_name_is_an_alias_of_adapter_id(client, adapter_dir):
    stub = client.adapters
    registered = stub.RegisterAdapter(
        adapters_pb2.RegisterAdapterRequest(name="aliased", path=str(adapter_dir))
    )
    assert registered.adapter.adapter_id == registered.adapter.name == "aliased"
    assert stub.GetAdapter(adapters_pb2.GetAdapterRequest(name="aliased")).version == 1
    with pytest.raises(grpc.RpcError) as err:
        stub.GetAdapter(adapters_pb2.GetAdapterRequest(adapter_id="aliased", name="other"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "name" in err.value.details()
    assert stub.DeleteAdapter(adapters_pb2.DeleteAdapterRequest(name="aliased")).deleted
