"""The adapter lifecycle on a running server: uploads, validation over the API, the tiered
cache (single flight, more adapters than slots, pins), hot swap and delete under load, and
replicas sharing an S3 store."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from safetensors.torch import load_file, save_file

from loraplex.core.config import ModelConfig
from loraplex.server.client import LoraplexClient
from loraplex.server.config import EngineConfig, ServerConfig
from loraplex.v1 import inference_pb2 as pb
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration

ASK = [pb.ChatMessage(role="user", content="Name three colours.")]


def ask(adapter_id: str, max_new_tokens: int = 8) -> pb.GenerateRequest:
    return pb.GenerateRequest(adapter_id=adapter_id, messages=ASK, max_new_tokens=max_new_tokens)


def scale_b(path, factor: float) -> None:
    """New content for an adapter directory: B scaled (a different, valid adapter)."""
    weights = path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * factor if "lora_B" in k else v for k, v in tensors.items()}, weights)


@pytest.fixture
def adapter_dir(peft_reference, tmp_path):
    """A private copy of the r8 adapter (not under the server's allowed roots: it is pushed)."""
    _, _, dirs = peft_reference
    path = tmp_path / "adapter"
    shutil.copytree(dirs["attn-r8"], path)
    return path


def stats(client: LoraplexClient) -> dict[str, object]:
    return {t.tier: t for t in client.cache_stats().tiers}


def test_push_streams_a_local_directory_to_the_server(server, client, adapter_dir):
    """`loraplex adapters push DIR --name N` works against a server that cannot see DIR."""
    env = {**os.environ, "LORAPLEX_SERVER": server.address}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraplex.server.cli",
            "adapters",
            "push",
            str(adapter_dir),
            "--name",
            "pushed",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert '"version": 1' in result.stdout and '"source": "upload"' in result.stdout
    out = client.generate(ask("pushed"))
    assert out.adapter_id == "pushed" and out.adapter_version == 1 and out.token_ids
    again = client.push("pushed", adapter_dir)  # same content: a no-op
    assert not again.created and again.adapter.version == 1
    client.delete("pushed")


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        (lambda p: (p / "adapter_model.bin").write_bytes(b"\x80\x04K."), "pickle"),
        (lambda p: scale_b(p, float("nan")), "NaN"),
    ],
    ids=["pickle", "nan"],
)
def test_bad_pushes_are_invalid_argument_and_leave_nothing(client, adapter_dir, mutate, needle):
    before = {a.adapter_id for a in client.list()}
    mutate(adapter_dir)
    with pytest.raises(grpc.RpcError) as err:
        client.push("refused", adapter_dir)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert needle in err.value.details()
    assert {a.adapter_id for a in client.list()} == before


def test_a_push_of_a_trainers_output_says_what_it_ignored(client, adapter_dir):
    """Files beside the adapter (a script, optimizer state, a checkpoint) are not sent, not
    stored, and named in the answer."""
    (adapter_dir / "setup.py").write_text("import os")
    (adapter_dir / "optimizer.pt").write_bytes(b"\x80\x05 not a pickle")
    (adapter_dir / "checkpoint-10").mkdir()
    reply = client.push("side-files", adapter_dir)
    assert reply.created and reply.adapter.version == 1
    ignored = ["checkpoint-10/", "optimizer.pt", "setup.py"]
    assert list(reply.ignored_files) == ignored
    assert client.generate(ask("side-files")).token_ids
    client.delete("side-files")


def test_local_sources_with_executables_or_links_out_are_refused(
    client, adapter_dir, adapter_root, tmp_path
):
    """Directories registered by path: file modes and links are checked where they lie."""
    source = adapter_root / f"local-{tmp_path.name}"
    shutil.copytree(adapter_dir, source)
    weights = source / "adapter_model.safetensors"
    weights.chmod(stat.S_IRUSR | stat.S_IWUSR | stat.S_IXUSR)
    with pytest.raises(grpc.RpcError) as err:
        client.register("refused", str(source))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "executable" in err.value.details()
    weights.unlink()
    weights.symlink_to(adapter_dir / "adapter_model.safetensors")  # outside the root
    with pytest.raises(grpc.RpcError) as err:
        client.register("refused", str(source))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "outside" in err.value.details()


@pytest.mark.parametrize("bad", ["../x", "/etc/passwd", "a\0b", "x" * 80, "UPPER"])
def test_adapter_names_that_are_paths_are_refused(client, adapter_dir, bad):
    with pytest.raises(grpc.RpcError) as err:
        client.push(bad, adapter_dir)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_concurrent_first_requests_load_an_adapter_once(server, client, adapter_dir):
    scale_b(adapter_dir, 1.5)
    client.push("single-flight", adapter_dir)
    host_loads = stats(client)["host"].loads
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(lambda _: client.generate(ask("single-flight", 4)), range(8)))
    assert {o.adapter_version for o in outs} == {1} and all(o.token_ids for o in outs)
    assert stats(client)["host"].loads == host_loads + 1
    client.delete("single-flight")


