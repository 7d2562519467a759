"""Server configuration: frozen dataclasses built once at the edge (the CLI) and passed down.

Every field is also a flag of `loraplex serve` (and `serve-ray`), named after the field unless
its metadata says otherwise, with the docstring under it as its help (core/options.py); so an
option is documented here once, and docs/options.md is generated from --help.
"""

from __future__ import annotations

import argparse
import ipaddress
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Literal, NamedTuple

from loraplex.adapters.config import DEFAULT_MAX_ADAPTER_BYTES, StoreConfig, path_or_url
from loraplex.core.config import ModelConfig
from loraplex.core.options import add_options, build

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464  # `loraplex serve`'s /metrics port
DEFAULT_HTTP_PORT = 8000  # `loraplex serve`'s OpenAI-compatible HTTP API
MiB = 1 << 20
MERGE_POLICIES = ("auto", "off")
LOG_FORMATS = ("text", "json")


def parse_auto_int(text: str) -> int | None:
    """A count, or "auto" (None: the server chooses)."""
    if text == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None


@dataclass(frozen=True)
class MergeSettings:
    policy: Literal["auto", "off"] = "auto"
    """auto: fold an adapter carrying most of the tokens into the base weights and take it
    out when it no longer does; off: only `adapters merge` (MergeAdapter) merges."""
    merge_share: float = field(default=0.9, metadata={"flag": "--merge-share", "metavar": "F"})
    """Merge the adapter with at least this share of recent (and queued) tokens."""
    unmerge_share: float = field(default=0.75, metadata={"flag": "--unmerge-share", "metavar": "F"})
    """Unmerge it when its share falls below this (below merge_share: hysteresis)."""
    window_tokens: int = 4096
    """Recent tokens the shares are taken over."""
    window_seconds: float = 5.0
    """...and only those of the last this many seconds: under light load (a lone stream)
    the shares follow the traffic of now."""
    min_interval_s: float = 5.0
    """Least time between two changes (a merge costs a pass over the targeted layers)."""

    def __post_init__(self) -> None:
        if self.policy not in MERGE_POLICIES:
            raise ValueError(f"merge policy must be auto or off, got {self.policy!r}")
        if not 0 < self.unmerge_share <= self.merge_share <= 1:
            raise ValueError(
                "need 0 < unmerge_share <= merge_share <= 1, got "
                f"{self.unmerge_share} and {self.merge_share}"
            )
        if self.window_tokens < 1 or self.min_interval_s < 0 or self.window_seconds <= 0:
            raise ValueError(
                "window_tokens must be >= 1, window_seconds > 0 and min_interval_s >= 0"
            )


