"""The embedded SmolLM2 model, loaded once per test session: one server, one PEFT reference."""

from __future__ import annotations

from pathlib import Path

import pytest
from peft import LoraConfig

from loraplex.server.client import LoraplexClient
from loraplex.server.config import EngineConfig, ModelConfig, ServerConfig
from loraplex.server.engine.merging import MergeSettings
from loraplex.server.model_loader import load_model
from tests.helpers import ServerThread, add_peft_adapter

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
# Three adapters of different ranks and targets, as tenants would bring them.
ADAPTERS = {
    "attn-r8": (LoraConfig(r=8, lora_alpha=16, target_modules=ATTENTION), 1),
    "all-r16": (LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), 2),
    "mix-r32": (
        LoraConfig(
            r=32,
            lora_alpha=32,
            use_rslora=True,
            target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        ),
        3,
    ),
}


@pytest.fixture(scope="session")
def adapter_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("adapters")


@pytest.fixture(scope="session")
def peft_reference(model_home, adapter_root):
    """Stock PEFT on its own NF4 copy of the base, holding the three adapters (saved to disk)."""
    loaded = load_model(ModelConfig(home=model_home))
    model = loaded.model
    for name, (config, seed) in ADAPTERS.items():
        model = add_peft_adapter(model, name, config, seed=seed, b_std=0.03)
    model.eval()
    model.save_pretrained(adapter_root / "peft", selected_adapters=list(ADAPTERS))
    dirs = {name: adapter_root / "peft" / name for name in ADAPTERS}
    return model, loaded.tokenizer, dirs


@pytest.fixture(scope="session")
def server(model_home, adapter_root, tmp_path_factory):
    config = ServerConfig(
        port=0,
        adapter_roots=(adapter_root,),
        adapter_store=tmp_path_factory.mktemp("store"),
        model=ModelConfig(home=model_home),
        # Merges only when a test asks (MergeAdapter): an automatic merge in the middle of
        # another test would change its outputs' bf16 rounding (tests/unit covers the policy).
        engine=EngineConfig(max_loras=4, max_batch_size=32, merge=MergeSettings(policy="off")),
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
