"""loraplex on Ray Serve: two engine replicas behind Ray's gRPC proxy, a stock loraplex client,
eight adapters in a shared store, API keys of three tenants.

- Requests are routed by adapter: each adapter's requests land on the replica that loaded it,
  so replicas load far fewer adapters than they serve requests.
- Registrations, pushes and deletes reach every replica.
- Auth, tenancy and backpressure are the single server's, answered through the proxy; a call
  refused there reaches no replica and leaves the store generation where it was, and the
  proxy takes no message larger than the single server does.
- A replica killed under load loses only its own requests (UNAVAILABLE, retryable); the
  cluster keeps serving.
- The OpenAI-compatible API through Ray's HTTP proxy, with OpenAI's own client: the same keys,
  routing by model, streams, load/unload reaching every replica, and a client that goes away
  ending its replica's request.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai
import pytest

from loraplex.core.config import ModelConfig
from loraplex.server.client import LoraplexClient
from loraplex.server.config import EngineConfig, MergeSettings, ServerConfig
from loraplex.server.runtime.auth import new_key
from loraplex.v1 import adapters_pb2
from loraplex.v1 import inference_pb2 as pb
from tests.helpers import write_key_file

ray = pytest.importorskip("ray", reason="Ray Serve is a dev dependency")
pytestmark = pytest.mark.e2e

PORT = 9613
HTTP_PORT = 9614
# How long Ray takes to route by where a new multiplexed id was first served (the replica
# reports it, the ingress's router hears it); a request sooner may go to another replica,
# which then holds it too.
SETTLE_S = 3
KEYS = {  # name: (tenant, role)
    "admin": ("acme", "admin"),
    "client": ("acme", "client"),
    "globex": ("globex", "client"),
    "capped": ("capped", "client"),
}
NAMES = [f"tenant-adapter-{i}" for i in range(8)]


@pytest.fixture(scope="module")
def cluster(model_home, adapter_root, tmp_path_factory, peft_reference):
    """(proxy address, API keys by name). Tenant "capped" may run one request at a time (per
    replica: tenant limits are each replica's own)."""
    import ray
    from ray import serve

    from loraplex.server.ray_serve import build_app, proxy_options

    tmp = tmp_path_factory.mktemp("ray")
    keys = write_key_file(tmp / "keys.toml", KEYS, "[tenants.capped]\nmax_concurrent = 1\n")
    config = ServerConfig(
        adapter_roots=(adapter_root,),
        adapter_store=tmp / "shared-store",
        auth_keys=tmp / "keys.toml",
        allow_plaintext_keys=True,  # loopback here; Ray's proxies serve plaintext
        model=ModelConfig(home=model_home),
        # Requests here are compared token for token (a stream with its non-streamed twin, one
        # adapter with its copy pushed for a tenant), so no automatic merge and no prefix cache:
        # either changes a later request's bf16 rounding, which tips a near tie (the adapter's
        # first token on the chat below is one bf16 step from its second). tests/integration
        # does the same and covers both against PEFT.
        engine=EngineConfig(
            max_loras=6, max_batch_size=8, merge=MergeSettings(policy="off"), prefix_cache=False
        ),
        http_port=HTTP_PORT,
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(**proxy_options(PORT, HTTP_PORT))
    serve.run(build_app(config, replicas=2), name="loraplex")
    yield f"localhost:{PORT}", keys
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def registered(cluster, peft_reference) -> list[str]:
    """The eight adapters, registered (through whichever replica) from the three PEFT dirs."""
    address, keys = cluster
    sources = list(peft_reference[2].values())
    with LoraplexClient(address, timeout=120, api_key=keys["admin"]) as admin:
        for i, name in enumerate(NAMES):
            assert admin.register(name, str(sources[i % len(sources)])).adapter.version == 1
    return NAMES


def generate(client: LoraplexClient, adapter_id: str) -> tuple[pb.GenerateResponse, dict]:
    request = pb.GenerateRequest(adapter_id=adapter_id, prompt="Hello", max_new_tokens=3)
    response, call = client.inference.Generate.with_call(
        request, timeout=120, metadata=client.metadata
    )
    return response, dict(call.trailing_metadata())


def test_a_stock_client_is_routed_by_adapter(cluster, registered):
    from loraplex.server.ray_serve import LOADS_METADATA, REPLICA_METADATA

    address, keys = cluster
    with LoraplexClient(address, timeout=120, api_key=keys["admin"]) as client:
        assert client.model_info().model_id  # an unchanged client, through the proxy
        with pytest.raises(grpc.RpcError) as err:
            client.get("never-registered")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # the replica's own status
        for name in registered:  # first request of each adapter: a replica loads it
            generate(client, name)
        work = [name for name in registered for _ in range(5)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda n: (n, *generate(client, n)), work))
        request = pb.GenerateRequest(adapter_id=registered[0], prompt="Hi", max_new_tokens=3)
        stream = list(client.generate_stream(request))
        assert stream[-1].finish_reason and stream[-1].adapter_id == registered[0]
        # The adapter may also come as `multiplexed_model_id` metadata instead of adapter_id.
        named, _ = generate(client, registered[1])
        unnamed = pb.GenerateRequest(prompt="Hello", max_new_tokens=3)
        metadata = (*client.metadata, ("multiplexed_model_id", registered[1]))
        reply = client.inference.Generate(unnamed, timeout=120, metadata=metadata)
        assert (reply.adapter_id, reply.text) == (registered[1], named.text)
        streamed = list(client.inference.GenerateStream(unnamed, timeout=120, metadata=metadata))
        assert streamed[-1].adapter_id == registered[1]
    where: dict[str, Counter[str]] = defaultdict(Counter)
    loads: dict[str, int] = {}
    for name, response, trailing in replies:
        assert response.adapter_id == name and response.usage.completion_tokens >= 1
        replica = trailing[REPLICA_METADATA]
        where[name][replica] += 1
        loads[replica] = max(loads.get(replica, 0), int(trailing[LOADS_METADATA]))
    assert len(loads) == 2, f"only one replica served: {dict(where)}"
    # Affinity: each adapter's requests land (mostly) on one replica...
    for name, counts in where.items():
        assert counts.most_common(1)[0][1] >= 4, (name, dict(counts))
    # ...so the replicas loaded far fewer adapters than they served requests.
    assert sum(loads.values()) <= 12 < len(work), loads


def listings(client: LoraplexClient) -> list[tuple[dict[str, int], str]]:
    """ListAdapters 16 times: (adapter id -> version, replica) of each answer. ListAdapters
    names no adapter, so Ray spreads it over both replicas."""
    from loraplex.server.ray_serve import REPLICA_METADATA

    found = []
    for _ in range(16):
        reply, call = client.adapters.ListAdapters.with_call(
            adapters_pb2.ListAdaptersRequest(), timeout=60, metadata=client.metadata
        )
        replica = dict(call.trailing_metadata())[REPLICA_METADATA]
        found.append(({a.adapter_id: a.version for a in reply.adapters}, replica))
    return found


def test_new_versions_and_deletes_reach_every_replica(cluster, peft_reference):
    """Once a registration, push or delete is answered, no replica shows the old state."""
    address, keys = cluster
    _, _, dirs = peft_reference
    sources = list(dirs.values())
    with LoraplexClient(address, timeout=120, api_key=keys["admin"]) as client:
        for version, source in enumerate(sources, start=1):
            if version == 2:  # PushAdapter (client streaming) through the proxy
                assert client.push("moving", source).adapter.version == version
            else:
                assert client.register("moving", str(source)).adapter.version == version
            seen = listings(client)
            assert {held.get("moving") for held, _ in seen} == {version}
            assert len({replica for _, replica in seen}) == 2  # both replicas were asked
            assert generate(client, "moving")[0].adapter_version == version
        client.delete("moving")
        assert all("moving" not in held for held, _ in listings(client))
        with pytest.raises(grpc.RpcError) as err:
            generate(client, "moving")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


def code_of(call, *args, **kwargs) -> grpc.StatusCode:
    try:
        call(*args, **kwargs)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def store_changes() -> int:
    """The cluster-wide store generation's count of changes."""
    from loraplex.server.ray_serve import GENERATION_ACTOR

    counter = ray.get_actor(GENERATION_ACTOR, namespace="loraplex")
    return ray.get(counter.get.remote(), timeout=30)[1]


def test_auth_and_tenancy_hold_through_the_proxy(cluster, registered, peft_reference):
    address, keys = cluster
    source = next(iter(peft_reference[2].values()))  # the dir behind tenant-adapter-0
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    with (
        LoraplexClient(address, 120) as anonymous,
        LoraplexClient(address, 120, api_key=new_key()) as stranger,
        LoraplexClient(address, 120, api_key=keys["client"]) as acme,
        LoraplexClient(address, 120, api_key=keys["globex"]) as globex,
        LoraplexClient(address, 120, api_key=keys["admin"]) as admin,
    ):
        changes = store_changes()
        for who in (anonymous, stranger):
            assert code_of(who.model_info) == unauthenticated
            assert code_of(generate, who, registered[0]) == unauthenticated
            stream = who.generate_stream(
                pb.GenerateRequest(adapter_id=registered[0], prompt="Hi", max_new_tokens=2)
            )
            assert code_of(list, stream) == unauthenticated
            assert code_of(who.push, "anyone", source) == unauthenticated
            assert code_of(who.register, "anyone", str(source)) == unauthenticated
            assert code_of(who.delete, registered[0]) == unauthenticated
        # Operator RPCs are refused to client keys, the streamed upload included.
        denied = grpc.StatusCode.PERMISSION_DENIED
        assert code_of(acme.push, "acme-pushed", source) == denied
        assert code_of(acme.register, "acme-registered", str(source)) == denied
        assert code_of(acme.delete, registered[0]) == denied
        assert code_of(acme.cache_stats) == denied
        # No refused change moved the store generation (every replica would re-read the store).
        assert store_changes() == changes
        # An admin pushes an adapter for tenant acme: acme's clients use it, globex's cannot
        # see it, and it serves what the same weights registered from the directory serve.
        pushed = admin.push("acme-pushed", source, tenant="acme")
        assert pushed.created and pushed.adapter.version == 1
        text = generate(acme, "acme-pushed")[0].text
        assert text == generate(admin, registered[0])[0].text
        assert code_of(generate, globex, "acme-pushed") == denied
        assert code_of(globex.get, "acme-pushed") == denied
        assert all("acme-pushed" not in held for held, _ in listings(globex))
        assert all(held.get("acme-pushed") == 1 for held, _ in listings(admin))


def test_the_proxy_takes_no_message_larger_than_the_server_does(cluster):
    from loraplex.server.grpc_api.server import MAX_MESSAGE_BYTES

    address, keys = cluster
    with LoraplexClient(address, 120, api_key=keys["admin"]) as client:
        huge = pb.GenerateRequest(prompt="x" * MAX_MESSAGE_BYTES, max_new_tokens=1)
        with pytest.raises(grpc.RpcError) as err:
            client.inference.Generate(huge, timeout=60, metadata=client.metadata)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in err.value.details()


def test_backpressure_is_resource_exhausted_through_the_proxy(cluster):
    """Tenant "capped" may run one request per replica: with a stream running on each replica,
    a third request is refused with RESOURCE_EXHAUSTED and retry advice. A stream's refusal
    keeps its code and details through Ray's proxy; a unary one also its trailing metadata."""
    from google.rpc import error_details_pb2, status_pb2

    address, keys = cluster
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    with LoraplexClient(address, 120, api_key=keys["capped"]) as client:
        admitted, refused = [], []
        for _ in range(6):  # Ray spreads requests that name no adapter by queue length
            stream = client.generate_stream(
                pb.GenerateRequest(prompt="1, 2, 3, 4, 5,", max_new_tokens=400)
            )
            try:
                next(stream)
                admitted.append(stream)
            except grpc.RpcError as exc:
                refused.append(exc)
        assert len(admitted) <= 2 and refused, (len(admitted), refused)
        assert {exc.code() for exc in refused} == {exhausted}, refused
        assert all("retry in" in exc.details() for exc in refused)
        for _ in range(4):  # while both replicas are busy (once both hold a stream)
            try:
                client.generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=1))
            except grpc.RpcError as exc:
                assert exc.code() == exhausted, exc
                trailing = dict(exc.trailing_metadata())
                break
        else:
            raise AssertionError("a one-at-a-time tenant ran a third request at once")
        # A cancel reaches the replica's engine: the tenant's places come back long before
        # the cancelled streams could have finished (up to 400 tokens each).
        for stream in admitted:
            stream.cancel()
        started = time.monotonic()
        while True:
            try:
                client.generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=1))
                break
            except grpc.RpcError as exc:
                assert exc.code() == exhausted, exc
                assert time.monotonic() - started < 10, "a cancelled stream kept its place"
                time.sleep(0.2)
    assert int(trailing["retry-after-ms"]) > 0
    status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
    info = error_details_pb2.RetryInfo()
    assert status.details[0].Unpack(info) and info.retry_delay.ToMilliseconds() > 0


