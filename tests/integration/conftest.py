"""The embedded SmolLM2 model served once per test session, in this process: the shared server
that every integration test uses unless it needs a server of its own."""

from __future__ import annotations

import pytest

from loraplex.core.config import ModelConfig
from loraplex.server.client import LoraplexClient
from loraplex.server.config import EngineConfig, MergeSettings, ServerConfig
from tests.helpers import ServerThread


@pytest.fixture(scope="session")
def server(model_home, adapter_root, tmp_path_factory):
    config = ServerConfig(
        port=0,
        http_port=0,
        adapter_roots=(adapter_root,),
        adapter_store=tmp_path_factory.mktemp("store"),
        model=ModelConfig(home=model_home),
        # Merges only when a test asks (MergeAdapter): an automatic merge in the middle of another
        # test would change its outputs' bf16 rounding (tests/server/engine covers the policy).
        # No prefix cache either: tests here compare repeated requests token for token, and a
        # cached prefix leaves the rest of a prompt to a smaller step, whose bf16 rounding can
        # tip a near tie (test_prefix_cache.py runs a server of its own, with the cache).
        engine=EngineConfig(
            max_loras=4,
            max_batch_size=32,
            merge=MergeSettings(policy="off"),
            prefix_cache=False,
        ),
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def registered(server, peft_reference):
    _, _, dirs = peft_reference
    with LoraplexClient(server.address) as client:
        for name, path in dirs.items():
            response = client.register(name, str(path))
            assert response.adapter.adapter_id == name
    return dirs


@pytest.fixture
def client(server):
    with LoraplexClient(server.address, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def peft_float32(model_home, registered):
    """The exact reference: PEFT in float32 on the same NF4 base (dequantized exactly), holding
    the adapters the server serves."""
    from peft import PeftModel

    from loraplex.core.config import ModelConfig
    from loraplex.core.model import load_model

    model = load_model(ModelConfig(home=model_home, dtype="float32")).model
    names = list(registered)
    model = PeftModel.from_pretrained(model, registered[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(registered[name], adapter_name=name)
    return model.eval()
