"""Where registrations come from (adapters/sources.py): only configured roots and object-store
prefixes, checked after normalisation, with errors that name no other directory; and every
copy (a local directory, an object store, an upload) bounded while it runs, whatever a stat or
a listing said, through files that are checked again once opened."""

from __future__ import annotations

import io
import os
import shutil

import pytest

from loraplex.adapters import registry as registry_module
from loraplex.adapters import sources
from loraplex.adapters.entries import MAX_ENTRIES
from loraplex.adapters.registry import AdapterRegistry
from loraplex.adapters.sources import (
    MAX_IGNORED_UPLOAD_BYTES,
    Upload,
    check_uri,
    normalise_uri,
    source_prefix,
)
from loraplex.adapters.store import AdapterStore
from loraplex.adapters.validate import CONFIG_FILE, WEIGHTS_FILE
from loraplex.core.errors import AdapterSourceDenied, InvalidAdapter
from loraplex.core.types import BaseModelSpec
from tests.adapters.test_validate import SHAPES, SIDE_FILES, SPEC, write_adapter


@pytest.fixture
def no_fsspec(monkeypatch):
    """Fail the test if a source reaches any fsspec file system."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"a file system was opened for {args}")

    monkeypatch.setattr(sources, "open_filesystem", refuse)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "root").mkdir()
    return tmp_path / "root"


def local_registry(tmp_path, root, spec=SPEC, extra_roots=()):
    return AdapterRegistry(AdapterStore(tmp_path / "store"), spec, [root, *extra_roots])


# -- item 4: only configured schemes and prefixes ----------------------------------------------
@pytest.mark.parametrize(
    "uri",
    [
        "file:///etc",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "https://metadata.google.internal/computeMetadata/v1/",
        "memory://adapter",
        "ftp://example.com/adapter",
        "s3://bucket/adapter",  # object storage, but no prefix was configured
        "S3://bucket/adapter",
        "simplecache::s3://bucket/adapter",
        "zip://adapter_config.json::file:///tmp/a.zip",
    ],
)
def test_with_only_local_roots_no_uri_is_a_source(tmp_path, root, no_fsspec, uri):
    registry = local_registry(tmp_path, root)
    with pytest.raises((AdapterSourceDenied, InvalidAdapter)) as err:
        registry.register("x", uri)
    message = str(err.value)
    assert "passwd" not in message.replace(uri, "") and "shadow" not in message
    assert str(root) not in message and str(tmp_path) not in message  # no roots listed
    assert registry.store.latest_versions() == []


def test_a_local_file_url_outside_the_roots_is_not_read(tmp_path, root, no_fsspec):
    outside = write_adapter(tmp_path / "outside")
    registry = local_registry(tmp_path, root)
    for uri in (f"file://{outside}", f"file://{root}/../outside", f"local://{outside}"):
        with pytest.raises(AdapterSourceDenied):
            registry.register("x", uri)
    with pytest.raises(AdapterSourceDenied):
        registry.register("x", f"{root}/../outside")  # a path, normalised before the check


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/trusted/../secret/adapter",
        "s3://bucket/trusted/./x/../../other/adapter",
        "s3://bucket//trusted/../adapter",
        "s3://bucket/trustedx/adapter",
        "s3://bucket/Trusted/adapter",
        "s3://other-bucket/trusted/adapter",
        "S3://bucket/trusted/../x",
    ],
)
def test_prefixes_are_checked_after_normalisation(uri):
    prefixes = [source_prefix("s3://bucket/trusted/")]
    with pytest.raises(AdapterSourceDenied):
        check_uri(uri, prefixes)


@pytest.mark.parametrize(
    ("uri", "normal"),
    [
        ("s3://bucket/trusted/a", "s3://bucket/trusted/a"),
        ("S3://bucket//trusted/./a/", "s3://bucket/trusted/a"),
        ("s3://bucket/trusted/x/../a", "s3://bucket/trusted/a"),
        ("s3://bucket/trusted", "s3://bucket/trusted"),
    ],
)
def test_uris_under_a_prefix_are_read_in_their_normal_form(uri, normal):
    assert check_uri(uri, [source_prefix("s3://bucket/trusted")]) == normal


@pytest.mark.parametrize(
    "uri",
    [
        "s3://bucket/trusted/a?versionId=1",
        "s3://bucket/trusted/a#frag",
        "s3://user@bucket/trusted/a",
        "s3://bucket:9000/trusted/a",
        "s3://bucket/trusted/a::file:///etc",
        "s3://bucket/trusted/a\nb",
        "s3://bucket/trusted/a\\..\\..\\b",
        "s3:///trusted/a",
        "s3://bucket/..",
        "s3://" + "b" * 300,
    ],
)
def test_uris_that_are_not_plain_object_store_uris_are_refused(uri):
    with pytest.raises(InvalidAdapter):
        normalise_uri(uri)


@pytest.mark.parametrize("root", ["http://169.254.169.254/", "file:///tmp", "memory://x", "s3://"])
def test_only_object_store_prefixes_may_be_configured(tmp_path, root):
    with pytest.raises(ValueError, match="adapter root"):
        AdapterRegistry(AdapterStore(tmp_path / "store"), SPEC, [root])


def test_a_denied_path_names_only_what_the_caller_gave(tmp_path, root):
    (tmp_path / "secret-dir").mkdir()
    registry = local_registry(tmp_path, root)
    with pytest.raises(AdapterSourceDenied) as err:
        registry.register("x", str(tmp_path / "secret-dir"))
    assert str(root) not in str(err.value)
    with pytest.raises(AdapterSourceDenied) as err:
        registry.register("x", "/" + "a/" * 5000)  # echoed cut short
    assert len(str(err.value)) < 300


# -- item 10: local copies are bounded and checked once opened ----------------------------------
def swapping(monkeypatch, swap):
    """Run `swap(directory)` right after the directory's check passed, as a racing writer."""
    real = sources.check_entries

    def check_then_swap(directory, *args, **kwargs):
        entries = real(directory, *args, **kwargs)
        swap(directory)
        return entries

    monkeypatch.setattr(sources, "check_entries", check_then_swap)