def openai_client(key: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://localhost:{HTTP_PORT}/v1",
        api_key=key,
        max_retries=0,
        timeout=120,
        default_headers=headers or None,
    )


def http_post(path: str, key: str, body: dict) -> int:
    """The status of a plain POST (vLLM's load/unload endpoints are not in OpenAI's client)."""
    import json
    import urllib.error
    import urllib.request

    request = urllib.request.Request(
        f"http://localhost:{HTTP_PORT}{path}",
        data=json.dumps(body).encode(),
        headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def model_listings(api: openai.OpenAI) -> list[set[str]]:
    """GET /v1/models 12 times, from both replicas (it names no adapter: Ray spreads it)."""
    from loraplex.server.ray_serve import REPLICA_METADATA

    found, replicas = [], set()
    for _ in range(12):
        raw = api.models.with_raw_response.list()
        replicas.add(raw.headers[REPLICA_METADATA])
        found.append({m.id for m in raw.parse().data})
    assert len(replicas) == 2, replicas
    return found


def test_the_openai_api_through_the_http_proxy(cluster, registered, peft_reference):
    from loraplex.server.ray_serve import REPLICA_METADATA

    _, keys = cluster
    api = openai_client(keys["admin"])
    models = {m.id: m for m in api.models.list().data}
    [base] = [m for m in models if models[m].parent is None]
    assert set(registered) <= set(models)
    ask = [{"role": "user", "content": "Name three colours."}]
    for model in (base, registered[0]):
        chat = api.chat.completions.create(model=model, messages=ask, max_tokens=6, temperature=0)
        assert chat.model == model and chat.choices[0].message.content
        chunks = list(
            api.chat.completions.create(
                model=model, messages=ask, max_tokens=6, temperature=0, stream=True
            )
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
            chat.choices[0].message.content
        )
    with pytest.raises(openai.AuthenticationError):  # keys on: no valid key, no answer
        openai_client("not-a-key").chat.completions.create(model=base, messages=ask, max_tokens=1)
    # vLLM's load: routed by the adapter's name, and every request for it goes where it is.
    source = str(next(iter(peft_reference[2].values())))
    load = {"lora_name": "over-http", "lora_path": source}
    assert http_post("/v1/load_lora_adapter", keys["admin"], load) == 200
    time.sleep(SETTLE_S)
    homes = set()
    for _ in range(4):
        raw = api.chat.completions.with_raw_response.create(
            model="over-http", messages=ask, max_tokens=2
        )
        homes.add(raw.headers[REPLICA_METADATA])
    assert len(homes) == 1, homes
    assert all("over-http" in ids for ids in model_listings(api))
    # The unload is answered once every replica would serve it no more.
    assert http_post("/v1/unload_lora_adapter", keys["admin"], {"lora_name": "over-http"}) == 200
    assert all("over-http" not in ids for ids in model_listings(api))
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="over-http", messages=ask, max_tokens=2)


