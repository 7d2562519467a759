"""loraplex on Ray Serve: replicas of the whole server behind Ray's gRPC proxy, routed by
adapter so that each adapter's requests go where it is already loaded.

    client --gRPC--> Ray proxy --> Ingress --handle(multiplexed_model_id=adapter)--> EngineReplica
                                                                                       |
                                                           a LoraplexServer on loopback, in-process

Each replica runs a complete LoraplexServer (engine, adapter tiers, auth, tenancy, errors) and
the ingress forwards every loraplex RPC to one replica as bytes, with the caller's metadata, and
hands back the replica's answer, status and trailing metadata, so an existing loraplex client
works against the cluster and hears what a single server would say. What a replica holds for
itself (its cache counters, pins and merges) is that replica's: an RPC that names no adapter
reaches the replica Ray picks. Routing is Ray Serve's model multiplexing: the ingress names the
request's adapter as its multiplexed model id, and Ray prefers a replica that already holds it
(the replica records that it does once it has served it; the weights themselves move through
the replica's own host and device tiers on first use). A client may also send the id as
`multiplexed_model_id` metadata (e.g. to route compositions). The same ingress serves the
OpenAI-compatible HTTP API behind Ray's HTTP proxy, forwarded and routed the same way
(server/ray_http.py).

The ingress admits each call by the gRPC interceptor's own rule (`admit`: a valid API key for
every RPC, an admin's for the operator RPCs) before it reaches a replica or the store
generation below; the replica checks the caller again and applies tenancy. Ray's proxy takes
messages no larger than the plain server's (`PROXY_ENV`, given to the Serve controller, whose
proxies inherit it).

Replicas share the adapter store (`--adapter-store s3://...` in production; a local directory
on one machine), so an adapter registered through any replica is servable by all of them. Every
registration, push or delete that may have changed the store bumps a cluster-wide store
generation (a small named actor, server/ray_generation.py): one that succeeded or whose outcome
is unknown (a lost replica, a cancelled call), not one refused before it changed anything.
Every request carries the generation the ingress saw, and a replica behind it re-reads the
store before serving, so no replica serves a deleted adapter or an older version once the
change has been answered. A counter that is lost and started again begins a new epoch, which
makes every replica re-read the store once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, cast

import grpc
import ray
import torch
from google.protobuf.message import Message
from ray import serve
from ray.serve.config import ControllerOptions, HTTPOptions, gRPCOptions
from ray.serve.deployment import Deployment
from ray.serve.grpc_util import gRPCInputStream
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from starlette.types import ASGIApp

from loraplex.adapters.sources import EXTRA_BYTES
from loraplex.core.errors import AdapterNotFound
from loraplex.core.model import base_model_id
from loraplex.core.types import AdapterVersion
from loraplex.server import ray_http
from loraplex.server.app import LoraplexServer
from loraplex.server.config import LogConfig, ServerConfig, parse_serve_flags
from loraplex.server.grpc_api.interceptor import REQUEST_ID_KEY, Refusal, admit, request_id_of
from loraplex.server.grpc_api.server import MAX_MESSAGE_BYTES
from loraplex.server.logs import configure_logging
from loraplex.server.ray_generation import GENERATION_ACTOR as GENERATION_ACTOR  # first here
from loraplex.server.ray_generation import UNKNOWN, Generation, Generations
from loraplex.server.ray_generation import StoreGeneration as StoreGeneration  # first here
from loraplex.server.ray_http import HttpCall, HttpPart
from loraplex.server.runtime.auth import KeyRing
from loraplex.v1 import adapters_pb2, inference_pb2

log = logging.getLogger(__name__)

ADAPTER_METADATA = "multiplexed_model_id"
REPLICA_METADATA = "x-loraplex-replica"  # which replica answered (trailing metadata; a header)
LOADS_METADATA = "x-loraplex-replica-adapter-loads"  # its multiplexed adapter loads so far
# Metadata Ray's proxy adds or reads itself; everything else is the caller's and goes on.
_RAY_KEYS = {"application", ADAPTER_METADATA, "request_id", "user-agent"}
Metadata = list[tuple[str, str | bytes]]


class Status(NamedTuple):
    """A call's outcome as it crosses Ray (which carries no grpc objects)."""

    code: int  # the grpc status code's value
    details: str
    trailing: Metadata