def never_validated(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("staging should have refused it before validation")

    monkeypatch.setattr(registry_module, "load_adapter", fail)


def test_a_link_swapped_in_after_the_check_is_not_followed(tmp_path, root, monkeypatch):
    source = write_adapter(root / "adapter")
    secret = write_adapter(tmp_path / "outside") / WEIGHTS_FILE  # a valid file, outside

    def swap(directory):
        (directory / WEIGHTS_FILE).unlink()
        (directory / WEIGHTS_FILE).symlink_to(secret)

    swapping(monkeypatch, swap)
    never_validated(monkeypatch)
    registry = local_registry(tmp_path, root)
    with pytest.raises(InvalidAdapter, match="links outside the allowed roots"):
        registry.register("x", str(source))
    assert registry.store.latest_versions() == []


def test_a_device_or_fifo_swapped_in_is_refused_unread(tmp_path, root, monkeypatch):
    source = write_adapter(root / "adapter")

    def to_device(directory):
        (directory / WEIGHTS_FILE).unlink()
        (directory / WEIGHTS_FILE).symlink_to("/dev/zero")

    swapping(monkeypatch, to_device)
    never_validated(monkeypatch)
    registry = local_registry(tmp_path, root)
    with pytest.raises(InvalidAdapter, match="not a regular file"):
        registry.register("x", str(source))

    def to_fifo(directory):
        (directory / CONFIG_FILE).unlink()
        os.mkfifo(directory / CONFIG_FILE)  # opening it would block without O_NONBLOCK

    shutil.rmtree(source)
    write_adapter(source)
    swapping(monkeypatch, to_fifo)
    with pytest.raises(InvalidAdapter, match="not a regular file"):
        registry.register("x", str(source))


def test_local_weights_over_the_limit_are_refused_before_they_are_copied(
    tmp_path, root, monkeypatch
):
    source = write_adapter(root / "adapter")
    size = (source / WEIGHTS_FILE).stat().st_size
    small = BaseModelSpec(SHAPES, max_rank=8, fingerprint="test", max_bytes=size - 1)
    never_validated(monkeypatch)
    registry = local_registry(tmp_path, root, small)
    with pytest.raises(InvalidAdapter, match=f"{size} bytes, larger than the limit of {size - 1}"):
        registry.register("x", str(source))


def test_weights_that_grow_after_the_check_are_refused_at_the_limit(tmp_path, root, monkeypatch):
    source = write_adapter(root / "adapter")
    size = (source / WEIGHTS_FILE).stat().st_size
    spec = BaseModelSpec(SHAPES, max_rank=8, fingerprint="test", max_bytes=size)
    grown = root / "big.safetensors"
    with open(grown, "wb") as f:
        f.truncate(64 << 20)  # sparse: 64 MiB of zeros

    def grow(directory):
        (directory / WEIGHTS_FILE).unlink()
        (directory / WEIGHTS_FILE).symlink_to(grown)  # inside the roots, but too big

    swapping(monkeypatch, grow)
    never_validated(monkeypatch)
    registry = local_registry(tmp_path, root, spec)
    with pytest.raises(InvalidAdapter, match="larger than the limit"):
        registry.register("x", str(source))


def test_copy_stops_one_byte_past_the_limit(tmp_path):
    endless = io.BytesIO(bytes(10 << 20))
    with pytest.raises(InvalidAdapter, match="w is larger than the limit of 1000 bytes"):
        sources._copy_limited(endless, tmp_path / "w", "w", 1000)
    assert endless.tell() == 1001
    assert (tmp_path / "w").stat().st_size <= 1000


# -- item 10: object stores are not trusted to be the size they list ----------------------------
class LyingStore:
    """An object store whose listing says every object is 1 byte, while the weights object
    holds 64 MiB; counts the bytes read from it."""

    def __init__(self, adapter_dir):
        self.objects = {p.name: p.read_bytes() for p in adapter_dir.iterdir()}
        self.objects[WEIGHTS_FILE] += bytes(64 << 20)
        self.read = 0

    def ls(self, path, detail=True):
        return [{"name": f"{path}/{n}", "type": "file", "size": 1} for n in self.objects]

    def open(self, path, mode="rb"):
        store = self

        class Counting(io.BytesIO):
            def read(self, n=-1):
                data = super().read(n)
                store.read += len(data)
                return data

        return Counting(self.objects[path.rsplit("/", 1)[-1]])

    def get_file(self, path, local):  # what a whole-object download does
        with self.open(path) as f, open(local, "wb") as out:
            out.write(f.read())


def test_an_object_larger_than_listed_is_refused_at_the_limit(tmp_path, monkeypatch):
    lying = LyingStore(write_adapter(tmp_path / "adapter"))
    monkeypatch.setattr(sources, "open_filesystem", lambda url, options: (lying, "bucket/a"))
    spec = BaseModelSpec(SHAPES, max_rank=8, fingerprint="test", max_bytes=1 << 20)
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), spec, ["s3://bucket"])
    with pytest.raises(InvalidAdapter, match="larger than the limit of 1048576 bytes"):
        registry.register("x", "s3://bucket/a")
    assert lying.read <= (1 << 20) + sources.COPY_CHUNK + (1 << 20)  # never the 64 MiB
    assert list(registry.store.staging_dir.iterdir()) == []


