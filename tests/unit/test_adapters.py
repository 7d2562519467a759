"""Adapter validation against the base, the persistent store and registration."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from loraplex.adapters.errors import (
    AdapterNotFound,
    AdapterSourceDenied,
    InvalidAdapter,
    InvalidAdapterId,
)
from loraplex.adapters.registry import AdapterRegistry, check_adapter_id
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.validate import BaseModelSpec, load_adapter
from loraplex.server.model_loader import lora_target_shapes
from tests.helpers import add_peft_adapter

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory, tiny_model_dir):
    """A PEFT LoRA (r=4 on q/v) saved for the tiny model, and the spec of that model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    spec = BaseModelSpec(lora_target_shapes(model), max_rank=8, fingerprint="tiny")
    peft_model = add_peft_adapter(
        model,
        "default",
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        seed=0,
    )
    path = tmp_path_factory.mktemp("adapter")
    peft_model.save_pretrained(path)
    return path, spec


@pytest.fixture
def adapter_copy(tiny_adapter, tmp_path):
    src, spec = tiny_adapter
    dst = tmp_path / "adapter"
    shutil.copytree(src, dst)
    return dst, spec


def edit_config(path, **changes):
    config = json.loads((path / CONFIG).read_text())
    config.update(changes)
    (path / CONFIG).write_text(json.dumps(config))


def edit_tensors(path, fn):
    tensors = load_file(path / WEIGHTS)
    fn(tensors)
    save_file(tensors, path / WEIGHTS)


def test_valid_adapter_loads_with_scaling_folded(tiny_adapter):
    path, spec = tiny_adapter
    weights = load_adapter(path, spec)
    assert weights.rank == 4 and weights.target_modules == ("q_proj", "v_proj")
    assert len(weights.modules) == 4  # 2 layers x q, v
    tensors = load_file(path / WEIGHTS)
    a, b = weights.modules["model.layers.0.self_attn.q_proj"]
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(a, tensors[f"{prefix}.lora_A.weight"].float())
    torch.testing.assert_close(b, tensors[f"{prefix}.lora_B.weight"].float() * 2.0)  # 8 / 4


@pytest.mark.parametrize(
    ("break_it", "message"),
    [
        (lambda p: edit_config(p, peft_type="PREFIX_TUNING"), "peft_type"),
        (lambda p: edit_config(p, r=16), "exceeds the server's max rank"),
        (lambda p: edit_config(p, r=2), "shape"),
        (lambda p: edit_config(p, use_dora=True), "DoRA"),
        (lambda p: edit_config(p, modules_to_save=["lm_head"]), "modules_to_save"),
        (lambda p: edit_config(p, lora_alpha="big"), "lora_alpha"),
        (lambda p: (p / CONFIG).write_text("{not json"), "not valid JSON"),
        (lambda p: (p / CONFIG).unlink(), "adapter_config.json is missing"),
        (lambda p: (p / WEIGHTS).unlink(), "adapter_model.safetensors is missing"),
        (lambda p: (p / WEIGHTS).write_bytes(b"garbage"), "not a readable safetensors"),
        (lambda p: (p / "adapter_model.bin").write_bytes(b"\x80\x04"), "pickle"),
        (
            lambda p: edit_tensors(
                p,
                lambda t: t.update(
                    {k: torch.full_like(v, float("nan")) for k, v in t.items() if "lora_B" in k}
                ),
            ),
            "NaN or Inf",
        ),
        (
            lambda p: edit_tensors(
                p, lambda t: t.update({k: v.to(torch.int8) for k, v in t.items() if "lora_A" in k})
            ),
            "float dtype",
        ),
        (
            lambda p: edit_tensors(
                p,
                lambda t: t.update(
                    {k: v[:, :-1].contiguous() for k, v in t.items() if "lora_A" in k}
                ),
            ),
            "shape",
        ),
        (
            lambda p: edit_tensors(p, lambda t: [t.pop(k) for k in list(t) if "lora_B" in k]),
            "lora_B weight is missing",
        ),
        (
            lambda p: edit_tensors(
                p,
                lambda t: t.update(
                    {"base_model.model.model.layers.0.mlp.nope.lora_A.weight": torch.zeros(4, 64)}
                ),
            ),
            "not a supported layer",
        ),
        (
            lambda p: edit_tensors(p, lambda t: t.update({"extra.weight": torch.zeros(2)})),
            "unexpected tensor",
        ),
    ],
)
def test_invalid_adapters_are_rejected_with_the_reason(adapter_copy, break_it, message):
    path, spec = adapter_copy
    break_it(path)
    with pytest.raises(InvalidAdapter, match=message):
        load_adapter(path, spec)