UNARY = {
    "Generate": ("Inference", inference_pb2.GenerateResponse),
    "ModelInfo": ("Inference", inference_pb2.ModelInfoResponse),
    "RegisterAdapter": ("Adapters", adapters_pb2.RegisterAdapterResponse),
    "GetAdapter": ("Adapters", adapters_pb2.AdapterInfo),
    "ListAdapters": ("Adapters", adapters_pb2.ListAdaptersResponse),
    "DeleteAdapter": ("Adapters", adapters_pb2.DeleteAdapterResponse),
    "PinAdapter": ("Adapters", adapters_pb2.AdapterInfo),
    "UnpinAdapter": ("Adapters", adapters_pb2.AdapterInfo),
    "GetCacheStats": ("Adapters", adapters_pb2.CacheStats),
    "MergeAdapter": ("Adapters", adapters_pb2.MergeState),
    "UnmergeAdapter": ("Adapters", adapters_pb2.MergeState),
    "GetMergeState": ("Adapters", adapters_pb2.MergeState),
}
# RPCs that change the store: once answered, every replica must see the change.
STORE_CHANGES = frozenset(
    f"/loraplex.v1.Adapters/{name}" for name in ("RegisterAdapter", "PushAdapter", "DeleteAdapter")
)
# What a server answers a change it refused before changing anything (core/errors.py's codes
# of a client's mistake or a refusal); any other failure may have come after the change.
REFUSED = frozenset(
    code.value[0]
    for code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.ALREADY_EXISTS,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.FAILED_PRECONDITION,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.UNIMPLEMENTED,
    )
)
PUSH_PATH = "/loraplex.v1.Adapters/PushAdapter"
STREAM_PATH = "/loraplex.v1.Inference/GenerateStream"
# Ray's proxy listens on every interface, whatever --host says.
PROXY_HOST = "0.0.0.0"
# Ray's proxy takes messages up to 2 GiB by default: the plain server's limit instead. Ray reads
# it where the proxy starts; the Serve controller's environment reaches its proxies.
PROXY_ENV = {"RAY_SERVE_GRPC_MAX_MESSAGE_SIZE": str(MAX_MESSAGE_BYTES)}
SERVICER_FUNCTIONS = [
    "loraplex.v1.inference_pb2_grpc.add_InferenceServicer_to_server",
    "loraplex.v1.adapters_pb2_grpc.add_AdaptersServicer_to_server",
]


class Answer(NamedTuple):
    """A unary (or client-streaming) call's answer as it crosses Ray."""

    payload: bytes  # the serialized response; b"" when the call failed
    status: Status
    # A store change: the store holds another version (or none) of its adapter since the call
    # began, whatever the answer says (a registration may fail after its commit, e.g. its pin).
    changed: bool = False


# Ray's default of 5 requests in flight per replica would keep an engine from batching (and
# spill an adapter's requests to replicas that do not hold it); the engine queues and refuses
# (RESOURCE_EXHAUSTED) by itself.
MAX_ONGOING_REQUESTS = 1024


