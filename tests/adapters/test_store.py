"""The adapter store on a local disk and on S3 (moto's server on loopback): versions,
persistence across restarts, deletes, atomic commits and what a crash leaves."""

from __future__ import annotations

import pytest

import loraplex.adapters.registry as registry_module
from loraplex.adapters.store import AdapterStore, digest_files
from loraplex.core.errors import AdapterNotFound

META = {
    "rank": 4,
    "lora_alpha": 8.0,
    "target_modules": ("q_proj",),
    "base_model_fingerprint": "base",
    "source": "test",
}


@pytest.fixture(params=["local", "s3"])
def store_url(request, tmp_path):
    """(url, storage options) of an empty store on each backend."""
    if request.param == "local":
        return str(tmp_path / "store"), {}
    url, options = request.getfixturevalue("s3_bucket")
    return f"{url}/adapters", options


def staged(tmp_path, content: bytes):
    """A staging directory holding adapter files with `content`."""
    d = tmp_path / f"staged-{content.hex()[:16]}"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (d / "adapter_model.safetensors").write_bytes(content)
    return d


def test_versions_idempotence_and_restart(store_url, tmp_path):
    url, options = store_url
    store = AdapterStore(url, options)
    v1, created = store.commit("support", staged(tmp_path, b"one"), tenant="acme", **META)
    assert created and v1.version == 1 and v1.tenant == "acme"
    same, created = store.commit("support", staged(tmp_path, b"one"), tenant="acme", **META)
    assert not created and same == v1
    shared, created = store.commit(
        "support", staged(tmp_path, b"one"), tenant="acme", shared=True, **META
    )
    assert created and shared.version == 2 and shared.shared and shared.digest == v1.digest
    v2, created = store.commit("support", staged(tmp_path, b"two"), **META)
    assert created and v2.version == 3 and v2.digest != v1.digest and v2.tenant == ""
    store.commit("billing", staged(tmp_path, b"one"), **META)  # shares v1's blob
    reopened = AdapterStore(url, options)  # a restart sees the same registry
    assert [v.version for v in reopened.versions("support")] == [1, 2, 3]
    assert reopened.latest("support") == v2
    assert [v.adapter_id for v in reopened.latest_versions()] == ["billing", "support"]
    with reopened.open_blob(v1.digest) as blob:
        assert (blob / "adapter_model.safetensors").read_bytes() == b"one"
        assert digest_files(blob) == v1.digest


def test_delete_hides_every_version_and_never_reuses_them(store_url, tmp_path):
    url, options = store_url
    store = AdapterStore(url, options)
    v1, _ = store.commit("a", staged(tmp_path, b"one"), **META)
    v2, _ = store.commit("a", staged(tmp_path, b"two"), **META)
    store.commit("b", staged(tmp_path, b"one"), **META)
    assert [v.version for v in store.delete("a")] == [1, 2]
    with pytest.raises(AdapterNotFound):
        store.latest("a")
    # v1's blob is still used by "b"; v2's goes unless a load still needs it.
    assert store.remove_blobs({v1.digest, v2.digest}, keep={v2.digest}) == []
    assert store.remove_blobs({v1.digest, v2.digest}) == [v2.digest]
    with pytest.raises(FileNotFoundError), store.open_blob(v2.digest):
        pass
    reopened = AdapterStore(url, options)
    with pytest.raises(AdapterNotFound):
        reopened.latest("a")
    v3, created = reopened.commit("a", staged(tmp_path, b"one"), **META)
    assert created and v3.version == 3  # versions are never reused
    assert [v.version for v in AdapterStore(url, options).versions("a")] == [3]


def test_a_replica_sees_registrations_after_refresh(store_url, tmp_path):
    url, options = store_url
    mine, theirs = AdapterStore(url, options), AdapterStore(url, options)
    theirs.commit("x", staged(tmp_path, b"one"), **META)
    with pytest.raises(AdapterNotFound):
        mine.latest("x")
    mine.refresh()
    assert mine.latest("x").version == 1
    theirs.delete("x")
    mine.refresh()
    with pytest.raises(AdapterNotFound):
        mine.latest("x")


def test_a_stale_writer_takes_the_next_version(store_url, tmp_path):
    """A store that has not seen another writer's version commits the next one, not a clash;
    the same content as that version is a no-op."""
    url, options = store_url
    mine, theirs = AdapterStore(url, options), AdapterStore(url, options)
    theirs.commit("x", staged(tmp_path, b"one"), **META)
    v2, created = mine.commit("x", staged(tmp_path, b"two"), **META)  # mine never refreshed
    assert created and v2.version == 2
    theirs.commit("x", staged(tmp_path, b"three"), **META)
    again, created = AdapterStore(url, options).commit("x", staged(tmp_path, b"three"), **META)
    assert not created and again.version == 3
    assert [v.version for v in AdapterStore(url, options).versions("x")] == [1, 2, 3]