@pytest.mark.parametrize("bad", ["", "../x", "/etc/passwd", "a/b", "UPPER", "a\0b", "x" * 64, "."])
def test_adapter_ids_are_identifiers_not_paths(bad):
    with pytest.raises(InvalidAdapterId):
        check_adapter_id(bad)


def test_register_is_idempotent_and_versions_new_content(adapter_copy, tmp_path):
    path, spec = adapter_copy
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), spec, [tmp_path])
    v1, created = registry.register("tenant-a.support", str(path))
    assert created and v1.version == 1 and v1.digest.startswith("sha256:")
    again, created = registry.register("tenant-a.support", str(path))
    assert not created and again == v1
    edit_tensors(path, lambda t: t.update({k: v * 2 for k, v in t.items()}))
    v2, created = registry.register("tenant-a.support", str(path))
    assert created and v2.version == 2 and v2.digest != v1.digest
    assert registry.resolve("tenant-a.support") == v2
    # Each version's blob is what was registered, independent of the source directory.
    assert registry.load_weights(v1).modules.keys() == registry.load_weights(v2).modules.keys()
    a1 = next(iter(registry.load_weights(v1).modules.values()))[0]
    a2 = next(iter(registry.load_weights(v2).modules.values()))[0]
    torch.testing.assert_close(a2, a1 * 2)


def test_registry_persists_across_restarts_and_delete(adapter_copy, tmp_path):
    path, spec = adapter_copy
    store_dir = tmp_path / "store"
    registry = AdapterRegistry(AdapterStore(store_dir), spec, [tmp_path])
    v1, _ = registry.register("one", str(path))
    registry.register("two", str(path))  # same content, another id: one shared blob
    reopened = AdapterStore(store_dir)
    assert [v.adapter_id for v in reopened.latest_versions()] == ["one", "two"]
    assert reopened.latest("one") == v1
    assert reopened.delete("one") == [1]
    assert reopened.blob_dir(v1.digest).exists()  # still used by "two"
    reopened.delete("two")
    assert not reopened.blob_dir(v1.digest).exists()
    with pytest.raises(AdapterNotFound):
        AdapterStore(store_dir).latest("one")


def test_failed_registration_leaves_nothing(adapter_copy, tmp_path):
    path, spec = adapter_copy
    store = AdapterStore(tmp_path / "store")
    registry = AdapterRegistry(store, spec, [tmp_path])
    edit_config(path, r=32)
    with pytest.raises(InvalidAdapter):
        registry.register("bad", str(path))
    assert store.latest_versions() == []
    assert list((tmp_path / "store" / "blobs").iterdir()) == []


def test_sources_outside_the_allowed_roots_are_denied(adapter_copy, tmp_path):
    path, spec = adapter_copy
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), spec, [tmp_path / "allowed"])
    (tmp_path / "allowed").mkdir()
    with pytest.raises(AdapterSourceDenied):
        registry.register("x", str(path))
    link = tmp_path / "allowed" / "sneaky"
    link.symlink_to(path)  # a symlink inside the root that leads out of it
    with pytest.raises(AdapterSourceDenied):
        registry.register("x", str(link))
    with pytest.raises(InvalidAdapter):
        registry.register("x", str(tmp_path / "allowed" / "missing"))
