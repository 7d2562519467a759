"""The HTTP API of the Ray Serve ingress on its own, with stand-ins for Ray: it admits every
call by the plain server's rule before anything reaches a replica or the store generation,
routes a generation by its model, relays streams (and ends one whose replica died with an
error event), cancels the replica's work when the client goes away, and bumps the store
generation only for a load or unload that may have changed the store. And the replica's side:
a call served in-process by an ASGI app, which hears the client go away."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from loraplex.core.model import base_model_id
from loraplex.server.config import ServerConfig
from loraplex.server.http_api.routes import MAX_BODY_BYTES, ClientGone, until_gone
from loraplex.server.http_api.server import ROUTES, Access
from tests.helpers import write_key_file
from tests.server.test_ray_ingress import Counter

ray = pytest.importorskip("ray", reason="Ray Serve is a dev dependency")

BASE = base_model_id(ServerConfig().model)
SSE = (b"content-type", b"text/event-stream; charset=utf-8")
JSON = (b"content-type", b"application/json")


# -- stand-ins for Ray ------------------------------------------------------------------------


class Parts:
    """A DeploymentResponseGenerator stand-in: the parts of a replica's answer, then `then`
    raised, or (`running`) a stream that is still going; records a cancel."""

    def __init__(self, parts: list[Any], then: BaseException | None = None, running=False):
        self.parts, self.then, self.running = list(parts), then, running
        self.cancelled = False

    def __aiter__(self) -> Parts:
        return self

    async def __anext__(self) -> Any:
        if self.parts:
            return self.parts.pop(0)
        if self.then is not None:
            raise self.then
        if self.running:
            await asyncio.Event().wait()
        raise StopAsyncIteration

    def cancel(self) -> None:
        self.cancelled = True


def answer(status: int = 200, body: object = None, changed: bool = False) -> Parts:
    """A replica's whole JSON answer."""
    from loraplex.server.ray_http import HttpEnd, HttpHead

    data = json.dumps({} if body is None else body).encode()
    head = HttpHead(status, [JSON, (b"content-length", str(len(data)).encode())])
    return Parts([head, data, HttpEnd(changed)])


class Forwarded(NamedTuple):
    routed: str  # the multiplexed model id
    call: Any  # the HttpCall


class Replica:
    """The engine replicas' handle: `answer(call)` gives the parts of each answer."""

    def __init__(self) -> None:
        self.forwarded: list[Forwarded] = []
        self.answers: list[Parts] = []
        self.answer = lambda call: answer()

    def options(self, multiplexed_model_id: str = "", stream: bool = False) -> Any:
        assert stream  # every HTTP call is a streamed handle call
        replica = self

        class Http:
            @staticmethod
            def remote(call: Any, generation: Any) -> Parts:
                replica.forwarded.append(Forwarded(multiplexed_model_id, call))
                parts = replica.answer(call)
                replica.answers.append(parts)
                return parts

        return type("Handle", (), {"http": Http})()


# -- an ASGI client -------------------------------------------------------------------------


class Reply(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k == name]


async def call_app(
    app: Any,
    method: str,
    path: str,
    body: object = None,
    headers: dict[str, str] | None = None,
    leave_after: int | None = None,
) -> Reply:
    """One call of `app` as Ray's proxy makes it. `leave_after`: the client goes away after
    that many body chunks (0: while it waits for the answer), and the proxy cancels the app's
    call (as Ray's does)."""
    data = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    raw = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    raw.append((b"content-type", b"application/json"))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": raw,
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }
    received = [{"type": "http.request", "body": data, "more_body": False}]
    gone = asyncio.Event()
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def receive() -> dict[str, Any]:
        if received:
            return received.pop()
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message.get("body"):
            chunks.append(message["body"])
            if leave_after is not None and len(chunks) >= leave_after:
                gone.set()

    task = asyncio.ensure_future(app(scope, receive, send))
    if leave_after is None:
        await task
    else:
        if leave_after == 0:
            await asyncio.sleep(0.05)
            gone.set()
        await gone.wait()
        task.cancel()  # Ray's proxy cancels the call of a client that went away
        await asyncio.gather(task, return_exceptions=True)
    headers_out = [(k.decode().lower(), v.decode()) for k, v in start.get("headers", [])]
    return Reply(start.get("status", 0), headers_out, b"".join(chunks))