@serve.deployment(max_ongoing_requests=MAX_ONGOING_REQUESTS)
class EngineReplica:
    """One loraplex server, reached by the ingress through Ray handles (Ray Serve awaits an
    async constructor: the model loads before the replica takes requests)."""

    async def __init__(  # type: ignore[misc]
        self, config: ServerConfig, logs: LogConfig | None = None, created: int | None = None
    ) -> None:
        """`created`: when the application was built, the base model's `created` in the HTTP
        API (the same on every replica)."""
        configure_logging(logs or LogConfig())  # the replica's own process: as `serve`'s
        # Loopback only, no metrics or HTTP port of its own: the replica is reached through Ray.
        local = dataclasses.replace(
            config, host="127.0.0.1", port=0, metrics_port=None, http_port=None
        )
        self.server = LoraplexServer(local)
        await self.server.start()
        await self.server.wait_ready()
        assert self.server.runtime is not None  # ready: the model is loaded
        self.runtime = self.server.runtime
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.http_app = ray_http.replica_app(
            self.server.serving_runtime,
            self.server.keys,
            self.server.metrics.registry,
            int(time.time()) if created is None else created,
        )
        self.blocking_channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        log.info(
            "engine replica %s serving on %d compute threads",
            self.replica_id,
            torch.get_num_threads(),
        )
        self.loads: dict[str, int] = {}
        self.generation: Generation = UNKNOWN  # the store generation this replica has read
        self._sync_lock = asyncio.Lock()
        # Uploads block a thread each on the loopback server, whose own upload handling needs
        # the event loop's default threads: a pool of their own keeps them from starving it.
        self._uploads = ThreadPoolExecutor(4, thread_name_prefix="loraplex-upload")

        async def load(adapter_id: str) -> str:
            """Ray's record that this replica serves `adapter_id` (see the module docstring)."""
            self.loads[adapter_id] = self.loads.get(adapter_id, 0) + 1
            return adapter_id

        # As many adapters as the engine has device slots: Ray forgets the least recently used
        # one when the engine would have evicted it too, and routes by what is resident.
        slots = max(1, self.runtime.info.max_loras)
        self._adapter = serve.multiplexed(max_num_models_per_replica=slots)(load)

    def check_health(self) -> None:
        """Ray Serve's periodic health check: a replica whose device failed for good is
        replaced (its calls answer UNAVAILABLE meanwhile)."""
        if self.runtime.engine.failure is not None:
            raise self.runtime.engine.failure

    async def _sync(self, generation: Generation) -> None:
        """Re-read the store if it changed through another replica since this one read it."""
        epoch, count = generation
        if epoch and epoch == self.generation.epoch and count <= self.generation.changes:
            return
        async with self._sync_lock:
            if not epoch or epoch != self.generation.epoch or count > self.generation.changes:
                await self.runtime.adapters.refresh_store()
                self.generation = generation

    async def _record(self) -> None:
        """Tell Ray this replica serves the request's adapter (once the replica has served it:
        an unknown or forbidden id never takes a place in Ray's table)."""
        adapter_id = serve.get_multiplexed_model_id()
        if adapter_id:
            await self._adapter(adapter_id)

    async def unary(
        self,
        method: str,
        payload: bytes | list[bytes],
        metadata: Metadata,
        generation: Generation = UNKNOWN,
    ) -> Answer:
        """A unary call, or a client-streaming one when `payload` is the list of messages."""
        await self._sync(generation)
        if method not in STORE_CHANGES:
            return await self._call(method, payload, metadata)
        adapter_id = serve.get_multiplexed_model_id()  # the adapter the change names
        held = await asyncio.to_thread(self._held, adapter_id)
        answer = await self._call(method, payload, metadata)
        changed = await asyncio.to_thread(self._held, adapter_id) != held
        return answer._replace(changed=changed)

    def _held(self, adapter_id: str) -> list[AdapterVersion]:
        """The versions of `adapter_id` this replica's store index holds (on a thread: a commit
        holds the index's lock while it writes)."""
        try:
            return self.runtime.adapters.registry.store.versions(adapter_id)
        except AdapterNotFound:
            return []

    async def _call(self, method: str, payload: bytes | list[bytes], metadata: Metadata) -> Answer:
        if isinstance(payload, list):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(
                self._uploads, self._upload, method, payload, metadata
            )
        call = self.channel.unary_unary(method)(payload, metadata=metadata)
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            return Answer(b"", self._status(exc.code(), exc.details(), exc.trailing_metadata()))
        await self._record()
        trailing = await call.trailing_metadata()
        return Answer(response, self._status(grpc.StatusCode.OK, "", trailing))

    def _upload(self, method: str, messages: list[bytes], metadata: Metadata) -> Answer:
        """A client-streaming call, on a blocking channel: an asyncio one turns a server's
        answer given before the upload ends (a refusal) into INTERNAL."""
        try:
            response, call = self.blocking_channel.stream_unary(method).with_call(
                iter(messages), metadata=metadata
            )
        except grpc.RpcError as exc:
            failed = cast(grpc.Call, exc)
            status = self._status(failed.code(), failed.details(), failed.trailing_metadata())
            return Answer(b"", status)
        return Answer(response, self._status(grpc.StatusCode.OK, "", call.trailing_metadata()))

    async def stream(
        self, method: str, payload: bytes, metadata: Metadata, generation: Generation = UNKNOWN
    ) -> AsyncIterator[bytes | Status]:
        """The response messages, then the status."""
        await self._sync(generation)
        call = self.channel.unary_stream(method)(payload, metadata=metadata)
        try:
            first = True
            async for message in call:
                if first:
                    await self._record()
                    first = False
                yield message
        except grpc.aio.AioRpcError as exc:
            yield self._status(exc.code(), exc.details(), exc.trailing_metadata())
            return
        yield self._status(grpc.StatusCode.OK, "", await call.trailing_metadata())

    async def http(
        self, call: HttpCall, generation: Generation = UNKNOWN
    ) -> AsyncIterator[HttpPart]:
        """An HTTP call on this replica's own HTTP app (server/ray_http.py): its head, its body
        as the app sends it, then its end."""
        await self._sync(generation)
        adapter_id = serve.get_multiplexed_model_id()  # a load or unload: the adapter it names
        changes = call.endpoint in ray_http.STORE_CHANGES
        held = await asyncio.to_thread(self._held, adapter_id) if changes else []
        async for part in ray_http.serve_locally(self.http_app, call):
            if isinstance(part, ray_http.HttpHead) and 200 <= part.status < 300:
                await self._record()
                # Only on answers: which replica refused would tell which one holds another
                # tenant's adapter (Ray routes by the name before tenancy is checked).
                replica = (REPLICA_METADATA.encode(), self.replica_id.encode())
                part = part._replace(headers=[*part.headers, replica])
            yield part
        yield ray_http.HttpEnd(changes and await asyncio.to_thread(self._held, adapter_id) != held)

    def _status(self, code: grpc.StatusCode, details: str | None, trailing: Any) -> Status:
        pairs: Metadata = [
            (str(k), v if str(k).endswith("-bin") else str(v)) for k, v in (trailing or ())
        ]
        pairs.append((REPLICA_METADATA, self.replica_id))
        pairs.append((LOADS_METADATA, str(sum(self.loads.values()))))
        return Status(code.value[0], details or "", pairs)


