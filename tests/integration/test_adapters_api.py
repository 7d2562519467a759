"""Adapter management over gRPC, and a restart that restores the registry."""

from __future__ import annotations

import json
import shutil

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file, save_file

from loraplex.core.config import ModelConfig
from loraplex.server.client import LoraplexClient
from loraplex.server.config import ServerConfig
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
