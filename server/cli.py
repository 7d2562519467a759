"""The `loraplex` command: serve, generate, and manage adapters."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf.json_format import MessageToDict

from loraplex.server.admission import TenantLimits
from loraplex.server.config import (
    DEFAULT_HOME,
    DEFAULT_METRICS_PORT,
    DEFAULT_PORT,
    EngineConfig,
    ModelConfig,
    ServerConfig,
)
from loraplex.server.engine.merging import MERGE_POLICIES, MergeSettings
from loraplex.server.logs import LOG_FORMATS, configure_logging
from loraplex.training.config import add_arguments as add_train_arguments

if TYPE_CHECKING:
    from loraplex.server.client import LoraplexClient
    from loraplex.v1 import adapters_pb2

log = logging.getLogger("loraplex")

DEFAULT_ADDRESS = f"localhost:{DEFAULT_PORT}"


def _home(arg: str | None) -> Path:
    # The edge is the one place that reads the environment.
    return Path(arg or os.environ.get("LORAPLEX_HOME") or DEFAULT_HOME).expanduser()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    parser.add_argument(
        "--log-format",
        choices=LOG_FORMATS,
        default=os.environ.get("LORAPLEX_LOG_FORMAT", "text"),
        help="json: one object per line ($LORAPLEX_LOG_FORMAT)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the base model and its adapters over gRPC")
    # Also after the verb (e.g. in a Ray Serve config's serve_flags); SUPPRESS keeps the values
    # given before the verb when these are not repeated after it.
    serve.add_argument("--log-level", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    serve.add_argument(
        "--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    serve.add_argument("--model", help="HF model id or local path (default: embedded SmolLM2)")
    serve.add_argument("--home", help="cache and adapter store ($LORAPLEX_HOME, ~/.cache/loraplex)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT)
    serve.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    serve.add_argument("--quantization", choices=["nf4", "none"], default="nf4")
    serve.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    serve.add_argument("--max-batch-size", type=int, default=EngineConfig.max_batch_size)
    serve.add_argument(
        "--max-loras",
        type=int,
        default=EngineConfig.max_loras,
        help="adapters resident in device slots at once",
    )
    serve.add_argument("--max-lora-rank", type=int, default=EngineConfig.max_lora_rank)
    serve.add_argument(
        "--lora-dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default=EngineConfig.lora_dtype,
        help="LoRA weights and math (auto: the compute dtype; float32: as PEFT)",
    )
    serve.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=EngineConfig.max_prefill_tokens,
        help="prompt tokens prefilled per step (chunked prefill)",
    )
    serve.add_argument("--max-model-len", type=int, default=EngineConfig.max_model_len)
    serve.add_argument(
        "--kv-cache-mb",
        type=int,
        default=EngineConfig.kv_cache_bytes >> 20,
        help="KV cache budget in MiB",
    )
    serve.add_argument(
        "--max-request-seconds",
        type=float,
        default=EngineConfig.max_request_seconds,
        help="a request still running this long after it arrived ends (DEADLINE_EXCEEDED)",
    )
    serve.add_argument(
        "--max-adapter-mb",
        type=int,
        default=EngineConfig.max_adapter_bytes >> 20,
        help="largest adapter weights file taken (registered, pushed or loaded), MiB",
    )
    serve.add_argument(
        "--max-new-tokens",
        type=int,
        default=EngineConfig.default_max_new_tokens,
        help="default when a request does not set max_new_tokens",
    )
    serve.add_argument(
        "--adapter-root",
        action="append",
        default=[],
        metavar="DIR",
        help="directory adapters may be registered from (repeatable)",
    )
    serve.add_argument(
        "--adapter-store",
        metavar="DIR|URL",
        help="adapter store: a directory or s3://bucket/prefix shared by replicas "
        "(default: HOME/adapters)",
    )
    serve.add_argument(
        "--s3-endpoint-url",
        help="S3-compatible endpoint for the store and s3:// sources (default: AWS)",
    )
    serve.add_argument(
        "--host-cache-mb",
        type=int,
        default=ServerConfig.host_cache_bytes >> 20,
        help="host-memory tier of the adapter cache, in MiB",
    )
    serve.add_argument(
        "--auth-keys",
        metavar="FILE",
        help="API key file (see `loraplex keys new`); without it only loopback is served",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback address without authentication",
    )
    serve.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain")
    serve.add_argument("--tls-key", metavar="PEM", help="the certificate's private key")
    serve.add_argument(
        "--tls-client-ca", metavar="PEM", help="require client certificates from this CA (mTLS)"
    )
    serve.add_argument(
        "--drain-seconds",
        type=float,
        default=10.0,
        help="at SIGTERM, how long requests in flight may take to finish",
    )
    serve.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULT_METRICS_PORT,
        help="HTTP port of the Prometheus /metrics exposition, on --host (0: any free port)",
    )
    serve.add_argument("--no-metrics", action="store_true", help="serve no metrics")
    serve.add_argument(
        "--metrics-adapter-labels",
        type=int,
        default=0,
        metavar="N",
        help="count requests per adapter for the first N adapters, the rest as 'other'",
    )
    serve.add_argument(
        "--log-prompts",
        action="store_true",
        help="put prompts and outputs in the request log (never by default)",
    )
    serve.add_argument(
        "--tenant-max-concurrent",
        type=int,
        default=ServerConfig().tenant_limits.max_concurrent,
        metavar="N",
        help="requests in flight per tenant (0 = no limit; the key file may set its own)",
    )
    serve.add_argument(
        "--tenant-tokens-per-minute",
        type=int,
        default=0,
        metavar="N",
        help="prompt + max_new_tokens per tenant per minute (0 = no limit)",
    )
    serve.add_argument(
        "--tenant-max-running",
        type=int,
        metavar="N",
        help="rows of the batch one tenant may hold (0 = no limit; default: 3/4 of "
        "--max-batch-size when the key file has several tenants)",
    )
    serve.add_argument(
        "--merge-policy",
        choices=MERGE_POLICIES,
        default=MergeSettings.policy,
        help="auto: fold an adapter carrying most of the tokens into the base weights and "
        "take it out when it no longer does; off: only `adapters merge` merges",
    )
    serve.add_argument(
        "--merge-share",
        type=float,
        default=MergeSettings.merge_share,
        metavar="F",
        help="share of recent and queued tokens at which the policy merges an adapter",
    )
    serve.add_argument(
        "--unmerge-share",
        type=float,
        default=MergeSettings.unmerge_share,
        metavar="F",
        help="share below which the merged adapter is taken out again (hysteresis)",
    )
    serve.add_argument(
        "--max-queue",
        type=int,
        default=EngineConfig.max_queue,
        help="requests waiting for admission; beyond it RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--max-queued-tokens",
        type=int,
        default=EngineConfig.max_queued_tokens,
        help="prompt tokens waiting for admission; beyond it RESOURCE_EXHAUSTED",
    )
    serve.add_argument(
        "--pin",
        action="append",
        default=[],
        metavar="ID",
        help="adapter kept in a device slot from the start (repeatable)",
    )

    # Client commands take --server anywhere on the line ($LORAPLEX_SERVER by default).
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument(
        "--server",
        "--address",
        dest="server",
        default=argparse.SUPPRESS,
        help=f"server address (default: $LORAPLEX_SERVER or {DEFAULT_ADDRESS})",
    )
    remote.add_argument(
        "--api-key",
        default=argparse.SUPPRESS,
        help="sent as 'authorization: Bearer KEY' (default: $LORAPLEX_API_KEY)",
    )
    remote.add_argument(
        "--tls-ca",
        default=argparse.SUPPRESS,
        metavar="PEM",
        help="use TLS, trusting this CA bundle (default: $LORAPLEX_TLS_CA; none: plaintext)",
    )

    on_ray = sub.add_parser(
        "serve-ray",
        parents=[serve],
        conflict_handler="resolve",
        help="serve on a Ray cluster: engine replicas routed by adapter, behind Ray's gRPC proxy",
        description="Takes every `serve` flag (--port is the Ray gRPC proxy's port); each "
        "replica is a whole loraplex server, and replicas share --adapter-store.",
    )
    on_ray.add_argument("--replicas", type=int, default=2, help="engine replicas")
    on_ray.add_argument(
        "--replica-cpus", type=float, default=1.0, help="CPUs (compute threads) per replica"
    )
    on_ray.add_argument(
        "--ray-address", default="", help="a running cluster's address (default: start one here)"
    )
    gen = sub.add_parser("generate", parents=[remote], help="generate text from a running server")
    gen.add_argument("prompt", help="the prompt (a user message with --chat)")
    gen.add_argument(
        "--adapter", "--adapter-id", default="", help="adapter id (default: the base model)"
    )
    gen.add_argument("--chat", action="store_true", help="apply the model's chat template")
    gen.add_argument("--system", help="system message (with --chat)")
    gen.add_argument("--max-new-tokens", type=int)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[])
    gen.add_argument(
        "--compose",
        action="append",
        default=[],
        metavar="ID:WEIGHT",
        help="compose adapters for this request (repeat: --compose a:0.7 --compose b:0.3)",
    )
    gen.add_argument("--method", default="linear", help="composition method (--compose)")
    gen.add_argument("--density", type=float, help="ties and dare_*: share of weights kept")
    gen.add_argument("--compose-seed", type=int, default=0, help="dare_*: the masks' seed")
    gen.add_argument("--stream", action="store_true", help="print text as it is generated")
    gen.add_argument("--json", action="store_true", help="print the whole response as JSON")

    adapters = sub.add_parser(
        "adapters", parents=[remote], help="register, list, inspect and remove adapters"
    )
    verbs = adapters.add_subparsers(dest="verb", required=True)
    register = verbs.add_parser(
        "register",
        parents=[remote],
        help="register a PEFT LoRA directory",
        description="loraplex adapters register ID DIR, or register DIR [--name ID] "
        "(the id defaults to the directory's name)",
    )
    register.add_argument("args", nargs="+", metavar="[ID] DIR")
    register.add_argument("--name", help="adapter id (instead of a positional ID)")
    register.add_argument("--pin", action="store_true", help="keep it in a device slot")
    register.add_argument("--tenant", default="", help="owning tenant (default: the key's)")
    register.add_argument("--shared", action="store_true", help="usable by every tenant")
    push = verbs.add_parser(
        "push",
        parents=[remote],
        help="upload a local PEFT LoRA directory to a (remote) server",
        description="loraplex adapters push DIR [--name ID] (the id defaults to the "
        "directory's name)",
    )
    push.add_argument("directory", metavar="DIR")
    push.add_argument("--name", help="adapter id (default: the directory's name)")
    push.add_argument("--pin", action="store_true", help="keep it in a device slot")
    push.add_argument("--tenant", default="", help="owning tenant (default: the key's)")
    push.add_argument("--shared", action="store_true", help="usable by every tenant")
    for verb, text in (("pin", "keep an adapter in a device slot"), ("unpin", "undo pin")):
        pin = verbs.add_parser(verb, parents=[remote], help=text)
        pin.add_argument("adapter_id")
    verbs.add_parser("stats", parents=[remote], help="adapter cache counters per tier")
    merge = verbs.add_parser(
        "merge", parents=[remote], help="fold an adapter into the base weights until unmerge"
    )
    merge.add_argument("adapter_id")
    verbs.add_parser("unmerge", parents=[remote], help="take the merged adapter out of the base")
    verbs.add_parser(
        "merge-state", parents=[remote], help="what is merged, and the merge policy's view"
    )
    verbs.add_parser("list", aliases=["ls"], parents=[remote], help="list registered adapters")
    get = verbs.add_parser("get", parents=[remote], help="show one adapter")
    get.add_argument("adapter_id")
    rm = verbs.add_parser(
        "rm", aliases=["delete"], parents=[remote], help="remove an adapter and all its versions"
    )
    rm.add_argument("adapter_id")
    export = verbs.add_parser(
        "export",
        help="write the base with one adapter merged in as a plain HF checkpoint (local)",
        description="loraplex adapters export NAME --merged OUT: the served NF4 base, "
        "dequantized, with the adapter's delta merged in float32, saved as safetensors that "
        "AutoModelForCausalLM loads without bitsandbytes or PEFT. Runs here, on the store "
        "the server uses; no server needed.",
    )
    export.add_argument("adapter", metavar="NAME", help="adapter id (a directory with --from-dir)")
    export.add_argument("--merged", required=True, metavar="OUT", help="directory to write")
    export.add_argument("--version", type=int, help="stored version (default: the latest)")
    export.add_argument(
        "--from-dir", action="store_true", help="NAME is a local PEFT LoRA directory"
    )
    export.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default="bfloat16",
        help="dtype of the saved weights (the merge is float32)",
    )
    export.add_argument("--force", action="store_true", help="replace a non-empty OUT")
    export.add_argument("--model", help="base model, as for serve (default: embedded SmolLM2)")
    export.add_argument("--home", help="as for serve ($LORAPLEX_HOME, ~/.cache/loraplex)")
    export.add_argument("--adapter-store", metavar="DIR|URL", help="as for serve")
    export.add_argument("--s3-endpoint-url", help="as for serve")
    export.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    export.add_argument(
        "--quantization",
        choices=["nf4", "none"],
        default="nf4",
        help="as the server serves the base (nf4: dequantized before the merge)",
    )
    train_parser = sub.add_parser(
        "train",
        help="train a LoRA/QLoRA adapter on a JSONL dataset (see training/config.py)",
        description="Every key of the YAML config is also a flag; flags win.",
    )
    add_train_arguments(train_parser)
    keys = sub.add_parser("keys", help="API keys for the server's key file")
    key_verbs = keys.add_subparsers(dest="verb", required=True)
    new = key_verbs.add_parser(
        "new", help="make an API key; prints it once, and the [[keys]] entry for the key file"
    )
    new.add_argument("--name", required=True, help="the key's name (shown in logs)")
    new.add_argument("--tenant", required=True)
    new.add_argument("--role", choices=["client", "admin"], default="client")
    return parser


def train(args: argparse.Namespace) -> int:
    from loraplex.training.config import from_args
    from loraplex.training.train import train as run  # heavy imports only when training

    try:
        config = from_args(args)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    adapter = run(config)
    if adapter is None or not config.register:
        return 0
    adapter_id = config.adapter_id or config.out.resolve().name.lower()
    with LoraplexClientFor(config.register) as client:
        reply = client.push(adapter_id, adapter)
    sys.stdout.write(json.dumps(_as_dict(reply), indent=2) + "\n")
    return 0


def serve_ray(args: argparse.Namespace) -> int:
    import ray  # heavy imports only when serving
    from ray import serve as ray_serve
    from ray.serve.config import gRPCOptions

    from loraplex.server.ray_serve import SERVICER_FUNCTIONS, build_app

    config = server_config(args)
    if config.auth_keys is None and not config.insecure:
        # Ray's proxy listens on every interface: no key file means anyone may call it.
        raise SystemExit("error: serve-ray needs --auth-keys (or --insecure to serve without)")
    ray.init(address=args.ray_address or None)
    ray_serve.start(
        grpc_options=gRPCOptions(port=args.port, grpc_servicer_functions=SERVICER_FUNCTIONS)
    )
    log.info("loraplex on Ray Serve: %d replicas, gRPC on port %d", args.replicas, args.port)
    app = build_app(config, args.replicas, args.replica_cpus, (args.log_level, args.log_format))
    ray_serve.run(app, name="loraplex", blocking=True)
    return 0


def LoraplexClientFor(address: str) -> LoraplexClient:  # noqa: N802
    """A client for `address` with the key and CA from the environment."""
    from loraplex.server.client import LoraplexClient

    ca = os.environ.get("LORAPLEX_TLS_CA")
    return LoraplexClient(
        address, 300, api_key=os.environ.get("LORAPLEX_API_KEY"), tls_ca=_path(ca)
    )


def keys(args: argparse.Namespace) -> int:
    from loraplex.server.auth import hash_key, new_key

    key = new_key()
    sys.stdout.write(
        f"# the key (give it to the client; it is not stored anywhere):\n# {key}\n"
        f'[[keys]]\nname = "{args.name}"\ntenant = "{args.tenant}"\nrole = "{args.role}"\n'
        f'sha256 = "{hash_key(key)}"\n'
    )
    return 0


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The server's configuration from `serve`'s flags."""
    return ServerConfig(
        host=args.host,
        port=args.port,
        adapter_roots=tuple(p if "://" in p else Path(p).expanduser() for p in args.adapter_root),
        adapter_store=_store(args.adapter_store),
        s3_endpoint_url=args.s3_endpoint_url,
        host_cache_bytes=args.host_cache_mb << 20,
        pinned_adapters=tuple(args.pin),
        auth_keys=_path(args.auth_keys),
        insecure=args.insecure,
        tls_cert=_path(args.tls_cert),
        tls_key=_path(args.tls_key),
        tls_client_ca=_path(args.tls_client_ca),
        metrics_port=None if args.no_metrics else args.metrics_port,
        metrics_adapter_labels=args.metrics_adapter_labels,
        log_prompts=args.log_prompts,
        tenant_limits=TenantLimits(args.tenant_max_concurrent, args.tenant_tokens_per_minute),
        model=ModelConfig(
            model=args.model,
            home=_home(args.home),
            device=args.device,
            quantization=args.quantization,
            dtype=args.dtype,
        ),
        engine=EngineConfig(
            max_batch_size=args.max_batch_size,
            max_loras=args.max_loras,
            max_lora_rank=args.max_lora_rank,
            lora_dtype=args.lora_dtype,
            max_prefill_tokens=args.max_prefill_tokens,
            max_model_len=args.max_model_len,
            kv_cache_bytes=args.kv_cache_mb << 20,
            max_adapter_bytes=args.max_adapter_mb << 20,
            default_max_new_tokens=args.max_new_tokens,
            max_request_seconds=args.max_request_seconds,
            max_queue=args.max_queue,
            max_queued_tokens=args.max_queued_tokens,
            tenant_max_running=args.tenant_max_running,
            merge=MergeSettings(
                policy=args.merge_policy,
                merge_share=args.merge_share,
                unmerge_share=args.unmerge_share,
            ),
        ),
    )


