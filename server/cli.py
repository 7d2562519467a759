"""The `loraplex` command: serve, generate, and manage adapters."""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
from google.protobuf.json_format import MessageToDict

from loraplex.adapters.config import ExportConfig
from loraplex.core.options import add_options, build
from loraplex.server.config import (
    DEFAULT_PORT,
    LogConfig,
    RayConfig,
    ServerConfig,
    add_serve_options,
)
from loraplex.server.logs import configure_logging
from loraplex.server.preload import loaded_runtime_libraries, reexec_with_runtime_libraries
from loraplex.training.config import add_arguments as add_train_arguments

if TYPE_CHECKING:
    from loraplex.server.client import LoraplexClient
    from loraplex.v1 import adapters_pb2

log = logging.getLogger("loraplex")

DEFAULT_ADDRESS = f"localhost:{DEFAULT_PORT}"
HELP_WIDTH = 100  # docs/options.md is --help at this width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description=__doc__)
    add_options(parser, LogConfig)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="serve the base model and its adapters over gRPC",
        description="Serve the base model and its adapters over gRPC. Every flag is a field "
        "of loraplex.server.config.ServerConfig.",
    )
    add_serve_options(serve)
    on_ray = sub.add_parser(
        "serve-ray",
        help="serve on a Ray cluster: engine replicas routed by adapter, behind Ray's gRPC and "
        "HTTP proxies",
        description="Takes every `serve` flag (--port is the Ray gRPC proxy's port, --http-port "
        "its HTTP proxy's); each replica is a whole loraplex server, and replicas share "
        "--adapter-store.",
    )
    add_serve_options(on_ray)
    add_options(on_ray, RayConfig)

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
    add_options(export, ExportConfig)
    train_parser = sub.add_parser(
        "train",
        help="train a LoRA/QLoRA adapter on a JSONL dataset (see training/config.py)",
        description="Every key of the YAML config is also a flag; flags win.",
    )
    add_train_arguments(train_parser)
    keys = sub.add_parser("keys", help="API keys for the server's key file")
    key_verbs = keys.add_subparsers(dest="verb", required=True)
    new = key_verbs.add_parser(
        "new",
        help="make an API key: the key once on stderr (for its client), the [[keys]] entry "
        "for the key file on stdout",
        description="loraplex keys new --name N --tenant T >> keys.toml: the entry (the key's "
        "sha256, never the key) goes to stdout, so into the key file; the key itself goes to "
        "stderr, for the terminal, and is stored nowhere.",
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
    with _client_for(config.register) as client:
        reply = client.push(adapter_id, adapter)
    sys.stdout.write(json.dumps(_as_dict(reply), indent=2) + "\n")
    return 0


def serve_ray(args: argparse.Namespace) -> int:
    import ray  # heavy imports only when serving
    from ray import serve as ray_serve

    from loraplex.server.ray_serve import build_app, check_config, proxy_options

    config = server_config(args)
    ray_config = build(RayConfig, args)
    try:
        check_config(config)  # before Ray starts: no key file needs --insecure
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    ray.init(address=ray_config.ray_address or None)
    ray_serve.start(**proxy_options(config.port, config.http_port))
    http = "off" if config.http_port is None else f"on port {config.http_port}"
    log.info("loraplex on Ray Serve: %d replicas, gRPC on port %d, HTTP %s", ray_config.replicas,
             config.port, http)  # fmt: skip
    app = build_app(config, ray_config.replicas, ray_config.replica_cpus, build(LogConfig, args))
    ray_serve.run(app, name="loraplex", blocking=True)
    return 0


def _client_for(address: str) -> LoraplexClient:
    """A client for `address` with the key and CA from the environment."""
    from loraplex.server.client import LoraplexClient

    ca = os.environ.get("LORAPLEX_TLS_CA")
    return LoraplexClient(
        address, 300, api_key=os.environ.get("LORAPLEX_API_KEY"), tls_ca=_path(ca)
    )


def keys(args: argparse.Namespace) -> int:
    from loraplex.server.runtime.auth import hash_key, is_identifier, new_key

    for flag, value in (("--name", args.name), ("--tenant", args.tenant)):
        if not is_identifier(value):
            raise SystemExit(
                f"error: {flag} {value!r}: lower-case letters, digits, '.', '_' and '-' only"
            )
    key = new_key()
    # The key to the terminal (stderr), the entry to stdout: `>> keys.toml` appends only what
    # the key file should hold.
    sys.stderr.write(
        f"API key {args.name!r} (give it to its client; shown once, stored nowhere):\n{key}\n"
    )
    sys.stderr.flush()
    sys.stdout.write(
        f'[[keys]]\nname = "{args.name}"\ntenant = "{args.tenant}"\nrole = "{args.role}"\n'
        f'sha256 = "{hash_key(key)}"\n\n'
    )
    return 0


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The server's configuration from `serve`'s flags (the edge: the environment is read)."""
    try:
        return build(ServerConfig, args, os.environ)  # type: ignore[no-any-return]
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def serve(args: argparse.Namespace) -> int:
    config = server_config(args)
    if config.preload:  # before torch loads: the allocator and OpenMP runtime come first
        reexec_with_runtime_libraries()
    from loraplex.server.app import LoraplexServer  # heavy imports only when serving

    log.info("preloaded: %s", ", ".join(loaded_runtime_libraries()) or "nothing")

    async def run() -> None:
        server = LoraplexServer(config)
        await server.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        reloads: set[asyncio.Task[bool]] = set()

        def reload_keys() -> None:  # SIGHUP: re-read the API key file, without a restart
            task = loop.create_task(server.reload_keys())
            reloads.add(task)
            task.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, reload_keys)
        waiter = asyncio.create_task(stop.wait())
        ready = asyncio.create_task(server.wait_ready())
        done, _ = await asyncio.wait({waiter, ready}, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            ready.result()  # raises if the model failed to load
            await waiter
        log.info("shutting down: in-flight requests get %g s", config.drain_seconds)
        await server.stop(grace=config.drain_seconds)

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
    """`adapters export`: local, on the store the server uses; no server needed."""
    from loraplex.adapters.export import MANIFEST_FILE, export_adapter
    from loraplex.core.errors import AdapterError

    try:
        out = export_adapter(build(ExportConfig, args, os.environ))
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


def options_markdown() -> str:
    """docs/options.md: the --help of every verb (`make docs` writes it; a test checks it)."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    sections = [
        "# Command-line options\n\n"
        f"Generated from `loraplex --help` by `make docs` with Python {python} (a test fails\n"
        "when it is stale). The flags of `serve`, `serve-ray` and `adapters export` are the\n"
        "fields of their config dataclasses (loraplex.server.config, loraplex.adapters.config,\n"
        "loraplex.core.config): the help of each is the docstring under its field.\n"
    ]
    for prog, parser in _parsers(build_parser()):
        parser.formatter_class = functools.partial(argparse.HelpFormatter, width=HELP_WIDTH)
        sections.append(f"## `{prog}`\n\n```text\n{parser.format_help().rstrip()}\n```\n")
    return "\n".join(sections)


def _parsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """`parser` and its subcommands' parsers, depth first (aliases once)."""
    yield parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            seen: set[int] = set()
            for sub in action.choices.values():
                if id(sub) not in seen:
                    seen.add(id(sub))
                    yield from _parsers(sub)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        logs = build(LogConfig, args, os.environ)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    configure_logging(logs)
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