class TrainerBucket(LyingStore):
    """A trainer's output in an object store, listed truthfully: the adapter, its side files
    and a checkpoint "directory"; records the objects opened."""

    def __init__(self, adapter_dir):
        self.objects = {p.name: p.read_bytes() for p in adapter_dir.iterdir()} | SIDE_FILES
        self.opened = []

    def ls(self, path, detail=True):
        files = [
            {"name": f"{path}/{n}", "type": "file", "size": len(d)} for n, d in self.objects.items()
        ]
        return [*files, {"name": f"{path}/checkpoint-10/", "type": "directory", "size": 0}]

    def open(self, path, mode="rb"):
        self.opened.append(path.rsplit("/", 1)[-1])
        return io.BytesIO(self.objects[path.rsplit("/", 1)[-1]])


def test_an_object_stores_side_files_are_never_downloaded(tmp_path, monkeypatch):
    bucket = TrainerBucket(write_adapter(tmp_path / "adapter"))
    monkeypatch.setattr(sources, "open_filesystem", lambda url, options: (bucket, "bucket/a"))
    registry = AdapterRegistry(AdapterStore(tmp_path / "store"), SPEC, ["s3://bucket"])
    registered = registry.register("x", "s3://bucket/a")
    assert registered.created
    assert registered.ignored_files == tuple(sorted([*SIDE_FILES, "checkpoint-10/"]))
    assert sorted(bucket.opened) == [CONFIG_FILE, WEIGHTS_FILE]
    bucket.objects["adapter_model.bin"] = b"\x80\x04"  # pickled weights: refused unread
    with pytest.raises(InvalidAdapter, match="pickle"):
        registry.register("y", "s3://bucket/a")
    assert "adapter_model.bin" not in bucket.opened


