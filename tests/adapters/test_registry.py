"""Adapter validation against the base, the persistent store and registration."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file

from loraplex.adapters.registry import AdapterRegistry, check_adapter_id
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.validate import load_adapter
from loraplex.core.errors import (
    AdapterNotFound,
    AdapterSourceDenied,
    InvalidAdapter,
    InvalidAdapterId,
)
from loraplex.core.model import lora_target_shapes
from loraplex.core.types import BaseModelSpec
from tests.adapters.test_validate import IGNORED, SIDE_FILES, write_side_files
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


@pytest.mark.parametrize(
    "bad", ["", "../x", "/etc/passwd", "a/b", "UPPER", "a\0b", "x" * 64, ".", "ok\n", "ok\r\nx"]
)
def test_adapter_ids_are_identifiers_not_paths(bad):
    with pytest.raises(InvalidAdapterId):
        check_adapter_id(bad)


def test_composed_ids_are_checked_as_strictly_and_are_not_registrable(adapter_copy, tmp_path):
    from loraplex.adapters.registry import INVALID_ID, loggable_id

    derived = "composed-" + "0123456789abcdef" + "01234567"
    assert check_adapter_id(derived, composed=True) == derived
    for bad in ("composed-x", "composed-" + "a" * 25, derived + "\n", "composed-" + "z" * 10**5):
        with pytest.raises(InvalidAdapterId) as err:
            check_adapter_id(bad, composed=True)
        assert len(str(err.value)) < 300
        assert loggable_id(bad) == INVALID_ID
    with pytest.raises(InvalidAdapterId):
        check_adapter_id(derived)  # not an id a registration may take
    path, spec = adapter_copy
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), spec, [tmp_path])
    for reserved in ("composed-mine", derived):
        with pytest.raises(InvalidAdapterId, match="composed"):
            registry.register(reserved, str(path))
    assert loggable_id(derived) == derived and loggable_id("tone") == "tone"


def test_register_is_idempotent_and_versions_new_content(adapter_copy, tmp_path):
    path, spec = adapter_copy
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), spec, [tmp_path])
    v1, created, _ = registry.register("tenant-a.support", str(path))
    assert created and v1.version == 1 and v1.digest.startswith("sha256:")
    again, created, _ = registry.register("tenant-a.support", str(path))
    assert not created and again == v1
    edit_tensors(path, lambda t: t.update({k: v * 2 for k, v in t.items()}))
    v2, created, _ = registry.register("tenant-a.support", str(path))
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
    v1, _, _ = registry.register("one", str(path))
    registry.register("two", str(path))  # same content, another id: one shared blob
    reopened = AdapterRegistry(AdapterStore(store_dir), spec, [tmp_path])
    assert [v.adapter_id for v in reopened.store.latest_versions()] == ["one", "two"]
    assert reopened.resolve("one") == v1
    assert [v.version for v in reopened.delete("one")] == [1]
    assert reopened.store.remove_blobs({v1.digest}) == []  # still used by "two"
    reopened.delete("two")
    assert reopened.store.remove_blobs({v1.digest}) == [v1.digest]
    with pytest.raises(AdapterNotFound):
        reopened.load_weights(v1)
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
    assert list(store.staging_dir.iterdir()) == []


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


def test_register_from_s3_into_an_s3_store(adapter_copy, s3_bucket, tmp_path):
    """Replicas share an S3 store; adapters may also come from S3."""
    import fsspec

    path, spec = adapter_copy
    url, options = s3_bucket
    fs = fsspec.filesystem("s3", skip_instance_cache=True, **options)
    for f in path.iterdir():
        fs.put_file(str(f), f"{url}/incoming/support/{f.name}")
    roots = [tmp_path, f"{url}/incoming"]  # S3 sources only under a configured prefix
    registry = AdapterRegistry(AdapterStore(f"{url}/store", options), spec, roots, options)
    version, created, _ = registry.register("support", f"{url}/incoming/support/")
    assert created and version.source == f"{url}/incoming/support"  # normalised, as read
    replica = AdapterRegistry(AdapterStore(f"{url}/store", options), spec, [], options)
    assert replica.resolve("support") == version
    local = load_adapter(path, spec)
    loaded = replica.load_weights(version)
    for module, (a, b) in local.modules.items():
        torch.testing.assert_close(loaded.modules[module][0], a)
        torch.testing.assert_close(loaded.modules[module][1], b)
    with pytest.raises(InvalidAdapter, match="no adapter"):
        registry.register("missing", f"{url}/incoming/nowhere")
    with pytest.raises(AdapterSourceDenied):
        registry.register("missing", f"{url}/nowhere")
    with pytest.raises(AdapterSourceDenied):
        registry.register("support", f"{url}/incoming/../store/blobs")
    fs.pipe(f"{url}/incoming/support/adapter_model.bin", b"\x80\x04")
    with pytest.raises(InvalidAdapter, match="pickle"):
        registry.register("pickled", f"{url}/incoming/support")
    limited = AdapterRegistry(registry.store, spec, [f"{url}/trusted"], options)
    with pytest.raises(AdapterSourceDenied):
        limited.register("support", f"{url}/incoming/support")


def test_upload_is_staged_within_limits(adapter_copy, tmp_path):
    path, spec = adapter_copy
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), spec, [])
    upload = registry.new_upload()
    for f in sorted(path.iterdir()):  # README.md too: PEFT writes it, the server ignores it
        data = f.read_bytes()
        for i in range(0, len(data), 1000):
            upload.write(f.name, data[i : i + 1000])
    version, created, _ = registry.register_upload("pushed", upload)
    assert created and version.source == "upload"
    assert not upload.staging.exists()

    for bad in ["../evil", "a/b", "", "x\0y", ".."]:
        with pytest.raises(InvalidAdapter, match="plain file name"):
            registry.new_upload().write(bad, b"x")
    small = AdapterRegistry(registry.store, BaseModelSpec(spec.linear_shapes, 8, "t", 10), [])
    upload = small.new_upload()
    with pytest.raises(InvalidAdapter, match="larger than the limit"):
        upload.write("adapter_model.safetensors", b"x" * (4 << 20))
    small.discard_upload(upload)
    upload = registry.new_upload()
    upload.write("adapter_config.json", (path / CONFIG).read_bytes())
    upload.write("adapter_model.safetensors", (path / WEIGHTS).read_bytes())
    with pytest.raises(InvalidAdapter, match="pickle"):  # refused by its name, unread
        upload.write("adapter_model.bin", b"")
    registry.discard_upload(upload)
    with pytest.raises(AdapterNotFound):
        registry.resolve("extra")


def upload_pieces(directory):
    """(name, data) pieces of `directory` as a client that sends every regular file whole would
    send them; other entries by name (a subdirectory's ending in "/")."""
    pieces = []
    for entry in sorted(directory.iterdir()):
        if entry.is_symlink() or not (entry.is_file() or entry.is_dir()):
            pieces.append((entry.name, b""))
        elif entry.is_dir():
            pieces.append((entry.name + "/", b""))
        else:
            pieces.append((entry.name, entry.read_bytes()))
    return pieces


@pytest.mark.parametrize("how", ["path", "upload"])
def test_a_trainers_output_registers_as_the_adapter_alone(
    adapter_copy, tmp_path, opened, caplog, how
):
    """What `trainer.save_model()` leaves around a PEFT adapter (tokenizer files, training
    arguments, optimizer state, a checkpoint...) registers: the side files are named in the
    registration and the log, never opened, and none of them reaches the store."""
    path, spec = adapter_copy
    write_side_files(path)
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), spec, [tmp_path])
    pieces = upload_pieces(path) if how == "upload" else []
    opened.clear()
    with caplog.at_level(logging.INFO, logger="loraplex.adapters.registry"):
        if how == "path":
            registered = registry.register("trained", str(path))
        else:
            upload = registry.new_upload()
            for name, data in pieces:
                upload.write(name, data)
            registered = registry.register_upload("trained", upload)
    assert registered.created and registered.ignored_files == tuple(IGNORED)
    side = set(SIDE_FILES) | {"optimizer.pt", "run.sh", "events.fifo", "secret"}
    assert opened and not [p for p in opened if Path(p).name in side]
    assert not [
        p for p in opened if p.startswith(f"{path}/") and Path(p).name not in (CONFIG, WEIGHTS)
    ]
    stored = {f.name for f in (tmp_path / "store").rglob("*") if f.is_file()}
    assert stored == {CONFIG, WEIGHTS, "v00000001.json"}
    (line,) = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert "trained version 1 registered" in line and "training_args.bin" in line
    assert len(registry.load_weights(registered.version).modules) == 4