@dataclass(frozen=True)
class TenantLimits:
    max_concurrent: int = field(default=0, metadata={"metavar": "N"})
    """Requests in flight (queued or running) per tenant; 0 = no limit (the key file may set
    each tenant's own)."""
    tokens_per_minute: int = field(default=0, metadata={"metavar": "N"})
    """Prompt + max_new_tokens reserved per tenant per minute; 0 = no limit."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{f.name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 64
    """Sequences running at once (KV cache rows): decoded together, one token each per step."""
    max_loras: int | None = field(
        default=None, metadata={"parse": parse_auto_int, "metavar": "N|auto", "cli_default": "auto"}
    )
    """Device slots: distinct adapters resident (and batched together) at once; auto = as
    many as a quarter of the memory available at start holds, each adapter loaded at its own
    rank (rounded up to a power of two, at least 8) and each slot more at the largest such
    rank loaded, at most one per batch row (--max-batch-size): more slots for small adapters,
    fewer once large ones load."""
    max_lora_rank: int = 64
    """Largest adapter rank accepted (a slot takes only its adapter's rank, rounded up to a
    power of two)."""
    max_prefill_tokens: int = 512
    """Prompt tokens prefilled per step beside the decodes (chunked prefill): a long prompt
    takes several steps, and running decodes wait at most one chunk."""
    max_model_len: int = 4096
    """Longest sequence (prompt + new tokens), capped by the model's own context."""
    kv_cache_bytes: int = field(default=1 << 30, metadata={"flag": "--kv-cache-mb", "scale": MiB})
    """KV cache budget, in MiB: admission reserves prompt + max_new_tokens of it per request
    (the prefix cache's share comes out of it)."""
    prefix_cache: bool = True
    """Reuse the keys and values of prompt prefixes computed before (shared system prompts,
    earlier chat turns) for requests of the same adapter version, tenant and cache_salt, in
    blocks of 16 tokens (--no-prefix-cache: compute every prompt whole)."""
    prefix_cache_bytes: int | None = field(
        default=None, metadata={"flag": "--prefix-cache-mb", "scale": MiB, "metavar": "MB"}
    )
    """The prefix cache's share of --kv-cache-mb, in MiB; default: a quarter of it (least
    recently used blocks make way for new ones: admission never waits for them)."""
    base_kernel: Literal["auto", "bitsandbytes", "lut", "nf4", "dense", "packed"] = "auto"
    """How the 4-bit base layers multiply: auto = the fastest of the others, measured per layer
    shape and batch size at start (cached per machine); bitsandbytes = its 4-bit kernel; lut =
    dequantize by table lookup per call; nf4 = loraplex's native kernel, straight from the
    4-bit codes (CPU, built with the C compiler at first start); dense = a dense copy of every
    4-bit layer (whatever --dense-cache-mb says); packed = the same in oneDNN's blocked layout
    (CPU)."""
    dense_cache_bytes: int | None = field(
        default=None, metadata={"flag": "--dense-cache-mb", "scale": MiB, "metavar": "MB"}
    )
    """Memory for dense copies of 4-bit base layers where they are faster, and for a merged
    adapter's copies (what the base's leave), in MiB (the 4-bit weights stay loaded: merges
    and exports read them); 0 = none, and no merges; default: half the memory available at
    start (a quarter of a GPU's free memory)."""
    compile: bool = True
    """Capture decode steps of a few tokens (light load) once per batch size and replay them
    in one native call, without Python between the kernels (CPU, with the native kernels;
    --no-compile: every step op by op)."""
    kernels: Literal["auto", "torch", "triton"] = "auto"
    """The LoRA kernels: triton = the Triton shrink and expand (the GPU path; on a CPU through
    Triton's interpreter, for tests only); torch = torch's ops, and on a CPU loraplex's native
    kernels; auto = triton on CUDA where triton is installed, else torch."""
    kv_layout: Literal["auto", "rows", "paged"] = "auto"
    """How the KV cache holds sequences: paged = blocks of 16 tokens taken as a sequence
    grows (a GPU's memory goes to the tokens there are; attention reads blocks: the Triton
    kernel, or torch's ops); rows = one row of --max-model-len tokens per sequence (on a CPU
    its memory is backed only as written, and the native kernels read rows in place); auto =
    paged on CUDA and with --kernels triton, else rows."""
    gpu_memory_utilization: float = 0.9
    """Share of the GPU's memory the server may use (vLLM's flag): the paged KV cache gets
    what the model, the adapter slots, the dense budget and a profiling step leave of it
    (CUDA only; on a CPU, --kv-cache-mb sizes the cache)."""
    lora_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the served LoRA weights (the math in it, or in float32 where the compute dtype
    is float32); auto = the model's compute dtype (as vLLM does), but bfloat16 weights where
    --dtype auto chose float32 on a CPU (half the bytes a LoRA step reads); float32 = as PEFT
    computes them."""
    cuda_graphs: bool = False
    """Replay decode steps as CUDA graphs, one per batch-size bucket, captured at first use
    (the Triton path on CUDA: one launch a step instead of every op of every layer); off by
    default until measured on a GPU (benchmarks/gpu.py runs both)."""
    async_output: Literal["auto", "on", "off"] = "auto"
    """Render the text of outputs (detokenize) and hand them to the front ends on a thread of
    their own, while the engine runs its next step; auto = on with a GPU (the host works while
    the device computes), off on a CPU (whose cores the step itself uses)."""
    max_queue: int = 1024
    """Requests waiting for admission; beyond it new requests are refused
    (RESOURCE_EXHAUSTED)."""
    max_queued_tokens: int = 1 << 18
    """Prompt tokens waiting for admission; beyond it new requests are refused (a lone request
    is always queued: its own size is bounded by the context)."""
    tenant_max_running: int | None = field(default=None, metadata={"metavar": "N"})
    """Rows (running requests) one tenant may hold, so another tenant's request finds a row
    at once instead of waiting for a flood to finish; 0 = no limit; default: 3/4 of
    max_batch_size when the key file has more than one tenant, else no limit."""
    default_max_new_tokens: int = field(default=128, metadata={"flag": "--max-new-tokens"})
    """max_new_tokens when a request does not set it."""
    max_adapter_bytes: int = field(
        default=DEFAULT_MAX_ADAPTER_BYTES, metadata={"flag": "--max-adapter-mb", "scale": MiB}
    )
    """Largest adapter weights file taken (registered, pushed or loaded), in MiB."""
    max_request_seconds: float = 600.0
    """A request still queued or generating this long after it arrived ends with
    DEADLINE_EXCEEDED (whatever deadline its client set), freeing its cache row and slot."""
    merge: MergeSettings = field(default_factory=MergeSettings, metadata={"prefix": "merge-"})
    """When an adapter that dominates the traffic is folded into the base weights."""

    def __post_init__(self) -> None:
        if self.max_loras is not None and self.max_loras < 1:
            raise ValueError(f"max_loras must be >= 1 or auto, got {self.max_loras}")
        for name in (
            "max_batch_size",
            "max_lora_rank",
            "max_prefill_tokens",
            "max_model_len",
            "kv_cache_bytes",
            "max_queue",
            "max_queued_tokens",
            "default_max_new_tokens",
            "max_adapter_bytes",
            "max_request_seconds",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.prefix_cache_bytes is not None and not (
            0 < self.prefix_cache_bytes < self.kv_cache_bytes
        ):
            raise ValueError(
                f"prefix_cache_bytes must be in (0, kv_cache_bytes), got {self.prefix_cache_bytes}"
            )
        if self.dense_cache_bytes is not None and self.dense_cache_bytes < 0:
            raise ValueError(f"dense_cache_bytes must be >= 0, got {self.dense_cache_bytes}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.tenant_max_running is not None and self.tenant_max_running < 0:
            raise ValueError(f"tenant_max_running must be >= 0, got {self.tenant_max_running}")


@dataclass(frozen=True)
class GrpcLimits:
    max_concurrent_rpcs: int = field(default=2048, metadata={"metavar": "N"})
    """RPCs in progress at once, of every kind (streams, health checks and refused calls
    included); beyond it a new call is RESOURCE_EXHAUSTED at once. Keep it above --max-queue
    plus --max-batch-size: admission, not this, should refuse generate calls."""
    max_pending_calls: int = field(default=16384, metadata={"metavar": "N"})
    """Calls received and not yet taken up by the server's event loop (a burst arrives faster
    than the loop picks calls up: thousands at once take it a fraction of a second). Beyond
    it gRPC itself cancels a new call before loraplex sees it (status CANCELLED, which
    clients do not retry, nothing logged or counted); gRPC's own default starts doing so at
    1000, at random. Below it every call reaches admission, which refuses what it cannot
    serve with RESOURCE_EXHAUSTED and retry advice."""
    max_streams_per_connection: int = field(default=1024, metadata={"metavar": "N"})
    """Calls one connection may have open at once (HTTP/2 concurrent streams); its client
    holds any more until one ends."""
    max_keyless_streams: int = field(default=64, metadata={"metavar": "N"})
    """Health Watch and reflection streams open at once (they need no API key: anyone who
    reaches the port can open them); beyond it a new one is RESOURCE_EXHAUSTED."""
    keepalive_s: float = field(default=60.0, metadata={"metavar": "S"})
    """Ping a connection that has been silent this long; one that does not answer within
    --grpc-keepalive-timeout-s is closed (a vanished client frees what it held)."""
    keepalive_timeout_s: float = field(default=20.0, metadata={"metavar": "S"})
    """How long a keepalive ping may go unanswered."""
    min_ping_interval_s: float = field(default=10.0, metadata={"metavar": "S"})
    """Least time between a client's pings: a client that pings more often (three times) is
    sent GOAWAY (too_many_pings) and its connection closed."""
    max_connection_idle_s: float = field(default=1800.0, metadata={"metavar": "S"})
    """Close a connection that has had no call for this long (its client reconnects when it
    needs to); 0 = never."""
    max_connection_age_s: float = field(default=3600.0, metadata={"metavar": "S"})
    """Ask a connection to close (GOAWAY) after this long, give or take 10%, so clients
    reconnect (and spread over replicas anew); 0 = never."""
    max_connection_age_grace_s: float | None = field(default=None, metadata={"metavar": "S"})
    """How long the calls in flight on a connection past its age may take before it is
    closed; default: --max-request-seconds (no request is cut short)."""

    def __post_init__(self) -> None:
        for name in (
            "max_concurrent_rpcs",
            "max_pending_calls",
            "max_streams_per_connection",
            "max_keyless_streams",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"grpc {name} must be >= 1, got {getattr(self, name)}")
        for name in ("keepalive_s", "keepalive_timeout_s", "min_ping_interval_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"grpc {name} must be > 0, got {getattr(self, name)}")
        for name in ("max_connection_idle_s", "max_connection_age_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"grpc {name} must be >= 0 (0: never), got {getattr(self, name)}")
        if self.max_connection_age_grace_s is not None and self.max_connection_age_grace_s < 0:
            raise ValueError("grpc max_connection_age_grace_s must be >= 0")

    def server_options(self, max_request_seconds: float) -> list[tuple[str, int]]:
        """grpc.aio.server channel arguments (the concurrent RPC limit is its own argument)."""
        grace = self.max_connection_age_grace_s
        options = {
            "grpc.max_concurrent_streams": self.max_streams_per_connection,
            "grpc.keepalive_time_ms": _ms(self.keepalive_s),
            "grpc.keepalive_timeout_ms": _ms(self.keepalive_timeout_s),
            # Enforcement of the client's pings: closer together than this is a strike, and
            # after max_ping_strikes (2) the connection gets GOAWAY too_many_pings. Pings of
            # an idle connection are allowed (at that interval): max_connection_idle ends it.
            "grpc.http2.min_ping_interval_without_data_ms": _ms(self.min_ping_interval_s),
            "grpc.http2.max_ping_strikes": 2,
            "grpc.keepalive_permit_without_calls": 1,
            # gRPC's backlog of calls the loop has not taken up yet: soft = hard, no random
            # early rejection below the limit
            "grpc.server.max_pending_requests": self.max_pending_calls,
            "grpc.server.max_pending_requests_hard_limit": self.max_pending_calls,
        }
        if self.max_connection_idle_s:
            options["grpc.max_connection_idle_ms"] = _ms(self.max_connection_idle_s)
        if self.max_connection_age_s:
            options["grpc.max_connection_age_ms"] = _ms(self.max_connection_age_s)
            options["grpc.max_connection_age_grace_ms"] = _ms(
                max_request_seconds if grace is None else grace
            )
        return list(options.items())


def _ms(seconds: float) -> int:
    return max(1, min(round(seconds * 1000), 2**31 - 1))


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig(StoreConfig):
    host: str = "127.0.0.1"
    """Address to bind; loopback by default."""
    port: int = DEFAULT_PORT
    """gRPC port (0 picks a free one)."""
    http_port: int | None = field(
        default=None,
        metadata={
            "cli_default": DEFAULT_HTTP_PORT,
            "off_flag": "--no-http",
            "off_help": "serve no HTTP API (gRPC only)",
        },
    )
    """Port of the OpenAI-compatible HTTP API, on --host with the same keys and TLS as gRPC;
    0 picks a free one."""
    adapter_roots: tuple[Path | str, ...] = field(
        default=(), metadata={"flag": "--adapter-root", "parse": path_or_url, "metavar": "DIR"}
    )
    """Directory adapters may be registered from, or an object-store prefix (s3://...) that
    URIs must start with (repeatable); none given = the working directory (unless it is /),
    the temp directory and the loraplex home."""
    host_cache_bytes: int | None = field(
        default=None, metadata={"flag": "--host-cache-mb", "scale": MiB, "metavar": "MB"}
    )
    """Host-memory tier of the adapter cache (validated float32 weights, LRU), in MiB; default:
    an eighth of the memory available at start (2048 where the system cannot say)."""
    pinned_adapters: tuple[str, ...] = field(
        default=(), metadata={"flag": "--pin", "metavar": "ID"}
    )
    """Adapter kept in a device slot and host memory from the start (repeatable)."""
    store_refresh_s: float = 30.0
    """How often the store's index is re-read, to see what other replicas registered."""
    auth_keys: Path | None = field(default=None, metadata={"metavar": "FILE"})
    """API key file (TOML, hashed keys per tenant and role; `loraplex keys new` makes entries).
    Without it there is no authentication, and only a loopback address is served unless
    --insecure."""
    insecure: bool = False
    """Serve a non-loopback address without authentication."""
    allow_plaintext_keys: bool = False
    """Serve a non-loopback address with API keys but without TLS (--tls-cert), knowingly:
    where TLS ends in front of the server (a load balancer, an ingress, a service mesh), since
    otherwise clients' keys cross the network readable."""
    auth_keys_reload_s: float = field(default=10.0, metadata={"metavar": "S"})
    """How often the API key file is checked for changes, and reloaded when it changed (a key
    removed from it stops working without a restart; SIGHUP reloads at once); 0 = only at
    SIGHUP."""
    tls_cert: Path | None = field(default=None, metadata={"metavar": "PEM"})
    """Serve TLS with this certificate chain (with --tls-key)."""
    tls_key: Path | None = field(default=None, metadata={"metavar": "PEM"})
    """The certificate's private key."""
    tls_client_ca: Path | None = field(default=None, metadata={"metavar": "PEM"})
    """Require client certificates signed by this CA bundle (mutual TLS)."""
    metrics_port: int | None = field(
        default=None,
        metadata={
            "cli_default": DEFAULT_METRICS_PORT,
            "off_flag": "--no-metrics",
            "off_help": "serve no metrics",
        },
    )
    """HTTP port of the Prometheus exposition (/metrics), on --host; 0 picks a free one."""
    metrics_adapter_labels: int = field(default=0, metadata={"metavar": "N"})
    """Count requests per adapter for the first N adapters, the rest as "other"; 0 = none."""
    metrics_adapter_ids: bool = False
    """Name the adapters of running and waiting requests in loraplex_lora_requests_info (for
    adapter-affinity routers) although --auth-keys is set: anyone who reaches /metrics then
    reads every tenant's adapter ids. Without --auth-keys they are always named."""
    log_prompts: bool = False
    """Put prompts and outputs in the request log lines (never by default)."""
    drain_seconds: float = 30.0
    """At SIGTERM, how long requests in flight may take to finish (Kubernetes' default grace
    period; the manifests in deploy/ give the container more, to stop cleanly after). Those
    still running then are cut, and the log names them."""
    preload: bool = True
    """Run with tcmalloc and Intel OpenMP preloaded where they are installed (the server
    re-executes itself once with LD_PRELOAD; faster CPU steps: see docs/operations.md)."""
    tenant_limits: TenantLimits = field(
        default_factory=lambda: TenantLimits(max_concurrent=256), metadata={"prefix": "tenant-"}
    )
    """Every tenant's limits, unless the key file sets its own; without keys every caller is
    one tenant. The default in-flight limit keeps a single tenant from filling the queue
    (max_queue) on its own."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The base model: which, where it is cached, and how it computes."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The engine: the batch, adapter slots, KV cache, queue and per-request limits."""
    grpc_limits: GrpcLimits = field(default_factory=GrpcLimits, metadata={"prefix": "grpc-"})
    """What one gRPC server takes at once, and how long connections live: bounds on
    concurrent calls and streams, keepalive enforcement, connection idle time and age."""

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in ("metrics_port", "http_port"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 65535:
                raise ValueError(f"{name} must be in 0..65535, got {value}")
        if self.metrics_adapter_labels < 0:
            raise ValueError("metrics_adapter_labels must be >= 0")
        if self.host_cache_bytes is not None and self.host_cache_bytes < 0:
            raise ValueError(f"host_cache_bytes must be >= 0, got {self.host_cache_bytes}")
        self.check_authentication(self.host)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key")
        self.check_plaintext_keys(self.host)
        if self.auth_keys_reload_s < 0:
            raise ValueError(f"auth_keys_reload_s must be >= 0, got {self.auth_keys_reload_s}")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("client certificates (mutual TLS) need TLS: give a certificate")
        slots = self.engine.max_loras
        if slots is not None and len(self.pinned_adapters) >= slots:
            raise ValueError(
                f"{len(self.pinned_adapters)} pinned adapters need more than max_loras - 1 "
                f"({slots - 1}) slots"
            )

    def check_authentication(self, host: str) -> None:
        """Serving `host` without an API key file needs --insecure, unless it is loopback."""
        if self.auth_keys is None and not self.insecure and not is_loopback(host):
            raise ValueError(
                f"serving {host} without authentication: give an API key file "
                "(--auth-keys) or, knowingly, --insecure"
            )

    def check_plaintext_keys(self, host: str) -> None:
        """Serving `host` with API keys over plaintext needs --allow-plaintext-keys, unless it
        is loopback: the keys would cross the network readable."""
        if (
            self.auth_keys is not None
            and self.tls_cert is None
            and not self.allow_plaintext_keys
            and not is_loopback(host)
        ):
            raise ValueError(
                f"serving {host} with API keys over plaintext, where anyone on the path can "
                "read them: serve TLS (--tls-cert and --tls-key) or, knowingly, where TLS ends "
                "in front of the server, --allow-plaintext-keys"
            )

    @property
    def allowed_adapter_roots(self) -> tuple[Path | str, ...]:
        """The configured roots, or by default the working directory (unless it is the file
        system's root), the system temp directory and the loraplex home."""
        if self.adapter_roots:
            return self.adapter_roots
        cwd = Path.cwd()
        defaults = [Path(tempfile.gettempdir()), self.model.home]
        return tuple(defaults if cwd == Path(cwd.anchor) else [cwd, *defaults])

    @property
    def store_url(self) -> str:
        return self.store_location(self.model.home)


@dataclass(frozen=True)
class RayConfig:
    """`loraplex serve-ray`: how many engine replicas, and where."""

    replicas: int = 2
    """Engine replicas, each a whole loraplex server."""
    replica_cpus: float = 1.0
    """CPUs (compute threads) per replica."""
    ray_address: str = ""
    """A running cluster's address (default: start one here)."""

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.replica_cpus <= 0:
            raise ValueError("need replicas >= 1 and replica_cpus > 0")


@dataclass(frozen=True)
class LogConfig:
    level: str = field(default="INFO", metadata={"flag": "--log-level"})
    """DEBUG, INFO, WARNING or ERROR."""
    format: Literal["text", "json"] = field(
        default="text",
        metadata={"flag": "--log-format", "env": "LORAPLEX_LOG_FORMAT", "shown": "text"},
    )
    """json: one object per line, for log pipelines."""

    def __post_init__(self) -> None:
        if self.format not in LOG_FORMATS:
            raise ValueError(f"log format must be one of {LOG_FORMATS}, got {self.format!r}")


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """`loraplex serve`'s flags, one per ServerConfig field. The log flags are also taken after
    the verb (e.g. in a Ray Serve config's serve_flags), keeping those given before it
    otherwise."""
    add_options(parser, ServerConfig)
    add_options(parser, LogConfig, suppressed=True)


class ServeOptions(NamedTuple):
    server: ServerConfig
    logs: LogConfig


def parse_serve_flags(
    flags: Sequence[str], environ: Mapping[str, str] | None = None
) -> ServeOptions:
    """The configuration `loraplex serve FLAGS` would run with."""
    parser = argparse.ArgumentParser(prog="loraplex serve")
    add_serve_options(parser)
    args = parser.parse_args(list(flags))
    return ServeOptions(build(ServerConfig, args, environ), build(LogConfig, args, environ))