def _forwarded(grpc_context: Any) -> Metadata:
    metadata: Sequence[tuple[str, Any]] = grpc_context.invocation_metadata() or ()
    return [(k, v) for k, v in metadata if k not in _RAY_KEYS and not k.startswith(":")]


def _adapter_of(request: Any, grpc_context: Any) -> str:
    """The adapter a request is routed by: the one it names, else the caller's
    `multiplexed_model_id` metadata. A generate request that names none and composes none is
    also served with the metadata's adapter (`_take_metadata_adapter`)."""
    named = str(getattr(request, "adapter_id", "") or getattr(request, "name", ""))
    return named or str(dict(grpc_context.invocation_metadata() or ()).get(ADAPTER_METADATA, ""))


def _take_metadata_adapter(request: Any, adapter_id: str) -> None:
    """The metadata is another way to give a generate request's `adapter_id`."""
    if (
        isinstance(request, inference_pb2.GenerateRequest)
        and not request.adapter_id
        and not request.HasField("compose")
    ):
        request.adapter_id = adapter_id


def _answer(grpc_context: Any, status: Status) -> None:
    code, details, trailing = status
    grpc_context.set_code(_CODES[code])
    if details:
        grpc_context.set_details(details)
    grpc_context.set_trailing_metadata(trailing)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def _replica_lost(exc: ray.exceptions.RayActorError) -> Status:
    """The answer for a request whose replica died under it: UNAVAILABLE, which clients retry
    (Ray Serve starts a new replica; the others keep serving)."""
    log.warning("engine replica lost with a request in flight: %s", exc)
    return Status(
        grpc.StatusCode.UNAVAILABLE.value[0], "engine replica lost; retry the request", []
    )


