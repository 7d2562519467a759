"""Prometheus metrics after real traffic: the exposition's values move as they should, it
passes `promtool check metrics`, and a real Prometheus server scrapes and answers a query."""

from __future__ import annotations

import gc
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.core.config import ModelConfig
from loraplex.server.client import LoraplexClient
from loraplex.server.config import EngineConfig, MergeSettings, ServerConfig
from loraplex.v1 import inference_pb2 as pb
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def metered(model_home, adapter_root, tmp_path_factory):
    config = ServerConfig(
        port=0,
        metrics_port=0,
        metrics_adapter_labels=2,
        adapter_roots=(adapter_root,),
        adapter_store=tmp_path_factory.mktemp("store"),
        model=ModelConfig(home=model_home),
        engine=EngineConfig(max_loras=2, max_batch_size=8, merge=MergeSettings(policy="off")),
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def scrape(server) -> str:
    url = f"http://127.0.0.1:{server.server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return reply.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def value(found, name: str, **labels: str) -> float:
    """The sum over every series of `name` whose labels include `labels`."""
    return sum(v for (n, ls), v in found.items() if n == name and set(labels.items()) <= set(ls))


def test_metrics_count_real_traffic(metered, peft_reference):
    _, _, dirs = peft_reference
    before = samples(scrape(metered))
    with LoraplexClient(metered.address, timeout=120) as client:
        for name in ("attn-r8", "all-r16", "mix-r32"):
            client.register(name, str(dirs[name]))
        replies = [
            client.generate(pb.GenerateRequest(adapter_id=a, prompt="Hello", max_new_tokens=4))
            for a in ("attn-r8", "all-r16", "mix-r32", "attn-r8")
        ]
        chunks = list(client.generate_stream(pb.GenerateRequest(prompt="Hi", max_new_tokens=3)))
        replies.append(chunks[-1])
        with pytest.raises(grpc.RpcError):
            client.generate(pb.GenerateRequest(prompt="", max_new_tokens=1))
    # A call is counted as it completes on the server, which may be just after its client got
    # the answer: scrape until all six calls are in (or give up and let the asserts say why).
    generate = {"grpc_service": "loraplex.v1.Inference", "grpc_method": "Generate"}
    stream = {"grpc_service": "loraplex.v1.Inference", "grpc_method": "GenerateStream"}
    for _ in range(50):
        after = samples(scrape(metered))
        handled = value(after, "grpc_server_handled_total", **generate) + value(
            after, "grpc_server_handled_total", **stream
        )
        previously = value(before, "grpc_server_handled_total", **generate) + value(
            before, "grpc_server_handled_total", **stream
        )
        if (
            handled - previously >= 6
            and value(after, "loraplex_requests_total") - value(before, "loraplex_requests_total")
            >= 6
        ):
            break
        time.sleep(0.1)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = len(replies)
    assert moved("loraplex_requests_total", code="OK") == ok
    assert moved("loraplex_requests_total", code="INVALID_ARGUMENT") == 1
    for name in (
        "loraplex_time_to_first_token_seconds_count",
        "loraplex_e2e_request_latency_seconds_count",
        "loraplex_request_queue_time_seconds_count",
    ):
        assert moved(name) == ok, name
    completion = sum(r.usage.completion_tokens for r in replies)
    assert moved("loraplex_generation_tokens_total") == completion
    assert moved("loraplex_prompt_tokens_total") == sum(r.usage.prompt_tokens for r in replies)
    # Every token after the first has an inter-token gap.
    assert moved("loraplex_inter_token_latency_seconds_count") == completion - ok
    assert moved("grpc_server_started_total", **generate) == 5
    assert moved("grpc_server_handled_total", grpc_code="OK", **generate) == 4
    assert moved("grpc_server_handled_total", grpc_code="INVALID_ARGUMENT", **generate) == 1
    assert moved("grpc_server_handling_seconds_count", grpc_type="server_stream") >= 1
    # Three adapters through two device slots: at least one was evicted, each was loaded.
    assert moved("loraplex_adapter_cache_evictions_total", tier="device") >= 1
    assert moved("loraplex_adapter_cache_misses_total", tier="device") >= 3
    assert (
        moved("loraplex_adapter_cache_hits_total", tier="host")
        + moved("loraplex_adapter_cache_misses_total", tier="host")
        >= 4
    )
    assert moved("loraplex_adapter_load_seconds_count", tier="device") >= 3
    assert moved("loraplex_adapter_load_seconds_count", tier="host") >= 3
    # Per-adapter counts for the first two adapters, the third as "other".
    assert moved("loraplex_adapter_requests_total", adapter="attn-r8") == 2
    assert moved("loraplex_adapter_requests_total", adapter="other") == 1
    # Idle again: gauges back at rest.
    assert value(after, "loraplex_num_requests_running") == 0
    assert value(after, "loraplex_num_requests_waiting") == 0
    assert value(after, "loraplex_kv_cache_usage_ratio") == 0
    assert value(after, "loraplex_adapters_resident", tier="device") == 2
    assert value(after, "loraplex_build_info") == 1
    assert value(after, "loraplex_lora_requests_info", max_lora="2") > 0
    assert value(after, "loraplex_base_merged") == 0  # the policy is off in the test server
    assert value(after, "loraplex_merges_total") == 0


def test_the_heap_is_frozen_and_collections_are_timed(metered):
    """Once started, the server's heap is frozen (runtime/heap.py), and every garbage
    collection in its process (this one: the server runs on a thread) is on /metrics."""
    assert gc.get_freeze_count() > 100_000
    before = samples(scrape(metered))
    gc.collect()
    after = samples(scrape(metered))
    name = "loraplex_gc_pause_seconds_count"
    assert value(after, name, generation="2") - value(before, name, generation="2") >= 1
    assert value(after, "loraplex_gc_pause_seconds_sum", generation="2") > 0


def test_promtool_accepts_the_exposition(metered):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian package prometheus)")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=scrape(metered), capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_real_prometheus_scrapes_the_server(metered, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("prometheus is not installed (Debian package prometheus)")
    with LoraplexClient(metered.address, timeout=120) as client:
        client.generate(pb.GenerateRequest(prompt="Hello", max_new_tokens=2))
    config = tmp_path / "prometheus.yml"
    target = f"127.0.0.1:{metered.server.metrics_port}"
    config.write_text(
        "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: loraplex\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    port = free_port()
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        query = urllib.parse.urlencode({"query": 'loraplex_requests_total{code="OK"}'})
        result: list = []
        for _ in range(120):
            try:
                with urllib.request.urlopen(
                    f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=5
                ) as reply:
                    result = json.load(reply)["data"]["result"]
            except OSError:
                result = []
            if result:
                break
            time.sleep(0.5)
        assert result, "Prometheus never returned the loraplex series"
        assert result[0]["metric"]["job"] == "loraplex"
        assert float(result[0]["value"][1]) >= 1
    finally:
        process.terminate()
        process.wait(30)


def exprs(node: object) -> Iterator[str]:
    """Every PromQL `expr` anywhere in a Grafana dashboard (panels, rows, templating)."""
    if isinstance(node, dict):
        for key, child in node.items():
            if key in ("expr", "query") and isinstance(child, str):
                yield child
            else:
                yield from exprs(child)
    elif isinstance(node, list):
        for child in node:
            yield from exprs(child)


def promql_metric_names(text: str) -> set[str]:
    return set(re.findall(r"\b(?:loraplex|grpc_server)_[a-z0-9_]+\b", text))


def test_dashboard_and_alerts_use_only_exposed_metrics(metered):
    """Every loraplex/gRPC metric the Grafana dashboard and the alert rules query exists in a
    live exposition (after traffic, so labelled series are there too)."""
    with LoraplexClient(metered.address, timeout=120) as client:
        client.generate(pb.GenerateRequest(prompt="Hello", max_new_tokens=2))
    exposed = {name for name, _ in samples(scrape(metered))}
    root = Path(__file__).resolve().parents[2] / "deploy"
    dashboard = json.loads((root / "grafana" / "dashboards" / "loraplex.json").read_text())
    expressions = list(exprs(dashboard))
    assert expressions, "the dashboard has no queries"
    used = promql_metric_names("\n".join(expressions))
    used |= promql_metric_names((root / "prometheus" / "alerts.yml").read_text())
    assert used, "no loraplex metric is queried"
    assert used <= exposed, sorted(used - exposed)
