"""Server configuration: frozen dataclasses built once at the edge (CLI) and passed down."""

from __future__ import annotations

import ipaddress
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from loraplex.server.admission import TenantLimits
from loraplex.server.engine.merging import MergeSettings

DEFAULT_PORT = 50051
DEFAULT_METRICS_PORT = 9464  # `loraplex serve`'s /metrics port
DEFAULT_HOME = Path("~/.cache/loraplex")


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = None
    """HF model id or local directory; None serves the embedded SmolLM2-135M-Instruct."""
    home: Path = field(default_factory=DEFAULT_HOME.expanduser)
    """Where converted models and the adapter store live."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto = CUDA when present, else CPU."""
    quantization: Literal["nf4", "none"] = "nf4"
    """nf4 = bitsandbytes 4-bit NF4 with double quantization; none = the compute dtype."""
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    """Compute dtype of the base model."""

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")
        if self.quantization not in ("nf4", "none"):
            raise ValueError(f"quantization must be nf4 or none, got {self.quantization!r}")


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 64
    """Sequences running at once (KV cache rows): decoded together, one token each per step."""
    max_loras: int = 8
    """Device slots: distinct adapters resident (and batched together) at once."""
    max_lora_rank: int = 64
    """Largest adapter rank accepted; slot stacks are sized for it."""
    max_prefill_tokens: int = 512
    """Prompt tokens prefilled per step beside the decodes (chunked prefill): a long prompt
    takes several steps, and running decodes wait at most one chunk."""
    max_model_len: int = 4096
    """Longest sequence (prompt + new tokens), capped by the model's own context."""
    kv_cache_bytes: int = 1 << 30
    """KV cache budget: admission reserves prompt + max_new_tokens of it per request."""
    lora_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """dtype of the served LoRA weights and math; auto = the model's compute dtype (as vLLM
    does); float32 = as PEFT computes them."""
    max_queue: int = 1024
    """Requests waiting for admission; beyond it new requests are refused."""
    max_queued_tokens: int = 1 << 18
    """Prompt tokens waiting for admission; beyond it new requests are refused (a lone request
    is always queued: its own size is bounded by the context)."""
    tenant_max_running: int | None = None
    """Rows (running requests) one tenant may hold, so another tenant's request finds a row
    at once instead of waiting for a flood to finish; 0 = no limit; None = automatic: 3/4 of
    max_batch_size when the key file has more than one tenant, else no limit."""
    default_max_new_tokens: int = 128
    """max_new_tokens when a request does not set it."""
    max_adapter_bytes: int = 1 << 30
    """Largest adapter weights file accepted."""
    max_request_seconds: float = 600.0
    """A request still queued or generating this long after it arrived ends with
    DEADLINE_EXCEEDED (whatever deadline its client set), freeing its cache row and slot."""
    merge: MergeSettings = field(default_factory=MergeSettings)
    """When an adapter that dominates the traffic is folded into the base weights."""

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_loras",
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
        if self.tenant_max_running is not None and self.tenant_max_running < 0:
            raise ValueError(f"tenant_max_running must be >= 0, got {self.tenant_max_running}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Address to bind; loopback by default."""
    port: int = DEFAULT_PORT
    """gRPC port (0 picks a free one)."""
    adapter_roots: tuple[Path | str, ...] = ()
    """Directories adapters may be registered from, and object-store prefixes (s3://...) when
    URIs should be limited to some; empty = the defaults of `allowed_adapter_roots`."""
    adapter_store: Path | str | None = None
    """Adapter store: a directory or an object-store URL (s3://bucket/prefix) that replicas
    share; None = <home>/adapters."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint (MinIO, Ceph, ...) for the store and s3:// sources; None = AWS.
    Credentials come from the usual AWS environment variables and files."""
    host_cache_bytes: int = 2 << 30
    """Host-memory tier of the adapter cache (validated weights, LRU)."""
    pinned_adapters: tuple[str, ...] = ()
    """Adapter ids pinned at start-up (kept in a device slot and host memory)."""
    store_refresh_s: float = 30.0
    """How often the store's index is re-read, to see what other replicas registered."""
    auth_keys: Path | None = None
    """API key file (TOML, hashed keys per tenant and role; see server/auth.py). None: no
    authentication, and then only a loopback address may be bound unless `insecure`."""
    insecure: bool = False
    """Allow serving without authentication on a non-loopback address."""
    tls_cert: Path | None = None
    """PEM certificate chain: serve TLS (with `tls_key`)."""
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    """PEM CA bundle: require client certificates signed by it (mutual TLS)."""
    metrics_port: int | None = None
    """HTTP port of the Prometheus exposition (/metrics), on `host`; 0 picks a free one;
    None = no metrics (`loraplex serve` defaults to 9464)."""
    metrics_adapter_labels: int = 0
    """Count requests per adapter for this many adapters (the rest as "other"); 0 = none."""
    log_prompts: bool = False
    """Put prompts and outputs in the request log lines (never by default)."""
    tenant_limits: TenantLimits = field(default_factory=lambda: TenantLimits(max_concurrent=256))
    """Every tenant's limits (requests in flight, tokens per minute), unless the key file
    sets its own; without keys every caller is one tenant. The default in-flight limit keeps
    a single tenant from filling the queue (max_queue) on its own."""
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ValueError(f"metrics_port must be in 0..65535, got {self.metrics_port}")
        if self.metrics_adapter_labels < 0:
            raise ValueError("metrics_adapter_labels must be >= 0")
        if self.host_cache_bytes < 0:
            raise ValueError(f"host_cache_bytes must be >= 0, got {self.host_cache_bytes}")
        if self.auth_keys is None and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"serving {self.host} without authentication: give an API key file "
                "(--auth-keys) or, knowingly, --insecure"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("TLS needs both a certificate and its key")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("client certificates (mutual TLS) need TLS: give a certificate")
        if len(self.pinned_adapters) >= self.engine.max_loras:
            raise ValueError(
                f"{len(self.pinned_adapters)} pinned adapters need more than max_loras - 1 "
                f"({self.engine.max_loras - 1}) slots"
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
        return str(self.adapter_store or self.model.home / "adapters")

    @property
    def storage_options(self) -> dict[str, object]:
        """fsspec options for object storage (the store and s3:// sources)."""
        if self.s3_endpoint_url:
            return {"client_kwargs": {"endpoint_url": self.s3_endpoint_url}}
        return {}
