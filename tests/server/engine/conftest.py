"""The engine over the tiny random Llama, with two PEFT adapters registered."""

from __future__ import annotations

import copy

import pytest
from peft import LoraConfig

from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.store import AdapterStore
from loraplex.core.types import BaseModelSpec
from loraplex.server.config import EngineConfig
from loraplex.server.engine.engine import Engine
from loraplex.server.engine.model_runner import ModelRunner
from tests.helpers import add_peft_adapter


@pytest.fixture
def setup(load_tiny, tmp_path):
    """An engine over the tiny model with two registered PEFT adapters."""

    def build(**engine_kwargs):
        loaded = load_tiny()
        peft_base = copy.deepcopy(loaded.model)
        config = EngineConfig(**{"max_loras": 4, "max_lora_rank": 8, **engine_kwargs})
        runner = ModelRunner.from_config(loaded, config)
        spec = BaseModelSpec(runner.target_shapes, max_rank=8, fingerprint="tiny")
        registry = AdapterRegistry(AdapterStore(tmp_path / "store"), spec, [tmp_path])
        peft = add_peft_adapter(
            peft_base, "one", LoraConfig(r=4, target_modules="all-linear"), seed=1, b_std=0.5
        )
        peft = add_peft_adapter(
            peft, "two", LoraConfig(r=8, target_modules=["q_proj"]), seed=2, b_std=0.5
        )
        peft.save_pretrained(tmp_path / "peft", selected_adapters=["one", "two"])
        versions = {n: registry.register(n, str(tmp_path / "peft" / n))[0] for n in ("one", "two")}
        engine = Engine(lambda: runner, config, registry.load_weights)
        assert engine.start().fingerprint == runner.loaded.fingerprint
        return engine, versions

    engines = []

    def factory(**kwargs):
        engine, versions = build(**kwargs)
        engines.append(engine)
        return engine, versions

    yield factory
    for engine in engines:
        engine.stop()