def _may_have_changed(answer: Answer) -> bool:
    """Whether a store change answered so may have changed the store: it did, or it succeeded,
    or it failed in a way that may have come after its commit."""
    return answer.changed or answer.status.code not in REFUSED


def _unary_method(name: str, service: str, response_type: type[Message]) -> Any:
    path = f"/loraplex.v1.{service}/{name}"

    async def method(self: IngressReplica, request: Any, grpc_context: Any) -> Any:
        refusal = self._refusal(path, grpc_context)
        if refusal is not None:
            _answer(grpc_context, refusal)
            return response_type()
        adapter_id = _adapter_of(request, grpc_context)
        _take_metadata_adapter(request, adapter_id)
        answer = await self.forward(
            name, path, request.SerializeToString(), grpc_context, adapter_id
        )
        _answer(grpc_context, answer.status)
        return response_type.FromString(answer.payload) if answer.payload else response_type()

    method.__name__ = name
    return method


class IngressReplica:
    """Ray's gRPC proxy calls the ingress method named after each RPC: the unary ones are
    added below from UNARY; PushAdapter (client streaming) and GenerateStream are here. Each
    first admits the caller (`_refusal`), then forwards. Ray's HTTP proxy calls its ASGI app
    (`__serve_build_asgi_app__`)."""

    def __init__(self, replica: DeploymentHandle, config: ServerConfig) -> None:
        self.replica = replica
        self.generations = Generations()
        # Without keys (--insecure) every caller is admitted, as by the plain server. The key
        # file is read again when it changed (looked at every --auth-keys-reload-s, on a call):
        # a revoked key stops working without a redeploy.
        self.keys = KeyRing.from_file(config.auth_keys) if config.auth_keys else None
        self._reload_s = config.auth_keys_reload_s
        self._keys_checked = time.monotonic()
        # An upload is gathered here before a replica sees it: no larger than it would take.
        self.max_upload_bytes = config.engine.max_adapter_bytes + EXTRA_BYTES
        self.base_model_id = base_model_id(config.model)
        self.serves_http = config.http_port is not None

    def __serve_build_asgi_app__(self) -> ASGIApp:
        """The app Ray's HTTP proxy hands every HTTP call to (Ray Serve asks for it once the
        ingress is built): the OpenAI-compatible API, forwarded (server/ray_http.py)."""
        http = None
        if self.serves_http:
            http = ray_http.HttpIngress(self.replica, self.generations, self.base_model_id)
        return ray_http.ingress_app(http, self.keys, self._reload_keys)

    def _refusal(self, path: str, grpc_context: Any) -> Status | None:
        """The interceptor's own answer to a caller who may not call `path`, given before
        anything of the call reaches a replica or the store generation; None: admitted."""
        metadata = grpc_context.invocation_metadata()
        self._reload_keys()
        outcome = admit(self.keys, path, metadata)
        if not isinstance(outcome, Refusal):
            return None
        trailing: Metadata = [(REQUEST_ID_KEY, request_id_of(metadata))]
        return Status(outcome.code.value[0], outcome.message, trailing)

    def _reload_keys(self) -> None:
        """Re-read the key file if it changed, at most every --auth-keys-reload-s (a small
        file: read on the call that finds the interval over)."""
        now = time.monotonic()
        if self.keys is None or self._reload_s <= 0 or now - self._keys_checked < self._reload_s:
            return
        self._keys_checked = now
        self.keys.refresh()

    async def forward(
        self, name: str, path: str, payload: bytes | list[bytes], grpc_context: Any, adapter_id: str
    ) -> Answer:
        """One unary (or, with a list of messages, client-streaming) call on a replica."""
        handle = self.replica.options(multiplexed_model_id=adapter_id)
        generation = await self.generations.current()
        answer = None  # None: the outcome is unknown (a lost replica, a cancelled call)
        try:
            answer = cast(
                Answer,
                await handle.unary.remote(path, payload, _forwarded(grpc_context), generation),
            )
            return answer
        except ray.exceptions.RayActorError as exc:
            return Answer(b"", _replica_lost(exc))
        except ray.exceptions.RayTaskError as exc:
            log.error("engine replica failed on %s: %s", name, exc)
            failed = Status(grpc.StatusCode.INTERNAL.value[0], f"{name} failed on its replica", [])
            return Answer(b"", failed)
        finally:
            # A change may have reached the store even when its answer did not reach us; one
            # the replica refused before changing anything did not.
            if path in STORE_CHANGES and (answer is None or _may_have_changed(answer)):
                await asyncio.shield(self.generations.bump())

    async def PushAdapter(  # noqa: N802 (the RPC's name)
        self, requests: gRPCInputStream, grpc_context: Any
    ) -> adapters_pb2.RegisterAdapterResponse:
        """The upload is gathered here, then sent to one replica in a single call (Ray handles
        take no streamed arguments)."""
        refusal = self._refusal(PUSH_PATH, grpc_context)
        messages, size = [], 0
        if refusal is None:
            async for message in requests:
                size += len(message.data)
                if size > self.max_upload_bytes:
                    too_large = (
                        f"the upload is larger than the limit of {self.max_upload_bytes} bytes"
                    )
                    refusal = Status(grpc.StatusCode.INVALID_ARGUMENT.value[0], too_large, [])
                    break
                messages.append(message.SerializeToString())
        if refusal is None and requests.is_cancelled():
            refusal = Status(grpc.StatusCode.CANCELLED.value[0], "the upload was cancelled", [])
        if refusal is not None:
            _answer(grpc_context, refusal)
            return adapters_pb2.RegisterAdapterResponse()
        first = adapters_pb2.PushAdapterRequest.FromString(messages[0] if messages else b"")
        adapter_id = _adapter_of(first, grpc_context)
        answer = await self.forward("PushAdapter", PUSH_PATH, messages, grpc_context, adapter_id)
        _answer(grpc_context, answer.status)
        return adapters_pb2.RegisterAdapterResponse.FromString(answer.payload)

    async def GenerateStream(  # noqa: N802 (the RPC's name)
        self, request: inference_pb2.GenerateRequest, grpc_context: Any
    ) -> AsyncIterator[inference_pb2.GenerateResponse]:
        refusal = self._refusal(STREAM_PATH, grpc_context)
        if refusal is not None:
            _answer(grpc_context, refusal)
            raise StreamFailed(refusal.details)
        adapter_id = _adapter_of(request, grpc_context)
        _take_metadata_adapter(request, adapter_id)
        handle = self.replica.options(multiplexed_model_id=adapter_id, stream=True)
        generation = await self.generations.current()
        items = cast(
            DeploymentResponseGenerator,
            handle.stream.remote(
                STREAM_PATH, request.SerializeToString(), _forwarded(grpc_context), generation
            ),
        )
        # Ray's proxy sends the call's status along with each message (and with nothing else),
        # so the last message, the one with a finish reason, waits for the status that follows
        # it at once; an error with no message left to carry it ends the stream by raising,
        # which keeps its code and details (Ray drops trailing metadata there).
        last = None
        try:
            async for item in items:
                if not isinstance(item, bytes):
                    _answer(grpc_context, item)
                    if last is None and item.code != grpc.StatusCode.OK.value[0]:
                        raise StreamFailed(item.details)
                    break
                message = inference_pb2.GenerateResponse.FromString(item)
                if message.finish_reason:
                    last = message
                else:
                    yield message
        except ray.exceptions.RayActorError as exc:
            _answer(grpc_context, _replica_lost(exc))
            raise StreamFailed("engine replica lost") from exc
        if last is not None:
            yield last


