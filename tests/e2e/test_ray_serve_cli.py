"""`loraplex serve-ray`, the README's one command: two replicas on a local Ray instance of
this machine's cores, answering the loraplex CLI through Ray's gRPC proxy and the OpenAI API
through its HTTP proxy, and stopping on Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest

from loraplex.server.client import LoraplexClient

pytest.importorskip("ray", reason="Ray Serve is a dev dependency")
pytestmark = pytest.mark.e2e

PORT = 9619
HTTP_PORT = 9620


def loraplex(*args: str) -> list[str]:
    script = Path(sys.executable).parent / "loraplex"
    return [str(script) if script.exists() else sys.executable, *args]


def test_serve_ray_serves_the_cli_and_stops_on_ctrl_c(model_home, tmp_path):
    argv = loraplex("serve-ray", "--replicas", "2", "--port", str(PORT), "--insecure")
    argv += ["--http-port", str(HTTP_PORT)]
    argv += ["--home", str(model_home), "--adapter-store", str(tmp_path / "store")]
    env = {**os.environ, "RAY_ADDRESS": ""}  # a local Ray instance of its own
    with open(tmp_path / "serve-ray.log", "wb") as log:
        server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:  # both replicas (every core of a 2-core machine) and the ingress
            assert server.poll() is None, (tmp_path / "serve-ray.log").read_text()[-3000:]
            try:
                with LoraplexClient(f"localhost:{PORT}", 30) as client:
                    client.model_info()
                break
            except grpc.RpcError:
                assert time.monotonic() < deadline, "serve-ray did not serve within 300 s"
                time.sleep(2)
        done = subprocess.run(
            loraplex("generate", "--server", f"localhost:{PORT}", "--max-new-tokens", "4", "Hi"),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0 and done.stdout.strip(), done.stderr
        with urllib.request.urlopen(f"http://localhost:{HTTP_PORT}/v1/models", timeout=60) as r:
            assert json.load(r)["data"][0]["parent"] is None  # the base model, over HTTP
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