def events(reply: Reply) -> list[Any]:
    """The `data:` payloads of a Server-Sent Events body."""
    lines = [e.removeprefix("data: ") for e in reply.body.decode().split("\n\n") if e]
    return [e if e == "[DONE]" else json.loads(e) for e in lines]


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def keys(tmp_path) -> dict[str, str]:
    roles = {"admin": ("t", "admin"), "client": ("t", "client")}
    return write_key_file(tmp_path / "keys.toml", roles)


@pytest.fixture
def make_ingress(monkeypatch):
    """(the ingress's ASGI app, its replicas' handle, its store generation counter)."""
    from loraplex.server import ray_generation, ray_serve

    def make(config: ServerConfig) -> tuple[Any, Replica, Counter]:
        counter, replica = Counter(), Replica()
        monkeypatch.setattr(ray_generation, "generation_actor", lambda: counter)  # no cluster
        ingress = ray_serve.IngressReplica(replica, config)
        return ingress.__serve_build_asgi_app__(), replica, counter

    return make


@pytest.fixture
def ingress(tmp_path, keys, make_ingress):
    return make_ingress(ServerConfig(auth_keys=tmp_path / "keys.toml", http_port=8000))


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def body_for(endpoint: str) -> dict[str, Any] | None:
    """A body each route takes."""
    return {
        "chat": {"model": "a", "messages": [{"role": "user", "content": "hi"}]},
        "completions": {"model": "a", "prompt": "hi"},
        "load_lora_adapter": {"lora_name": "a", "lora_path": "/adapters/a"},
        "unload_lora_adapter": {"lora_name": "a"},
    }.get(endpoint)


def call_route(app: Any, route: Any, headers: dict[str, str]) -> Reply:
    path = route.path.replace("{model_id:path}", "a")
    return asyncio.run(call_app(app, route.method, path, body_for(route.endpoint), headers))


# -- admission ------------------------------------------------------------------------------

# Every route but /metrics (answered by the ingress: each replica counts its own) is forwarded.
FORWARDED = [r for r in ROUTES if r.endpoint != "metrics"]
KEYED = [r for r in FORWARDED if r.access is not Access.OPEN]


@pytest.mark.parametrize("route", KEYED, ids=lambda r: f"{r.method} {r.path}")
@pytest.mark.parametrize("who", [None, "wrong"])
def test_a_caller_without_a_valid_key_reaches_nothing(ingress, route, who):
    app, replica, counter = ingress
    reply = call_route(app, route, {} if who is None else bearer("not-a-key"))
    assert reply.status == 401 and reply.json()["error"]["type"] == "authentication_error"
    assert reply.header("www-authenticate") == ["Bearer"]
    assert (replica.forwarded, counter.calls) == ([], [])  # no replica, no store generation


@pytest.mark.parametrize("route", KEYED, ids=lambda r: f"{r.method} {r.path}")
def test_a_client_key_reaches_only_the_client_routes(ingress, keys, route):
    app, replica, counter = ingress
    reply = call_route(app, route, bearer(keys["client"]))
    if route.access is Access.ADMIN:
        assert reply.status == 403 and "admin key" in reply.json()["error"]["message"]
        assert (replica.forwarded, counter.calls) == ([], [])
    else:
        assert reply.status == 200 and len(replica.forwarded) == 1


@pytest.mark.parametrize("route", FORWARDED, ids=lambda r: f"{r.method} {r.path}")
def test_an_admin_key_reaches_every_route_and_probes_need_none(ingress, keys, route):
    app, replica, _ = ingress
    headers = {} if route.access is Access.OPEN else bearer(keys["admin"])
    assert call_route(app, route, headers).status == 200
    [(_, forwarded)] = replica.forwarded
    assert forwarded.endpoint == route.endpoint
    if headers:  # the replica checks the caller again and applies tenancy
        assert (b"authorization", headers["authorization"].encode()) in forwarded.headers


