"""The `loraplex` command's options: generated from the config dataclasses, each documented by
its field's docstring, and docs/options.md is their --help."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from loraplex.adapters.config import ExportConfig
from loraplex.core.config import ModelConfig
from loraplex.core.options import options
from loraplex.server.cli import build_parser, options_markdown, server_config
from loraplex.server.config import (
    DEFAULT_HTTP_PORT,
    DEFAULT_METRICS_PORT,
    EngineConfig,
    LogConfig,
    MergeSettings,
    RayConfig,
    ServerConfig,
    TenantLimits,
    parse_serve_flags,
)

REPO = Path(__file__).resolve().parents[2]


def test_docs_options_md_is_the_current_help():
    written = (REPO / "docs" / "options.md").read_text()
    python = f"Python {sys.version_info.major}.{sys.version_info.minor} "
    if python not in written.split("\n\n")[1]:
        # argparse lays help out differently across Python versions (3.13 prints aliases once).
        pytest.skip(f"docs/options.md was generated with another Python than {python}")
    assert written == options_markdown(), "docs/options.md is stale: run `make docs`"


def test_every_option_is_documented_by_its_field():
    for cls in (ServerConfig, RayConfig, LogConfig, ExportConfig):
        for option in options(cls):
            assert option.help.strip(), f"{cls.__name__}.{'.'.join(option.path)} has no docstring"


def test_serve_without_flags_runs_the_default_config():
    config, logs = parse_serve_flags([], environ={})
    assert config == dataclasses.replace(
        ServerConfig(), metrics_port=DEFAULT_METRICS_PORT, http_port=DEFAULT_HTTP_PORT
    )
    assert logs == LogConfig()


def test_serve_flags_set_the_fields_they_name():
    args = build_parser().parse_args(
        ["serve", "--kv-cache-mb", "512", "--max-loras", "3", "--max-new-tokens", "9",
         "--tenant-max-concurrent", "7", "--tenant-tokens-per-minute", "100",
         "--merge-policy", "off", "--merge-share", "0.8", "--unmerge-share", "0.5",
         "--no-metrics", "--pin", "a", "--pin", "b", "--adapter-root", "s3://bucket/p",
         "--adapter-root", "~/d", "--adapter-store", "s3://bucket/store", "--home", "/h",
         "--host-cache-mb", "64", "--max-adapter-mb", "2", "--tenant-max-running", "0",
         "--drain-seconds", "3", "--dtype", "float32"]
    )  # fmt: skip
    config = server_config(args)
    assert config.engine == EngineConfig(
        kv_cache_bytes=512 << 20,
        max_loras=3,
        default_max_new_tokens=9,
        max_adapter_bytes=2 << 20,
        tenant_max_running=0,
        merge=MergeSettings(policy="off", merge_share=0.8, unmerge_share=0.5),
    )
    assert config.tenant_limits == TenantLimits(max_concurrent=7, tokens_per_minute=100)
    assert config.metrics_port is None and config.pinned_adapters == ("a", "b")
    assert config.adapter_roots == ("s3://bucket/p", Path("~/d").expanduser())
    assert config.adapter_store == "s3://bucket/store" and config.host_cache_bytes == 64 << 20
    assert config.model == ModelConfig(home=Path("/h"), dtype="float32")
    assert config.drain_seconds == 3


def test_log_flags_are_taken_before_and_after_the_verb():
    _, before = parse_serve_flags([], environ={"LORAPLEX_LOG_FORMAT": "json"})
    _, after = parse_serve_flags(["--log-format", "json", "--log-level", "DEBUG"], environ={})
    assert before.format == "json" and after == LogConfig(level="DEBUG", format="json")


# `loraplex serve` with a stand-in for the server (no model): the command's own shutdown path.
SERVE_WITH_A_STAND_IN = """
import asyncio, sys, types

class LoraplexServer:
    def __init__(self, config):
        self.config = config

    async def start(self):
        return 0

    async def wait_ready(self):  # runs once the signal handlers are in place
        print("serving", flush=True)
        await asyncio.Event().wait()

    async def stop(self, grace):
        print(f"stopped, {grace:g} s to drain", flush=True)