def test_more_adapters_than_slots_all_complete(server, client, adapter_dir):
    """The session server has 4 device slots; 7 adapters are wanted at once."""
    names = [f"crowd-{i}" for i in range(7)]
    for name in names:
        scale_b(adapter_dir, 1.1)
        client.push(name, adapter_dir)
    evictions = stats(client)["device"].evictions
    with ThreadPoolExecutor(14) as pool:
        outs = list(pool.map(lambda i: client.generate(ask(names[i % 7], 6)), range(14)))
    assert sorted(o.adapter_id for o in outs) == sorted(names * 2)
    assert all(o.finish_reason in ("stop", "length") for o in outs)
    device = stats(client)["device"]
    assert device.capacity == 4 and device.resident <= 4
    assert device.evictions >= evictions + 3  # 7 adapters through 4 slots
    for name in names:
        client.delete(name)


def test_pin_keeps_an_adapter_in_a_slot(server, client, adapter_dir):
    client.push("vip", adapter_dir, pin=True)
    assert client.get("vip").pinned and stats(client)["device"].resident >= 1
    assert list(client.cache_stats().pinned) == ["vip"]
    refcounts = {s.adapter: s.refcount for s in server.state().slots}
    assert refcounts.get(("vip", 1)) == 1
    scale_b(adapter_dir, 2.0)
    client.push("vip", adapter_dir)  # the new version takes over the pin
    state = server.state()
    assert {s.adapter: s.refcount for s in state.slots}.get(("vip", 2)) == 1
    assert ("vip", 1) not in [s.adapter for s in state.slots if s.pinned]
    assert not client.unpin("vip").pinned
    with pytest.raises(grpc.RpcError) as err:
        client.unpin("vip")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        client.pin("nobody")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    client.delete("vip")


class Load:
    """Streaming requests for one adapter sent back to back from a few threads, recording
    each stream's outcome: (version its chunks named, status, started_at)."""

    def __init__(self, address: str, adapter_id: str, threads: int = 4) -> None:
        self.address = address
        self.adapter_id = adapter_id
        self.results: list[tuple[int, str, float]] = []
        self.sent = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run) for _ in range(threads)]

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(120)

    def _run(self) -> None:
        with LoraplexClient(self.address, timeout=120) as client:
            while not self._stop.is_set():
                started = time.monotonic()
                with self._lock:
                    self.sent += 1
                try:
                    versions = {
                        c.adapter_version for c in client.generate_stream(ask(self.adapter_id, 12))
                    }
                    outcome = (versions.pop() if len(versions) == 1 else -1, "OK", started)
                except grpc.RpcError as exc:
                    outcome = (0, exc.code().name, started)
                with self._lock:
                    self.results.append(outcome)


def test_hot_swap_under_load_drops_nothing(server, client, adapter_dir, tmp_path):
    client.push("swap", adapter_dir)
    broken = tmp_path / "broken"
    shutil.copytree(adapter_dir, broken)
    scale_b(broken, float("inf"))
    try:
        with Load(server.address, "swap") as load:
            time.sleep(2)
            with pytest.raises(grpc.RpcError) as err:  # a failed registration disturbs nobody
                client.push("swap", broken)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            time.sleep(1)
            scale_b(adapter_dir, 2.0)
            assert client.push("swap", adapter_dir).adapter.version == 2
            swapped_at = time.monotonic()  # the push has returned: version 2 is live
            time.sleep(3)
        results = load.results
        assert len(results) == load.sent and all(status == "OK" for _, status, _ in results)
        assert {v for v, _, _ in results} == {1, 2}  # each stream names one version
        # Requests that started after the swap returned get the new version (those sent while
        # the push was being validated may still get the old one).
        assert all(v == 2 for v, _, started in results if started > swapped_at)
    finally:  # the shared server's adapter list stays as the other tests expect
        client.delete("swap")


def test_delete_under_load_finishes_in_flight_and_refuses_new(server, client, adapter_dir):
    client.push("doomed", adapter_dir)
    with Load(server.address, "doomed") as load:
        time.sleep(3)
        client.delete("doomed")
        deleted_at = time.monotonic()
        time.sleep(2)
    ok = [r for r in load.results if r[1] == "OK"]
    refused = [r for r in load.results if r[1] != "OK"]
    assert len(load.results) == load.sent and ok
    assert {status for _, status, _ in refused} <= {"NOT_FOUND"}
    assert all(started > deleted_at - 5 for _, _, started in refused)
    assert all(status == "NOT_FOUND" for _, status, s in load.results if s > deleted_at + 0.01)
    # Nothing of it is left behind once the last request finished.
    assert server.runtime.cache.in_use() == set()


def test_replicas_share_an_s3_store(model_home, adapter_dir, s3_bucket):
    url, options = s3_bucket
    endpoint = options["client_kwargs"]["endpoint_url"]

    def replica() -> ServerThread:
        return ServerThread(
            ServerConfig(
                port=0,
                adapter_store=f"{url}/store",
                s3_endpoint_url=endpoint,
                model=ModelConfig(home=model_home),
                engine=EngineConfig(max_loras=2, max_batch_size=4),
            )
        ).start()

    a, b = replica(), replica()
    try:
        with LoraplexClient(a.address, 120) as ca, LoraplexClient(b.address, 120) as cb:
            version = ca.push("shared", adapter_dir).adapter
            out_b = cb.generate(ask("shared"))  # b has never seen it: it re-reads the store
            out_a = ca.generate(ask("shared"))
            assert out_b.adapter_version == version.version == 1
            assert out_b.token_ids == out_a.token_ids
            assert cb.get("shared").digest == version.digest
    finally:
        a.stop()
        b.stop()
