"""Request records, the request log line (JSON, no prompt unless asked) and metric labels."""

from __future__ import annotations

import json
import logging

from prometheus_client import CollectorRegistry, generate_latest

from loraplex.core.errors import OverQuota
from loraplex.server.logs import JsonFormatter
from loraplex.server.metrics import OTHER, Metrics
from loraplex.server.runtime.heap import GcPauses
from loraplex.server.runtime.telemetry import RequestLog, RequestRecord, code_name


def record(**fields) -> RequestRecord:
    r = RequestRecord(
        request_id="req-1", tenant="acme", arrival=10.0, adapter_id="support", adapter_version=3
    )
    r.prompt_tokens, r.queued, r.admitted = 7, 10.1, 10.2
    r.output(10.5, 1)
    r.output(10.7, 1)
    r.output(11.1, 2)  # two tokens in one step: two gaps of 0.2
    r.finish_reason, r.finished = "length", 11.1
    for k, v in fields.items():
        setattr(r, k, v)
    return r


def test_a_record_counts_tokens_and_gaps():
    r = record()
    assert r.completion_tokens == 4 and r.first_token == 10.5 and r.last_token == 11.1
    assert [round(g, 6) for g in r.token_gaps] == [0.2, 0.2]
    assert code_name(OverQuota("over", 1.0)) == "RESOURCE_EXHAUSTED"
    assert code_name(RuntimeError("boom")) == "INTERNAL"


def captured(log_text: bool, caplog) -> dict:
    caplog.set_level(logging.INFO, logger="loraplex.requests")
    RequestLog(log_text).finished(record(prompt="secret prompt", text="secret output"))
    return json.loads(JsonFormatter().format(caplog.records[-1]))


def test_the_request_log_line_is_json_without_text_by_default(caplog):
    line = captured(False, caplog)
    assert line["request_id"] == "req-1" and line["tenant"] == "acme"
    assert (line["adapter_id"], line["adapter_version"]) == ("support", 3)
    assert (line["prompt_tokens"], line["completion_tokens"]) == (7, 4)
    assert line["code"] == "OK" and line["ttft_s"] == 0.5 and line["queue_s"] == 0.1
    assert "secret" not in json.dumps(line)


def test_prompts_and_outputs_are_logged_only_when_asked(caplog):
    line = captured(True, caplog)
    assert line["prompt"] == "secret prompt" and line["output"] == "secret output"


def test_per_adapter_counts_are_capped_with_an_other_bucket():
    metrics = Metrics(adapter_labels=2)
    for adapter in ["a", "b", "c", "a", "d"]:
        metrics.finished(record(adapter_id=adapter))
    text = generate_latest(metrics.registry).decode()
    assert 'loraplex_adapter_requests_total{adapter="a"} 2.0' in text
    assert f'loraplex_adapter_requests_total{{adapter="{OTHER}"}} 2.0' in text
    assert 'adapter="c"' not in text
    # Histograms carry no adapter or tenant label.
    assert "acme" not in text and 'adapter="a"' not in text.split("loraplex_adapter_requests")[0]


def test_a_refused_request_is_counted_but_not_timed():
    metrics = Metrics()
    refused = RequestRecord(request_id="req-2", tenant="acme", arrival=1.0)
    refused.code = "RESOURCE_EXHAUSTED"
    metrics.finished(refused)
    text = generate_latest(metrics.registry).decode()
    assert (
        'loraplex_requests_total{code="RESOURCE_EXHAUSTED",finish_reason="",protocol="grpc"} 1.0'
        in text
    )
    assert "loraplex_time_to_first_token_seconds_count 0.0" in text


def test_json_lines_logged_during_a_call_carry_its_request_id():
    from loraplex.server.logs import REQUEST_ID

    logger = logging.getLogger("loraplex.test")
    record = logger.makeRecord("loraplex.test", logging.INFO, __file__, 1, "hello %s", ("x",), None)
    assert "request_id" not in json.loads(JsonFormatter().format(record))
    token = REQUEST_ID.set("call-9")
    try:
        line = json.loads(JsonFormatter().format(record))
    finally:
        REQUEST_ID.reset(token)
    assert line["request_id"] == "call-9" and line["message"] == "hello x"