app = types.ModuleType("loraplex.server.app")
app.LoraplexServer = LoraplexServer
sys.modules["loraplex.server.app"] = app
from loraplex.server.cli import main
sys.exit(main(["serve", "--drain-seconds", "3", "--no-metrics"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_serve_drains_and_exits_0_on_ctrl_c_and_sigterm(sig):
    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_WITH_A_STAND_IN], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None and process.stdout.readline() == "serving\n"
        process.send_signal(sig)
        out, _ = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0 and "stopped, 3 s to drain" in out


def test_keys_new_prints_the_key_on_stderr_and_only_its_entry_on_stdout(tmp_path, capsys):
    """`keys new >> keys.toml` appends the entry alone; the key itself goes
    to the terminal and is in no file."""
    from loraplex.server.cli import main
    from loraplex.server.runtime.auth import KEY_PREFIX, KeyRing

    path = tmp_path / "keys.toml"
    keys = {}
    for name, tenant, role in (("app", "acme", "client"), ("ops", "platform", "admin")):
        assert main(["keys", "new", "--name", name, "--tenant", tenant, "--role", role]) == 0
        out, err = capsys.readouterr()
        assert KEY_PREFIX not in out
        (keys[name],) = [w for w in err.split() if w.startswith(KEY_PREFIX)]
        with path.open("a") as file:  # what `>> keys.toml` does
            file.write(out)
    ring = KeyRing.from_file(path)
    assert ring.authenticate(f"Bearer {keys['app']}").tenant == "acme"
    assert ring.authenticate(f"Bearer {keys['ops']}").is_admin
    assert not any(key in path.read_text() for key in keys.values())
    with pytest.raises(SystemExit):  # the entry could not be parsed back
        main(["keys", "new", "--name", 'a"\nrole = "admin', "--tenant", "acme"])


# `loraplex serve` with a real gRPC server and key file but no model (its load never starts),
# for the command's own SIGHUP path.
SERVE_WITHOUT_A_MODEL = """
import sys
from loraplex.server.app import LoraplexServer

async def no_model(self):
    return None

LoraplexServer._load = no_model
from loraplex.server.cli import main
sys.exit(main(["serve", "--port", "0", "--no-metrics", "--no-http", "--no-preload", "--auth-keys",
               sys.argv[1], "--auth-keys-reload-s", "0"]))
"""


def test_serve_reloads_its_keys_at_sighup_so_a_revoked_key_stops_working(tmp_path):
    """The key file is re-read at SIGHUP (the file is not watched here):
    a key taken out is refused from then on, by the same process, which keeps serving."""
    import queue
    import re
    import threading
    import time

    import grpc

    from loraplex.server.client import LoraplexClient
    from tests.helpers import write_key_file

    path = tmp_path / "keys.toml"
    keys = write_key_file(path, {"revoked": ("acme", "client"), "kept": ("acme", "client")})
    path.chmod(0o600)

    def code(address: str, key: str) -> grpc.StatusCode:
        with LoraplexClient(address, 10, api_key=key) as client:
            try:
                client.model_info()
            except grpc.RpcError as exc:
                return exc.code()  # UNAVAILABLE: admitted, the model "loading"
        return grpc.StatusCode.OK

    process = subprocess.Popen(
        [sys.executable, "-c", SERVE_WITHOUT_A_MODEL, str(path)], stderr=subprocess.PIPE, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in process.stderr], daemon=True).start()

    def wait_for(pattern: str) -> re.Match[str]:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if found := re.search(pattern, lines.get(timeout=0.5)):
                    return found
            except queue.Empty:
                assert process.poll() is None, "the server exited"
        raise AssertionError(f"the server never logged {pattern!r}")

    try:
        port = wait_for(r"listening on 127\.0\.0\.1:(\d+)").group(1)
        address = f"127.0.0.1:{port}"
        assert code(address, keys["revoked"]) == grpc.StatusCode.UNAVAILABLE
        path.write_text(
            "".join("[[keys]]" + e for e in path.read_text().split("[[keys]]")[1:] if "kept" in e)
        )
        assert code(address, keys["revoked"]) == grpc.StatusCode.UNAVAILABLE  # not yet
        process.send_signal(signal.SIGHUP)
        wait_for("API keys reloaded")
        assert code(address, keys["revoked"]) == grpc.StatusCode.UNAUTHENTICATED
        assert code(address, keys["kept"]) == grpc.StatusCode.UNAVAILABLE
        assert process.poll() is None  # the same process
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0