def test_a_client_that_leaves_ends_its_request_through_the_http_proxy(cluster):
    """Tenant "capped" may run one request at a time per replica; its requests go to one
    replica (Ray's multiplexing header). A stream its client closes gives the place back long
    before its 4000 tokens could have run."""
    from loraplex.server.ray_serve import REPLICA_METADATA

    _, keys = cluster
    api = openai_client(keys["capped"], serve_multiplexed_model_id="capped-home")
    [base] = [m.id for m in api.models.list().data if m.parent is None]  # where it goes
    time.sleep(SETTLE_S)

    def one() -> str:
        raw = api.completions.with_raw_response.create(model=base, prompt="Hi", max_tokens=1)
        return raw.headers[REPLICA_METADATA]

    stream = api.completions.create(
        model=base, prompt="1, 2, 3,", max_tokens=4000, stream=True, extra_body={"ignore_eos": True}
    )
    next(iter(stream))  # running
    with pytest.raises(openai.RateLimitError):
        one()
    stream.close()  # the client goes away
    started = time.monotonic()
    while True:
        try:
            one()
            break
        except openai.RateLimitError:
            assert time.monotonic() - started < 15, "a closed stream kept its place"
            time.sleep(0.2)


def retried(client: LoraplexClient, adapter_id: str, deadline_s: float = 180) -> str:
    """Generate, retrying UNAVAILABLE (what a client does when a replica is lost)."""
    give_up = time.monotonic() + deadline_s
    while True:
        try:
            return generate(client, adapter_id)[0].text
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                raise
            time.sleep(0.5)