CHAT_TEMPLATE = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"


def test_an_adapters_chat_template_is_kept_with_its_version(adapter_copy, tmp_path):
    path, spec = adapter_copy
    store_dir = tmp_path / "store"
    registry = AdapterRegistry(AdapterStore(store_dir), spec, [tmp_path])
    plain, _, _ = registry.register("plain", str(path))
    assert plain.chat_template == ""
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (path / "tokenizer_config.json").write_text('{"chat_template": "{{ older }}"}')
    v1, created, ignored = registry.register("chatty", str(path))
    assert created and v1.chat_template == CHAT_TEMPLATE
    assert "tokenizer_config.json" in ignored and "chat_template.jinja" not in ignored
    assert registry.register("chatty", str(path))[:2] == (v1, False)  # the same: a no-op
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE + "{{ '>' }}")
    v2, created, _ = registry.register("chatty", str(path))  # a new template: a new version
    assert created and v2.version == 2 and v2.digest == v1.digest
    reopened = AdapterStore(store_dir)  # kept in the manifests, not in the blobs
    assert reopened.versions("chatty") == [v1, v2] and reopened.latest("plain") == plain
    with reopened.open_blob(v1.digest) as blob:
        assert sorted(p.name for p in blob.iterdir()) == [CONFIG, WEIGHTS]
    # A version without a template writes no chat_template: servers of an earlier version,
    # which do not know the field, still read it.
    manifest = json.loads((store_dir / "manifests" / "plain" / "v00000001.json").read_text())
    assert "chat_template" not in manifest


def test_a_manifest_field_this_version_does_not_know_is_skipped(adapter_copy, tmp_path):
    path, spec = adapter_copy
    store_dir = tmp_path / "store"
    version, _, _ = AdapterRegistry(AdapterStore(store_dir), spec, [tmp_path]).register(
        "later", str(path)
    )
    manifest = store_dir / "manifests" / "later" / "v00000001.json"
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "added_later": 1}))
    assert AdapterStore(store_dir).latest("later") == version


def test_a_bad_chat_template_is_refused_at_registration(adapter_copy, tmp_path):
    path, spec = adapter_copy
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), spec, [tmp_path])
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}")
    with pytest.raises(InvalidAdapter, match=r"chat_template\.jinja is not a valid Jinja"):
        registry.register("broken", str(path))
    with pytest.raises(AdapterNotFound):
        registry.resolve("broken")
    assert list((tmp_path / "store" / "blobs").iterdir()) == []