class StreamFailed(Exception):
    """Ends a forwarded stream with the status already set on its context."""


for _name, (_service, _response_type) in UNARY.items():
    setattr(IngressReplica, _name, _unary_method(_name, _service, _response_type))
Ingress = serve.deployment(
    # No CPU reserved (like Ray's own proxy): it forwards bytes, and a reservation could leave
    # it unschedulable where the engine replicas take every core (e.g. 2 of 2).
    name="Ingress",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
)(serve.ingress()(IngressReplica))


def proxy_options(port: int, http_port: int | None = None) -> dict[str, Any]:
    """`serve.start`'s arguments for loraplex: Ray's gRPC proxy on `port` serving the loraplex
    services, and taking no message larger than the plain server does (`PROXY_ENV`); with
    `http_port`, Ray's HTTP proxy on it, on every interface, for the OpenAI-compatible API
    (without, it stays where Ray puts it by default: loopback, port 8000)."""
    options: dict[str, Any] = {
        "grpc_options": gRPCOptions(port=port, grpc_servicer_functions=SERVICER_FUNCTIONS),
        "controller_options": ControllerOptions(runtime_env={"env_vars": PROXY_ENV}),
    }
    if http_port is not None:
        options["http_options"] = HTTPOptions(host=PROXY_HOST, port=http_port)
    return options