@pytest.mark.parametrize("crash_at", ["blob", "manifest"])
def test_a_crash_before_the_manifest_leaves_nothing_visible(
    store_url, tmp_path, monkeypatch, crash_at
):
    url, options = store_url
    store = AdapterStore(url, options)
    store.commit("keep", staged(tmp_path, b"kept"), **META)

    def crash(*args, **kwargs):
        raise OSError("power cut")

    if crash_at == "blob":  # after the first file of the blob
        calls = []
        real = store.fs.put_file if not store.local else None

        def put_one_then_crash(src, dst, *args, **kwargs):
            calls.append(dst)
            if len(calls) > 1:
                raise OSError("power cut")
            return real(src, dst, *args, **kwargs)

        if store.local:
            monkeypatch.setattr("loraplex.adapters.store.os.replace", crash)
        else:
            monkeypatch.setattr(store.fs, "put_file", put_one_then_crash)
    else:
        real_write = store._write
        monkeypatch.setattr(
            store,
            "_write",
            lambda path, data, exclusive=False: (
                crash() if "manifests" in path else real_write(path, data, exclusive)
            ),
        )
    with pytest.raises(OSError, match="power cut"):
        store.commit("lost", staged(tmp_path, b"lost"), **META)
    monkeypatch.undo()
    reopened = AdapterStore(url, options)
    assert [v.adapter_id for v in reopened.latest_versions()] == ["keep"]
    with pytest.raises(AdapterNotFound):
        reopened.latest("lost")
    # What the crash left is collected, and registering again works.
    reopened.collect_orphans(min_age_s=0)
    assert reopened.fs.ls(reopened._path("blobs"), detail=False) == [
        reopened.blob_path(reopened.latest("keep").digest)
    ]
    version, created = reopened.commit("lost", staged(tmp_path, b"lost"), **META)
    assert created and version.version == 1


def test_a_corrupt_blob_is_detected(tmp_path):
    store = AdapterStore(tmp_path / "store")
    v1, _ = store.commit("a", staged(tmp_path, b"one"), **META)
    weights = tmp_path / "store" / "blobs" / v1.digest.removeprefix("sha256:")
    (weights / "adapter_model.safetensors").write_bytes(b"evil")
    with pytest.raises(RuntimeError, match="corrupt"), store.open_blob(v1.digest):
        pass


def test_a_registry_json_store_is_migrated(tmp_path):
    """Stores written by loraplex 0.1 (one registry.json) open with the same adapters."""
    import json
    from dataclasses import asdict

    store = AdapterStore(tmp_path / "store")
    v1, _ = store.commit("a", staged(tmp_path, b"one"), **META)
    manifests = tmp_path / "store" / "manifests"
    record = {**asdict(v1), "target_modules": list(v1.target_modules)}
    del record["tenant"]
    (tmp_path / "store" / "registry.json").write_text(
        json.dumps({"adapters": {"a": [record]}, "last_version": {"a": 1, "gone": 4}})
    )
    import shutil

    shutil.rmtree(manifests)
    migrated = AdapterStore(tmp_path / "store")
    assert migrated.latest("a") == v1
    version, _ = migrated.commit("gone", staged(tmp_path, b"two"), **META)
    assert version.version == 5


def test_refreshes_never_block_lookups(tmp_path, monkeypatch):
    """Requests for unknown ids re-read the store; lookups meanwhile do not wait on it."""
    import threading
    import time

    store = AdapterStore(tmp_path / "store")
    store.commit("a", staged(tmp_path, b"one"), **META)
    scans = []
    gate = threading.Event()
    real_scan = store._scan

    def slow_scan():
        scans.append(1)
        gate.wait(5)
        return real_scan()

    monkeypatch.setattr(store, "_scan", slow_scan)
    reader = threading.Thread(target=store.refresh)
    reader.start()
    deadline = time.monotonic() + 5
    while not scans and time.monotonic() < deadline:
        time.sleep(0.01)
    assert store.latest("a").version == 1  # not blocked by the read in progress
    gate.set()
    reader.join(5)
    assert len(scans) == 1


def test_an_unknown_id_rereads_the_store_once_per_interval(adapter_free_registry, monkeypatch):
    registry, store = adapter_free_registry
    monkeypatch.setattr(registry_module, "MISS_REFRESH_S", 3600.0)  # however slow the reads
    reads = []
    real = store.refresh
    store.refresh = lambda: (reads.append(1), real())[1]
    for _ in range(20):
        with pytest.raises(AdapterNotFound):
            registry.resolve("no-such-adapter")
    assert len(reads) == 1
    with pytest.raises(AdapterNotFound):
        registry.resolve("another")
    assert len(reads) == 2


@pytest.fixture
def adapter_free_registry(tmp_path):
    from loraplex.adapters.registry import AdapterRegistry
    from loraplex.core.types import BaseModelSpec

    store = AdapterStore(tmp_path / "store")
    return AdapterRegistry(store, BaseModelSpec({}, 8, "base"), []), store


def test_orphan_collection_spares_blobs_a_load_still_needs(tmp_path):
    store = AdapterStore(tmp_path / "store")
    v1, _ = store.commit("a", staged(tmp_path, b"one"), **META)
    store.delete("a")  # its blob stays: say a request is still loading it
    assert store.collect_orphans(min_age_s=0, keep={v1.digest}) == []
    with store.open_blob(v1.digest):
        pass
    assert store.collect_orphans(min_age_s=0) == [v1.digest]
