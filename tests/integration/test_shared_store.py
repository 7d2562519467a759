"""Two servers sharing one adapter store: what one server holds for an adapter (a pin, a
pinned merge) follows the changes the other makes to it, once it re-reads the store (Ray Serve
replicas do before serving; any server does on a miss and every store_refresh_s)."""

from __future__ import annotations

import pytest
from peft import LoraConfig
from transformers import AutoModelForCausalLM

from loraplex.core.config import ModelConfig
from loraplex.server.client import LoraplexClient
from loraplex.server.config import EngineConfig, MergeSettings, ServerConfig
from tests.helpers import ServerThread, add_peft_adapter

pytestmark = pytest.mark.integration


@pytest.fixture
def versions(tmp_path, tiny_model_dir):
    """Three different adapters for the tiny model (three versions of one)."""
    dirs = []
    for seed in range(3):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
        peft_model = add_peft_adapter(model, "x", config, seed=seed, b_std=0.05)
        peft_model.save_pretrained(tmp_path / f"v{seed}", selected_adapters=["x"])
        dirs.append(tmp_path / f"v{seed}" / "x")
    return dirs


@pytest.fixture
def servers(tmp_path, tiny_model_dir):
    config = ServerConfig(
        port=0,
        adapter_roots=(tmp_path,),
        adapter_store=tmp_path / "store",
        model=ModelConfig(
            model=str(tiny_model_dir), quantization="none", dtype="float32", device="cpu"
        ),
        engine=EngineConfig(max_loras=4, max_batch_size=2, merge=MergeSettings(policy="off")),
    )
    threads = [ServerThread(config).start() for _ in range(2)]
    yield threads
    for thread in threads:
        thread.stop()


def test_pins_and_merges_follow_another_servers_changes(servers, versions):
    a, b = servers
    with LoraplexClient(a.address, 60) as on_a, LoraplexClient(b.address, 60) as on_b:
        assert on_a.register("x", str(versions[0])).adapter.version == 1
        on_a.pin("x")
        assert on_b.register("x", str(versions[1])).adapter.version == 2
        a.call(a.runtime.adapters.refresh_store())
        assert list(on_a.cache_stats().pinned) == ["x"]
        assert a.runtime.adapters.pins.version("x").version == 2  # the pin moved to v2

        on_a.merge("x")
        assert on_b.register("x", str(versions[2])).adapter.version == 3
        a.call(a.runtime.adapters.refresh_store())
        state = on_a.merge_state()
        assert (state.adapter_id, state.version, state.pinned) == ("x", 3, True)

        on_b.delete("x")
        a.call(a.runtime.adapters.refresh_store())
        assert on_a.merge_state().adapter_id == ""  # unmerged
        assert list(on_a.cache_stats().pinned) == []  # unpinned
        state = a.state()  # no slot kept for x: neither pinned nor held by a merge
        assert not any(s.pinned for s in state.slots) and state.merge.adapter is None