def check_config(config: ServerConfig) -> None:
    """What Ray Serve cannot serve as the plain server would: raises ValueError. Ray's proxies
    listen on every interface, so no key file needs --insecure (whatever --host says), and
    they serve plaintext, so a key file needs --allow-plaintext-keys: TLS must end in front
    of them."""
    try:
        config.check_authentication(PROXY_HOST)
    except ValueError as exc:
        raise ValueError(
            f"{exc} (Ray Serve's gRPC and HTTP proxies listen on every interface)"
        ) from None
    if config.tls_cert or config.tls_client_ca:
        raise ValueError(
            "Ray Serve's gRPC proxy serves plaintext: terminate TLS in front of it (a load "
            "balancer or Kubernetes ingress) and leave the --tls-* flags off"
        )
    if config.auth_keys is not None and not config.allow_plaintext_keys:
        raise ValueError(
            "Ray Serve's gRPC and HTTP proxies listen on every interface and serve plaintext, "
            "where anyone on the path can read the API keys: terminate TLS in front of them "
            "(a load balancer or Kubernetes ingress) and say so with --allow-plaintext-keys"
        )


def build_app(
    config: ServerConfig,
    replicas: int | str = 2,
    replica_cpus: float = 1.0,
    logs: LogConfig | None = None,
) -> Any:
    """The application: an ingress and `replicas` engine replicas of `replica_cpus` CPUs each
    (Ray gives a replica as many compute threads), or "auto": autoscaled (the deployment's
    `autoscaling_config`, e.g. from deploy/ray/rayservice.yaml); `logs` is the replicas' log
    (level, format). Run it with `serve.run` after `serve.start(**proxy_options(port,
    http_port))`. Refuses (ValueError) what `check_config` refuses."""
    check_config(config)
    engine = cast(Deployment, EngineReplica).options(
        num_replicas=replicas, ray_actor_options={"num_cpus": replica_cpus}
    )
    return Ingress.bind(engine.bind(config, logs, int(time.time())), config)


def app_builder(args: dict[str, Any]) -> Any:
    """For Ray Serve config files (`serve run` / `serve deploy`, KubeRay's RayService):
    `args` holds `replicas` (a number, or "auto"), `replica_cpus`, `serve_flags`, the flags
    `loraplex serve` takes (a list), and `insecure` (true: the same as `--insecure` among
    them). Without `--auth-keys` or that opt-out, or with keys but without
    `--allow-plaintext-keys` (Ray's proxies serve plaintext: TLS ends in front of them), it
    refuses to build (ValueError), as `loraplex serve-ray` does."""
    flags = [str(f) for f in args.get("serve_flags", [])]
    insecure = args.get("insecure", False)
    if not isinstance(insecure, bool):
        raise ValueError(f"insecure must be true or false, got {insecure!r}")
    config, logs = parse_serve_flags([*flags, "--insecure"] if insecure else flags)
    replicas = args.get("replicas", 2)
    cpus = float(args.get("replica_cpus", 1))
    return build_app(config, "auto" if replicas == "auto" else int(replicas), cpus, logs)