def test_without_keys_every_caller_is_admitted(make_ingress):
    app, replica, _ = make_ingress(ServerConfig(insecure=True, http_port=8000))
    for route in FORWARDED:
        assert call_route(app, route, {}).status == 200, route
    assert len(replica.forwarded) == len(FORWARDED)


def test_a_revoked_key_stops_working_over_http_too(tmp_path, make_ingress):
    path = tmp_path / "keys.toml"
    keys = write_key_file(path, {"kept": ("t", "client"), "revoked": ("t", "client")})
    app, _, _ = make_ingress(ServerConfig(auth_keys=path, auth_keys_reload_s=0.05, http_port=0))
    models = "GET", "/v1/models"
    assert asyncio.run(call_app(app, *models, headers=bearer(keys["revoked"]))).status == 200
    path.write_text("[[keys]]" + next(p for p in path.read_text().split("[[keys]]") if "kept" in p))
    asyncio.run(asyncio.sleep(0.06))  # the reload interval is over
    assert asyncio.run(call_app(app, *models, headers=bearer(keys["revoked"]))).status == 401
    assert asyncio.run(call_app(app, *models, headers=bearer(keys["kept"]))).status == 200


def test_a_body_over_the_limit_is_refused_before_anything_is_forwarded(ingress, keys):
    app, replica, counter = ingress
    huge = b'{"model": "' + b"x" * MAX_BODY_BYTES + b'"}'
    reply = asyncio.run(call_app(app, "POST", "/v1/chat/completions", huge, bearer(keys["client"])))
    assert reply.status == 400 and reply.json()["error"]["param"] == "body"
    assert (replica.forwarded, counter.calls) == ([], [])


def test_an_unknown_route_is_a_404_in_openai_shape(ingress, keys):
    app, replica, _ = ingress
    reply = asyncio.run(call_app(app, "GET", "/v1/nothing", headers=bearer(keys["client"])))
    assert reply.status == 404 and reply.json()["error"]["type"] == "not_found_error"
    assert replica.forwarded == []


def test_metrics_are_not_one_replicas_passed_off_as_the_clusters(ingress):
    app, replica, _ = ingress
    reply = asyncio.run(call_app(app, "GET", "/metrics"))
    assert reply.status == 404 and "each engine replica" in reply.json()["error"]["message"]
    assert replica.forwarded == []


def test_no_http_serves_no_route(make_ingress):
    app, replica, _ = make_ingress(ServerConfig(insecure=True, http_port=None))
    assert asyncio.run(call_app(app, "GET", "/v1/models")).status == 404
    assert replica.forwarded == []


# -- routing and forwarding -----------------------------------------------------------------


def chat(app: Any, key: str, body: dict[str, Any], headers: dict[str, str] | None = None):
    headers = {**bearer(key), **(headers or {})}
    return asyncio.run(call_app(app, "POST", "/v1/chat/completions", body, headers))


def test_a_generation_is_routed_by_its_model(ingress, keys):
    """An adapter is the multiplexed model id (Ray sends it where the adapter is loaded); the
    base model routes nowhere in particular; a composition goes by Ray's header."""
    app, replica, _ = ingress
    messages = [{"role": "user", "content": "hi"}]
    compose = {"adapters": [{"adapter_id": "a", "weight": 1.0}, {"adapter_id": "b"}]}
    chat(app, keys["client"], {"model": "tenant-adapter", "messages": messages})
    chat(app, keys["client"], {"model": BASE, "messages": messages})
    chat(app, keys["client"], {"model": BASE, "messages": messages, "compose": compose},
         {"serve_multiplexed_model_id": "a+b"})  # fmt: skip
    completion = {"model": "other", "prompt": "hi", "stream": True}
    asyncio.run(call_app(app, "POST", "/v1/completions", completion, bearer(keys["client"])))
    routed = [f.routed for f in replica.forwarded]
    assert routed == ["tenant-adapter", "", "a+b", "other"]
    # The body reaches the replica whole (it answers what it does not take, as ever).
    assert json.loads(replica.forwarded[2].call.body)["compose"] == compose


