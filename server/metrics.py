"""Prometheus metrics, served over HTTP at /metrics (`--metrics-port`).

Names follow Prometheus conventions (base units, `_seconds`, `_total`, prefix `loraplex_`) and
vLLM's where one exists. Label sets stay bounded: no adapter or tenant id in any histogram;
per-adapter request counts only behind `--metrics-adapter-labels N`, for the first N adapters
seen, every other adapter counted as "other". /metrics has no keys of its own, so with
--auth-keys (tenants) the adapters of running and waiting requests are not named in
loraplex_lora_requests_info unless --metrics-adapter-ids says so (a router that routes by
adapter needs them; bind /metrics where only it can reach it). Gauges and the adapter cache
counters are read from the engine and caches when scraped, so serving requests does no extra
work for them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from loraplex.core import __version__
from loraplex.server.runtime.heap import PAUSE_BUCKETS, GcPauses
from loraplex.server.runtime.telemetry import RequestRecord

if TYPE_CHECKING:
    from loraplex.server.runtime.runtime import Runtime

log = logging.getLogger(__name__)

OTHER = "other"
# Latency buckets, seconds: from a fast GPU token (~5 ms) to a long CPU generation.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 3, 5, 10, 20, 60)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 15, 20, 30, 60, 120, 300, 600)
LOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    def __init__(
        self,
        adapter_labels: int = 0,
        registry: CollectorRegistry | None = None,
        adapter_ids: bool = True,
    ) -> None:
        """`adapter_labels`: count requests per adapter for this many adapters (0 = none);
        `adapter_ids`: name the adapters of running and waiting requests."""
        self.adapter_ids = adapter_ids
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.ttft = Histogram(
            "loraplex_time_to_first_token_seconds",
            "Time from a request's arrival to its first token.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "loraplex_inter_token_latency_seconds",
            "Time between a request's consecutive tokens.",
            buckets=ITL_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "loraplex_e2e_request_latency_seconds",
            "Time from a request's arrival to its last token.",
            buckets=E2E_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "loraplex_request_queue_time_seconds",
            "Time a request waited for admission to the running batch.",
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.adapter_load = Histogram(
            "loraplex_adapter_load_seconds",
            "Time to load an adapter into a cache tier from the one below.",
            ["tier"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens", "Prompt tokens of requests that ran.", registry=r
        )
        self.generation_tokens = Counter(
            "loraplex_generation_tokens", "Tokens generated.", registry=r
        )
        self.requests = Counter(
            "loraplex_requests",
            "Generate requests by final status code, finish reason and protocol.",
            ["code", "finish_reason", "protocol"],
            registry=r,
        )
        self.adapter_requests = Counter(
            "loraplex_adapter_requests",
            f"Generate requests per adapter (the first --metrics-adapter-labels adapters; "
            f'the rest as "{OTHER}").',
            ["adapter"],
            registry=r,
        )
        self.adapter_labels = adapter_labels
        self._labelled: set[str] = set()
        self.build_info = Gauge(
            "loraplex_build_info",
            "Version and served model (value 1).",
            ["version", "model", "quantization", "device"],
            registry=r,
        )

    # -- request telemetry (a RequestObserver) ------------------------------------------------
    def finished(self, record: RequestRecord) -> None:
        self.requests.labels(record.code, record.finish_reason, record.protocol).inc()
        if self.adapter_labels and record.adapter_id and record.adapter_version:  # resolved
            self.adapter_requests.labels(self._adapter_label(record.adapter_id)).inc()
        if record.admitted is None:  # refused or failed before it ran
            return
        self.queue_time.observe(record.admitted - (record.queued or record.arrival))
        self.prompt_tokens.inc(record.prompt_tokens)
        self.generation_tokens.inc(record.completion_tokens)
        if record.first_token is not None:
            self.ttft.observe(record.first_token - record.arrival)
        for gap in record.token_gaps:
            self.itl.observe(gap)
        if record.finish_reason and record.last_token is not None:
            self.e2e.observe(record.last_token - record.arrival)

    def _adapter_label(self, adapter_id: str) -> str:
        if adapter_id in self._labelled:
            return adapter_id
        if len(self._labelled) < self.adapter_labels:
            self._labelled.add(adapter_id)
            return adapter_id
        return OTHER

    # -- wiring -------------------------------------------------------------------------------
    def watch(self, runtime: Runtime) -> None:
        """Read the served model's state at every scrape, and time adapter loads."""
        info = runtime.model_info()
        self.build_info.labels(__version__, info.model_id, info.quantization, info.device).set(1)
        self.registry.register(StateCollector(runtime, self.adapter_ids))
        for tier in ("device", "host"):
            runtime.observe_adapter_loads(tier, self.adapter_load.labels(tier).observe)

    def serve(self, host: str, port: int) -> int:
        """Serve /metrics over HTTP on a background thread; returns the port bound."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = int(server.server_port)
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound


class StateCollector(Collector):
    """Gauges and cache counters read from the engine and caches when Prometheus scrapes."""

    def __init__(self, runtime: Runtime, adapter_ids: bool = True) -> None:
        self.runtime = runtime
        self.adapter_ids = adapter_ids  # else the adapters of requests are not named

    def collect(self) -> Iterable[Metric]:
        yield gc_pauses_family(self.runtime.gc_pauses)
        state = self.runtime.engine.recent_snapshot()  # built by the engine thread
        if state is None:
            return
        yield GaugeMetricFamily(
            "loraplex_num_requests_running", "Requests in the running batch.", state.running
        )
        yield GaugeMetricFamily(
            "loraplex_num_requests_waiting", "Requests waiting for admission.", state.waiting
        )
        yield GaugeMetricFamily(
            "loraplex_kv_cache_usage_ratio",
            "Share of the KV cache's token budget (paged: its blocks) reserved by running "
            "requests.",
            state.kv_cache_usage,
        )
        if state.kv_blocks is not None:
            total, used = state.kv_blocks
            yield GaugeMetricFamily(
                "loraplex_kv_cache_blocks_total", "Blocks of the paged KV cache.", total
            )
            yield GaugeMetricFamily(
                "loraplex_kv_cache_blocks_used",
                "Blocks of the paged KV cache holding tokens of running requests.",
                used,
            )
        info = GaugeMetricFamily(
            "loraplex_lora_requests_info",
            "Adapters of running and waiting requests (vLLM's lora_requests_info shape); the "
            "value is when it was read (unix seconds).",
            labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"],
        )
        named = self.adapter_ids
        info.add_metric(
            [
                ",".join(state.running_adapters) if named else "",
                ",".join(state.waiting_adapters) if named else "",
                str(state.num_slots),
            ],
            time.time(),
        )
        yield info
        resident = GaugeMetricFamily(
            "loraplex_adapters_resident", "Adapters held per cache tier.", labels=["tier"]
        )
        families = {
            name: CounterMetricFamily(f"loraplex_adapter_cache_{name}", text, labels=["tier"])
            for name, text in (
                ("hits", "Requests whose adapter was in the tier."),
                ("misses", "Requests that waited for a load into the tier."),
                ("evictions", "Adapters evicted from the tier."),
            )
        }
        for view in self.runtime.adapters.cache_view_of(state).tiers:
            resident.add_metric([view.tier], view.resident)
            families["hits"].add_metric([view.tier], view.stats.hits)
            families["misses"].add_metric([view.tier], view.stats.misses)
            families["evictions"].add_metric([view.tier], view.stats.evictions)
        yield resident
        yield from families.values()
        merge = state.merge
        yield GaugeMetricFamily(
            "loraplex_base_merged",
            "1 while an adapter is folded into the base weights (see GetMergeState).",
            1 if merge.adapter else 0,
        )
        yield CounterMetricFamily(
            "loraplex_merges", "Adapters folded into the base weights.", merge.merges
        )
        prefix = state.prefix_cache
        if prefix is not None:
            yield CounterMetricFamily(
                "loraplex_prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                prefix.queries,
            )
            yield CounterMetricFamily(
                "loraplex_prefix_cache_hits",
                "Prompt tokens found in the prefix cache (not computed).",
                prefix.hits,
            )
            yield GaugeMetricFamily(
                "loraplex_prefix_cache_usage_ratio",
                "Share of the prefix cache's blocks holding a prefix.",
                prefix.used_blocks / prefix.blocks,
            )
        yield CounterMetricFamily(
            "loraplex_unmerges", "Merged adapters taken out of the base weights.", merge.unmerges
        )


def gc_pauses_family(pauses: GcPauses) -> HistogramMetricFamily:
    """Python's garbage collections and how long each stopped every thread (runtime/heap.py),
    per generation."""
    family = HistogramMetricFamily(
        "loraplex_gc_pause_seconds",
        "Python garbage collection pauses (every thread stops), per generation.",
        labels=["generation"],
    )
    for generation, stats in pauses.stats.items():
        counts = list(stats.counts)  # a copy: a collection may add to it meanwhile
        cumulative, buckets = 0, []
        for bound, n in zip([*map(str, PAUSE_BUCKETS), "+Inf"], counts, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        family.add_metric([str(generation)], buckets, sum_value=stats.total_s)
    return family