def test_only_resolved_adapters_get_a_metric_label():
    """An id no adapter was resolved for (refused, unknown, invalid) takes no label slot."""
    metrics = Metrics(adapter_labels=2)
    for adapter in ["made-up-1", "made-up-2", "made-up-3"]:
        metrics.finished(record(adapter_id=adapter, adapter_version=0))
    metrics.finished(record(adapter_id="real", adapter_version=1))
    text = generate_latest(metrics.registry).decode()
    assert "made-up" not in text
    assert 'loraplex_adapter_requests_total{adapter="real"} 1.0' in text


def test_request_ids_with_line_breaks_are_replaced():
    from loraplex.server.runtime.telemetry import request_id

    assert request_id("req-1") == "req-1"
    for given in ("req-1\n", "req\r\nforged", "x" * 129):
        assert request_id(given) != given and len(request_id(given)) == 32


def test_adapters_of_requests_are_named_on_metrics_only_where_allowed():
    """/metrics has no keys: with tenants, the adapters of running and waiting requests are
    not named in loraplex_lora_requests_info unless the operator says so."""
    from types import SimpleNamespace

    from loraplex.server.metrics import StateCollector

    state = SimpleNamespace(
        running=2,
        waiting=1,
        kv_cache_usage=0.5,
        running_adapters=("acme-secret",),
        waiting_adapters=("globex-plan",),
        num_slots=4,
        merge=SimpleNamespace(adapter=None, merges=0, unmerges=0),
        prefix_cache=None,
        kv_blocks=None,
    )
    runtime = SimpleNamespace(
        engine=SimpleNamespace(recent_snapshot=lambda: state),
        adapters=SimpleNamespace(cache_view_of=lambda s: SimpleNamespace(tiers=[])),
        gc_pauses=GcPauses(),
    )
    texts = {}
    for named in (True, False):
        registry = CollectorRegistry()
        registry.register(StateCollector(runtime, adapter_ids=named))  # type: ignore[arg-type]
        texts[named] = generate_latest(registry).decode()
    assert 'running_lora_adapters="acme-secret"' in texts[True]
    assert 'waiting_lora_adapters="globex-plan"' in texts[True]
    assert "acme-secret" not in texts[False] and "globex-plan" not in texts[False]
    assert 'max_lora="4"' in texts[False]


def test_servers_with_keys_do_not_name_adapters_on_metrics_unless_told(tmp_path):
    from loraplex.server.app import metrics_for
    from loraplex.server.config import ServerConfig

    keys = tmp_path / "keys.toml"
    common = {"adapter_store": tmp_path / "store"}
    assert metrics_for(ServerConfig(**common)).adapter_ids
    assert not metrics_for(ServerConfig(auth_keys=keys, **common)).adapter_ids
    assert metrics_for(ServerConfig(auth_keys=keys, metrics_adapter_ids=True, **common)).adapter_ids


def test_the_ttft_breakdown_splits_the_first_token_time(caplog):
    caplog.set_level(logging.INFO, logger="loraplex.requests")
    r = record(loaded=10.25, prefill_started=10.3, first_emitted=10.45)
    RequestLog().finished(r)
    line = json.loads(JsonFormatter().format(caplog.records[-1]))
    parts = line["ttft_breakdown"]
    assert {k: round(v, 6) for k, v in parts.items()} == {
        "prepare_s": 0.1,
        "queue_s": 0.1,
        "load_s": 0.05,
        "wait_s": 0.05,
        "prefill_s": 0.15,
        "deliver_s": 0.05,
    }
    assert round(sum(parts.values()), 6) == line["ttft_s"]  # the parts make the whole
    refused = RequestRecord(request_id="r", tenant="", arrival=1.0)
    RequestLog().finished(refused)
    line = json.loads(JsonFormatter().format(caplog.records[-1]))
    assert set(line["ttft_breakdown"].values()) == {None}