def test_load_and_unload_are_routed_by_the_adapter_they_name(ingress, keys):
    app, replica, _ = ingress
    for path, body in [
        ("/v1/load_lora_adapter", {"lora_name": "fresh", "lora_path": "/adapters/fresh"}),
        ("/v1/unload_lora_adapter", {"lora_name": "fresh"}),
    ]:
        asyncio.run(call_app(app, "POST", path, body, bearer(keys["admin"])))
    assert [f.routed for f in replica.forwarded] == ["fresh", "fresh"]


def test_the_replicas_answer_is_the_callers_with_one_request_id(ingress, keys):
    """Status, headers and body as the replica's app gave them; the request id the replica
    used is the ingress's, and it is sent back once (Ray's proxy adds the caller's)."""
    app, replica, _ = ingress
    replica.answer = lambda call: answer(429, {"error": {"message": "retry in 2 s"}})
    headers = {**bearer(keys["client"]), "x-request-id": "client-id-1"}
    reply = asyncio.run(call_app(app, "GET", "/v1/models", headers=headers))
    assert reply.status == 429 and reply.json()["error"]["message"] == "retry in 2 s"
    [(_, forwarded)] = replica.forwarded
    assert (b"x-request-id", b"client-id-1") in forwarded.headers
    assert reply.header("x-request-id") == []  # Ray's proxy adds "client-id-1" itself
    made_up = asyncio.run(call_app(app, "GET", "/v1/models", headers=bearer(keys["client"])))
    assert len(made_up.header("x-request-id")) == 1  # no id given: the ingress's, once


# -- streams and clients that go away -------------------------------------------------------


def stream_parts(*data: dict[str, Any], then: BaseException | None = None, running=False):
    from loraplex.server.ray_http import HttpHead

    head = HttpHead(200, [SSE, (b"x-request-id", b"r")])
    chunks = [f"data: {json.dumps(d)}\n\n".encode() for d in data]
    return Parts([head, *chunks], then=then, running=running)


def test_a_stream_is_relayed_and_a_lost_replica_ends_it_with_an_error_event(ingress, keys):
    app, replica, _ = ingress
    lost = ray.exceptions.RayActorError()
    replica.answer = lambda call: stream_parts({"choices": [{"text": "Hel"}]}, then=lost)
    body = {"model": "a", "prompt": "hi", "stream": True}
    reply = asyncio.run(call_app(app, "POST", "/v1/completions", body, bearer(keys["client"])))
    assert reply.status == 200 and reply.header("content-type")[0].startswith("text/event-st")
    first, error, done = events(reply)
    assert first == {"choices": [{"text": "Hel"}]}
    assert error["error"]["code"] == 503 and "retry" in error["error"]["message"]
    assert done == "[DONE]"


def test_a_lost_replica_before_the_answer_is_a_503(ingress, keys):
    app, replica, _ = ingress
    replica.answer = lambda call: Parts([], then=ray.exceptions.RayActorError())
    reply = asyncio.run(call_app(app, "GET", "/v1/models", headers=bearer(keys["client"])))
    assert reply.status == 503
    assert reply.json()["error"]["type"] == "service_unavailable_error"


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_cancels_the_replicas_call(ingress, keys, stream):
    """Mid-stream, or while a whole answer is awaited: the replica's call is cancelled (its
    app then hears the client leave, below), so its generation does not run on."""
    app, replica, _ = ingress
    if stream:
        replica.answer = lambda call: stream_parts({"choices": []}, running=True)
    else:
        replica.answer = lambda call: Parts([], running=True)
    body = {"model": "a", "prompt": "hi", "stream": stream}
    leave_after = 1 if stream else 0
    asyncio.run(call_app(app, "POST", "/v1/completions", body, bearer(keys["client"]), leave_after))
    [parts] = replica.answers
    assert parts.cancelled