def serve(args: argparse.Namespace) -> int:
    from loraplex.server.app import LoraplexServer  # heavy imports only when serving

    config = server_config(args)

    async def run() -> None:
        server = LoraplexServer(config)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(stop.wait())
        ready = asyncio.create_task(server.wait_ready())
        done, _ = await asyncio.wait({waiter, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            ready.result()  # raises if the model failed to load
            await waiter
        log.info("shutting down: in-flight requests get %g s", args.drain_seconds)
        await server.stop(grace=args.drain_seconds)

    asyncio.run(run())
    return 0


def generate(args: argparse.Namespace) -> int:
    from loraplex.v1 import inference_pb2

    request = inference_pb2.GenerateRequest(
        adapter_id=args.adapter,
        temperature=args.temperature,
        top_k=args.top_k,
        stop=args.stop,
    )
    if args.chat:
        if args.system:
            request.messages.add(role="system", content=args.system)
        request.messages.add(role="user", content=args.prompt)
    else:
        request.prompt = args.prompt
    if args.max_new_tokens is not None:
        request.max_new_tokens = args.max_new_tokens
    if args.top_p is not None:
        request.top_p = args.top_p
    if args.seed is not None:
        request.seed = args.seed
    if args.compose:
        request.compose.CopyFrom(_composition(args))
    with _client(args) as client:
        if args.stream:
            for chunk in client.generate_stream(request):
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
        else:
            response = client.generate(request)
            if args.json:
                sys.stdout.write(json.dumps(_as_dict(response), indent=2) + "\n")
            else:
                sys.stdout.write(response.text + "\n")
    return 0


def _composition(args: argparse.Namespace) -> adapters_pb2.AdapterComposition:
    from loraplex.v1 import adapters_pb2

    message = adapters_pb2.AdapterComposition(method=args.method, seed=args.compose_seed)
    for item in args.compose:
        adapter_id, sep, weight = item.rpartition(":")
        try:
            message.adapters.add(adapter_id=adapter_id if sep else item, weight=float(weight))
        except ValueError:
            raise SystemExit(f"--compose {item!r}: expected ID:WEIGHT, e.g. support:0.5") from None
    if args.density is not None:
        message.density = args.density
    return message


def _server(args: argparse.Namespace) -> str:
    return getattr(args, "server", None) or os.environ.get("LORAPLEX_SERVER") or DEFAULT_ADDRESS


def _path(arg: str | None) -> Path | None:
    return Path(arg).expanduser() if arg else None


def _client(args: argparse.Namespace) -> LoraplexClient:
    from loraplex.server.client import LoraplexClient

    api_key = getattr(args, "api_key", None) or os.environ.get("LORAPLEX_API_KEY")
    tls_ca = getattr(args, "tls_ca", None) or os.environ.get("LORAPLEX_TLS_CA")
    return LoraplexClient(_server(args), api_key=api_key, tls_ca=_path(tls_ca))


def _store(arg: str | None) -> Path | str | None:
    if arg is None or "://" in arg:
        return arg
    return Path(arg).expanduser()


def _register_args(args: argparse.Namespace) -> tuple[str, str]:
    """(adapter id, directory) from `register ID DIR`, `register DIR --name ID` or `register
    DIR` (id = the directory's name, lower-cased)."""
    positional: list[str] = args.args
    if len(positional) == 2 and not args.name:
        adapter_id, path = positional
    elif len(positional) == 1:
        path = positional[0]
        adapter_id = args.name or Path(path).expanduser().resolve().name.lower()
    else:
        raise SystemExit("usage: loraplex adapters register [ID] DIR [--name ID]")
    if "://" not in path:  # the server resolves paths itself: send an absolute one
        path = str(Path(path).expanduser().resolve())
    return adapter_id, path


def export(args: argparse.Namespace) -> int:
    """`adapters export`: local, so it builds the server's config the way serve does."""
    from loraplex.adapters.errors import AdapterError
    from loraplex.adapters.export import EXPORT_DTYPES, MANIFEST_FILE, export_adapter

    try:
        config = ServerConfig(
            adapter_store=_store(args.adapter_store),
            s3_endpoint_url=args.s3_endpoint_url,
            model=ModelConfig(
                model=args.model,
                home=_home(args.home),
                device=args.device,
                quantization=args.quantization,
            ),
        )
        out = export_adapter(
            config,
            args.adapter,
            Path(args.merged),
            EXPORT_DTYPES[args.dtype],
            version=args.version,
            from_dir=args.from_dir,
            force=args.force,
        )
    except (AdapterError, OSError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from None
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    sys.stdout.write(json.dumps({"out": str(out), **manifest}, indent=2) + "\n")
    return 0


def adapters(args: argparse.Namespace) -> int:
    if args.verb == "export":  # the one local verb: no server, no client
        return export(args)
    with _client(args) as client:
        if args.verb == "register":
            result: object = _as_dict(
                client.register(
                    *_register_args(args), pin=args.pin, tenant=args.tenant, shared=args.shared
                )
            )
        elif args.verb == "push":
            directory = Path(args.directory).expanduser().resolve()
            if not directory.is_dir():
                raise SystemExit(f"error: {args.directory} is not a directory")
            adapter_id = args.name or directory.name.lower()
            result = _as_dict(
                client.push(
                    adapter_id, directory, pin=args.pin, tenant=args.tenant, shared=args.shared
                )
            )
        elif args.verb == "pin":
            result = _as_dict(client.pin(args.adapter_id))
        elif args.verb == "unpin":
            result = _as_dict(client.unpin(args.adapter_id))
        elif args.verb == "stats":
            result = _as_dict(client.cache_stats())
        elif args.verb == "merge":
            result = _as_dict(client.merge(args.adapter_id))
        elif args.verb == "unmerge":
            result = _as_dict(client.unmerge())
        elif args.verb == "merge-state":
            result = _as_dict(client.merge_state())
        elif args.verb in ("list", "ls"):
            result = [_as_dict(a) for a in client.list()]
        elif args.verb == "get":
            result = _as_dict(client.get(args.adapter_id))
        else:
            result = _as_dict(client.delete(args.adapter_id))
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    return 0


def _as_dict(message: object) -> dict:
    return MessageToDict(
        message,
        preserving_proto_field_name=True,  # type: ignore[arg-type]
        always_print_fields_with_no_presence=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    handlers = {
        "serve": serve,
        "serve-ray": serve_ray,
        "generate": generate,
        "adapters": adapters,
        "keys": keys,
        "train": train,
    }
    try:
        return handlers[args.command](args)
    except grpc.RpcError as exc:
        sys.stderr.write(f"error: {exc.code().name}: {exc.details()}\n")  # type: ignore[attr-defined]
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