def test_a_killed_replica_loses_only_its_requests(cluster, registered):
    """Streams run on both replicas; one replica is killed. Its streams end UNAVAILABLE (no
    hang), the other replica's streams complete, unary calls end OK or UNAVAILABLE, retries
    succeed, and traffic goes on."""
    from loraplex.server.ray_serve import REPLICA_METADATA

    address, keys = cluster
    with LoraplexClient(address, timeout=120, api_key=keys["admin"]) as client:
        home = {name: generate(client, name)[1][REPLICA_METADATA] for name in registered}
        victim = Counter(home.values()).most_common(1)[0][0]
        streams = []
        for name in registered * 2:
            request = pb.GenerateRequest(
                adapter_id=name, prompt="Count from one to a hundred:", max_new_tokens=96
            )
            stream = client.generate_stream(request)
            next(stream)  # running
            streams.append((name, stream))
        pool = ThreadPoolExecutor(8)  # and unary requests, some still running at the kill
        unary = [pool.submit(code_of, generate, client, name) for name in registered]
        actors = ray.util.list_named_actors(all_namespaces=True)
        [actor] = [a for a in actors if a["name"].endswith(f"EngineReplica#{victim}")]
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)

        survived, lost = Counter(), Counter()
        started = time.monotonic()
        for name, stream in streams:
            try:
                last = list(stream)[-1]
                survived[dict(stream.trailing_metadata())[REPLICA_METADATA]] += 1
                assert last.finish_reason, last  # a stream that ended OK ended whole
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc  # nothing else
                lost[name] += 1
        codes = Counter(future.result(timeout=120) for future in unary)
        pool.shutdown()
        assert time.monotonic() - started < 120  # nothing hung
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
        # The victim's streams in flight were lost (those that ended before the kill may have
        # completed), the other replica's streams completed.
        assert lost and sum(survived.values()) - survived[victim] > 0, (lost, survived)
        assert retried(client, next(iter(lost)))  # the client's retry is served
        # Traffic goes on for every adapter (the victim's go to the survivor or the new one).
        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(lambda name: retried(client, name), registered))