# -- the store generation -------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/unload_lora_adapter"])
def test_the_store_generation_moves_only_for_a_change_that_may_have_happened(ingress, keys, path):
    app, replica, counter = ingress
    body = {"lora_name": "a", "lora_path": "/adapters/a"}
    outcomes = [
        (lambda c: answer(400), 0),  # refused: nothing changed
        (lambda c: answer(404), 0),
        (lambda c: answer(200), 1),  # committed
        (lambda c: answer(429, changed=True), 1),  # refused after its commit: it changed
        (lambda c: answer(500), 1),  # unknown
        (lambda c: Parts([], then=ray.exceptions.RayActorError()), 1),  # replica lost: unknown
    ]
    for outcome, bumps in outcomes:
        replica.answer, before = outcome, counter.value
        asyncio.run(call_app(app, "POST", path, body, bearer(keys["admin"])))
        assert counter.value - before == bumps
    before = counter.value  # refused at the ingress: nothing read, nothing moved
    for headers in ({}, bearer(keys["client"])):
        assert asyncio.run(call_app(app, "POST", path, body, headers)).status in (401, 403)
    assert counter.value == before


def test_generations_and_reads_leave_the_store_generation(ingress, keys):
    app, _, counter = ingress
    for route in FORWARDED:
        if route.access is not Access.ADMIN:
            assert call_route(app, route, bearer(keys["client"])).status == 200
    assert "bump" not in counter.calls


# -- the replica's side: a call served in-process -------------------------------------------


def test_a_call_is_served_in_process_head_body_and_all():
    from loraplex.server.ray_http import HttpCall, HttpHead, serve_locally

    async def echo(request: Request) -> Response:
        body = await request.json()
        return JSONResponse({"got": body, "path": request.url.path, "id": request.headers["x"]})

    app = Starlette(routes=[Route("/v1/echo", echo, methods=["POST"])])
    call = HttpCall("chat", "POST", "/v1/echo", b"/v1/echo", "", b"", [(b"x", b"7")], b'{"a":1}')

    async def parts() -> list[Any]:
        return [p async for p in serve_locally(app, call)]

    head, body = asyncio.run(parts())
    assert isinstance(head, HttpHead) and head.status == 200
    assert json.loads(body) == {"got": {"a": 1}, "path": "/v1/echo", "id": "7"}


def test_the_replicas_app_hears_its_client_go_away():
    """Closing the replica's iteration early (Ray cancels it when the ingress's client went)
    ends the app's work: a stream's generator is closed, and a whole answer awaited with
    `until_gone` (as the plain server's generations are) is cancelled."""
    from loraplex.server.ray_http import HttpCall, serve_locally

    ended: list[str] = []

    async def tokens() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"data: {}\n\n"
                await asyncio.sleep(0.01)
        finally:
            ended.append("stream")

    async def work() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            ended.append("work")

    async def stream(request: Request) -> Response:
        return StreamingResponse(tokens(), media_type="text/event-stream")

    async def whole(request: Request) -> Response:
        await request.body()
        try:
            await until_gone(request, work())
        except ClientGone:
            ended.append("gone")
        return Response(status_code=499)

    app = Starlette(routes=[Route("/stream", stream), Route("/whole", whole)])

    async def leave(path: str, after: int) -> list[str]:
        """What ended by the time the replica's call is cancelled, `after` parts in."""
        ended.clear()
        call = HttpCall("x", "GET", path, path.encode(), "", b"", [], b"")
        parts = serve_locally(app, call)
        for _ in range(after):
            await anext(parts)
        task = asyncio.ensure_future(anext(parts))
        await asyncio.sleep(0.05)
        task.cancel()  # as Ray cancels the replica's call...
        await asyncio.gather(task, return_exceptions=True)
        await parts.aclose()  # ...and closes its generator
        return list(ended)  # before the event loop closes whatever is left over

    assert asyncio.run(asyncio.wait_for(leave("/stream", 2), 5)) == ["stream"]
    assert asyncio.run(asyncio.wait_for(leave("/whole", 0), 5)) == ["work", "gone"]


def test_the_http_proxy_listens_where_the_grpc_proxy_does():
    from loraplex.server.ray_serve import PROXY_HOST, proxy_options

    options = proxy_options(9000, 8000)
    assert (options["http_options"].host, options["http_options"].port) == (PROXY_HOST, 8000)
    assert "http_options" not in proxy_options(9000)  # --no-http: Ray's loopback default