# -- item 10: uploads hold one file open and take only an adapter's files ----------------------
def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_an_upload_holds_at_most_one_file_open(tmp_path):
    adapter = write_adapter(tmp_path / "adapter")
    (adapter / "chat_template.jinja").write_text("{{ messages }}")
    (adapter / "README.md").write_text("# card\n")
    (adapter / "training_manifest.json").write_text("{}")
    files = {p.name: p.read_bytes() for p in adapter.iterdir()}
    staging = tmp_path / "staging"
    staging.mkdir()
    upload = Upload(staging, SPEC.max_bytes)
    before = open_descriptors()
    for i in range(0, max(map(len, files.values())), 64):  # the files' pieces interleaved
        for name, data in files.items():
            if i < len(data):
                upload.write(name, data[i : i + 64])
                assert open_descriptors() <= before + 1
    upload.finish()
    assert open_descriptors() == before
    ignored = ("README.md", "training_manifest.json")  # dropped as they came
    assert {p.name: p.read_bytes() for p in staging.iterdir()} == {
        n: d for n, d in files.items() if n not in ignored
    }
    assert upload.ignored == ignored


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc")
def test_an_upload_writes_only_the_files_registration_reads(tmp_path):
    upload = Upload(tmp_path, SPEC.max_bytes)
    before = open_descriptors()
    upload.write(CONFIG_FILE, b"{}")
    for name, data in SIDE_FILES.items():  # an older client sends them whole
        upload.write(name, data)
    upload.write("checkpoint-10/", b"")  # a subdirectory, by name
    with pytest.raises(InvalidAdapter, match=r"adapter_model\.bin is a pickle file"):
        upload.write("adapter_model.bin", b"\x80\x04")
    for bad in ("a/b", "../up/", "a/b/", "/"):
        with pytest.raises(InvalidAdapter, match="plain file name"):
            upload.write(bad, b"")
    upload.close()
    assert open_descriptors() == before
    assert [p.name for p in tmp_path.iterdir()] == [CONFIG_FILE]
    assert upload.ignored == tuple(sorted([*SIDE_FILES, "checkpoint-10/"]))


def test_an_upload_takes_a_bounded_number_of_names_and_ignored_bytes(tmp_path):
    upload = Upload(tmp_path, SPEC.max_bytes)
    for i in range(MAX_ENTRIES):
        upload.write(f"f-{i}", b"")
    with pytest.raises(InvalidAdapter, match=f"names more than {MAX_ENTRIES} files"):
        upload.write("one-more", b"")
    upload = Upload(tmp_path, SPEC.max_bytes)
    upload.write("optimizer.pt", bytes(MAX_IGNORED_UPLOAD_BYTES))
    with pytest.raises(InvalidAdapter, match="leave them out"):
        upload.write("tokenizer.json", b"x")
    assert list(tmp_path.iterdir()) == []


def test_each_uploaded_file_is_held_to_its_own_limit(tmp_path):
    upload = Upload(tmp_path, 1 << 30)
    upload.write(CONFIG_FILE, b"x" * (1 << 20))
    with pytest.raises(InvalidAdapter, match=r"adapter_config\.json is larger than the limit"):
        upload.write(CONFIG_FILE, b"x")
    with pytest.raises(InvalidAdapter, match=r"chat_template\.jinja is larger than the limit"):
        upload.write("chat_template.jinja", b"x" * ((64 << 10) + 1))
    with pytest.raises(InvalidAdapter, match=r"tokenizer_config\.json is larger than the limit"):
        upload.write("tokenizer_config.json", b"x" * ((4 << 20) + 1))
    upload.close()
