"""Authentication and roles on a server with an API key file, served over TLS: every RPC the
server offers (found through reflection) refuses a call without a valid key."""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import ssl
import time

import grpc
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from loraplex.core.config import ModelConfig
from loraplex.server.client import LoraplexClient
from loraplex.server.config import EngineConfig, ServerConfig
from loraplex.server.grpc_api.interceptor import ADMIN_METHODS, CLIENT_METHODS, EXEMPT_PREFIXES
from loraplex.server.http_api.server import ROUTES, Access
from loraplex.v1 import inference_pb2 as pb
from tests.helpers import ServerThread, write_key_file

pytestmark = pytest.mark.integration


def self_signed(tmp_path):
    """A certificate for 127.0.0.1 and its key (PEM files)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "loraplex-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


KEYS = {  # name: (tenant, role)
    "client": ("acme", "client"),
    "admin": ("acme", "admin"),
    "globex": ("globex", "client"),
    "capped": ("capped", "client"),
}


@pytest.fixture(scope="module")
def secured(model_home, tmp_path_factory):
    """A TLS server with client keys of three tenants and an admin key; yields (server, keys,
    ca path). Tenant "capped" may have one request in flight and 600 tokens a minute."""
    tmp = tmp_path_factory.mktemp("auth")
    keys = write_key_file(
        tmp / "keys.toml", KEYS, "[tenants.capped]\nmax_concurrent = 1\ntokens_per_minute = 600\n"
    )
    cert, key = self_signed(tmp)
    config = ServerConfig(
        port=0,
        http_port=0,
        auth_keys=tmp / "keys.toml",
        tls_cert=cert,
        tls_key=key,
        adapter_store=tmp / "store",
        model=ModelConfig(home=model_home),
        engine=EngineConfig(max_loras=2, max_batch_size=4),
    )
    thread = ServerThread(config).start()
    yield thread, keys, cert
    thread.stop()


def methods(channel: grpc.Channel) -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every method the server offers."""
    database = ProtoReflectionDescriptorDatabase(channel)
    found = []
    for service in database.get_services():
        file = database.FindFileContainingSymbol(service)
        for s in file.service:
            if f"{file.package}.{s.name}" == service:
                found += [
                    (f"/{service}/{m.name}", m.client_streaming, m.server_streaming)
                    for m in s.method
                ]
    return found


def call(
    channel: grpc.Channel,
    method: str,
    client_streaming: bool,
    server_streaming: bool,
    metadata=None,
) -> grpc.StatusCode:
    """Call any method with an empty request; the status it ends with."""
    identity = {"request_serializer": lambda x: x, "response_deserializer": lambda x: x}
    try:
        if client_streaming and server_streaming:
            list(channel.stream_stream(method, **identity)(iter([b""]), metadata=metadata))
        elif client_streaming:
            channel.stream_unary(method, **identity)(iter([b""]), metadata=metadata)
        elif server_streaming:
            list(channel.unary_stream(method, **identity)(b"", metadata=metadata))
        else:
            channel.unary_unary(method, **identity)(b"", metadata=metadata)
    except grpc.RpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


def test_every_rpc_needs_a_key_and_admin_rpcs_an_admin_key(secured):
    server, keys, ca = secured
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with grpc.secure_channel(server.address, credentials) as channel:
        offered = methods(channel)
        ours = [m for m in offered if m[0].startswith("/loraplex.v1.")]
        assert {m[0] for m in ours} >= ADMIN_METHODS
        assert "/loraplex.v1.Inference/Generate" in {m[0] for m in ours}
        client_md = (("authorization", f"Bearer {keys['client']}"),)
        for method, cs, ss in offered:
            if method.startswith(EXEMPT_PREFIXES):
                continue
            assert call(channel, method, cs, ss) == grpc.StatusCode.UNAUTHENTICATED, method
            wrong = (("authorization", "Bearer lpx_not-a-key"),)
            assert call(channel, method, cs, ss, wrong) == grpc.StatusCode.UNAUTHENTICATED
            with_client_key = call(channel, method, cs, ss, client_md)
            if method in ADMIN_METHODS or method not in CLIENT_METHODS:  # an allow-list
                assert with_client_key == grpc.StatusCode.PERMISSION_DENIED, method
            else:
                assert with_client_key not in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ), method
        # Health stays open: orchestrators probe it without keys.
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_keys_work_end_to_end_over_tls(secured, peft_reference):
    server, keys, ca = secured
    _, _, dirs = peft_reference
    with LoraplexClient(server.address, 120, api_key=keys["client"], tls_ca=ca) as client:
        out = client.generate(pb.GenerateRequest(prompt="Hello", max_new_tokens=2))
        assert out.usage.completion_tokens >= 1
        with pytest.raises(grpc.RpcError) as err:
            client.push("mine", dirs["attn-r8"])
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with LoraplexClient(server.address, 120, api_key=keys["admin"], tls_ca=ca) as admin:
        assert admin.push("mine", dirs["attn-r8"]).adapter.version == 1
    with LoraplexClient(server.address, 5) as plaintext, pytest.raises(grpc.RpcError):
        plaintext.model_info()  # the server speaks TLS only


def test_tenant_isolation_matrix(secured, peft_reference):
    """Each client RPC that names an adapter, for a tenant's own, a shared, another tenant's
    and a never-registered adapter; listing shows a tenant only what it may use."""
    server, keys, ca = secured
    _, _, dirs = peft_reference

    def connect(name: str) -> LoraplexClient:
        return LoraplexClient(server.address, 120, api_key=keys[name], tls_ca=ca)

    with connect("admin") as admin:
        admin.push("acme-own", dirs["attn-r8"], tenant="acme")
        admin.push("globex-own", dirs["all-r16"], tenant="globex")
        info = admin.push("common", dirs["mix-r32"], tenant="globex", shared=True).adapter
        assert (info.tenant, info.shared) == ("globex", True)
        with pytest.raises(grpc.RpcError) as err:
            admin.get("never-registered")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # admins may learn what exists
        assert {"acme-own", "globex-own", "common"} <= {a.adapter_id for a in admin.list()}

    def outcomes(client: LoraplexClient, adapter_id: str) -> dict[str, grpc.StatusCode | str]:
        request = pb.GenerateRequest(adapter_id=adapter_id, prompt="Hi", max_new_tokens=1)
        calls = {
            "Generate": lambda: client.generate(request),
            "GenerateStream": lambda: list(client.generate_stream(request)),
            "GetAdapter": lambda: client.get(adapter_id),
        }
        found: dict[str, grpc.StatusCode | str] = {}
        for rpc, fn in calls.items():
            try:
                fn()
                found[rpc] = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                found[rpc] = exc.code()
                found[rpc + " details"] = exc.details().replace(adapter_id, "<id>")
        return found

    ok = {rpc: grpc.StatusCode.OK for rpc in ("Generate", "GenerateStream", "GetAdapter")}
    for tenant, own, other in (
        ("client", "acme-own", "globex-own"),
        ("globex", "globex-own", "acme-own"),
    ):
        with connect(tenant) as client:
            assert outcomes(client, own) == ok
            assert outcomes(client, "common") == ok  # shared with every tenant
            denied = outcomes(client, other)
            assert {denied[rpc] for rpc in ok} == {grpc.StatusCode.PERMISSION_DENIED}
            # An id nobody registered gets the very same answer: no existence oracle.
            assert outcomes(client, "never-registered") == denied
            listed = {a.adapter_id for a in client.list()}
            assert own in listed and "common" in listed and other not in listed

    # A composition may only use adapters the caller may use; its derived id likewise.
    def composed(client: LoraplexClient, *inputs: str) -> pb.GenerateResponse:
        request = pb.GenerateRequest(prompt="Hi", max_new_tokens=1)
        request.compose.method = "cat"
        for adapter_id in inputs:
            request.compose.adapters.add(adapter_id=adapter_id, weight=0.5)
        return client.generate(request)

    with connect("client") as acme, connect("globex") as globex:
        derived = composed(acme, "acme-own", "common").adapter_id
        assert acme.get(derived).composition.method == "cat"
        for client, inputs in (
            (acme, ("acme-own", "globex-own")),
            (globex, ("acme-own", "common")),
        ):
            with pytest.raises(grpc.RpcError) as err:
                composed(client, *inputs)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Another tenant naming the derived id: the same answer as for an id nobody has.
        assert outcomes(globex, derived) == outcomes(globex, "never-registered")


def test_tenant_limits_refuse_at_once_with_retry_advice(secured):
    from google.rpc import error_details_pb2, status_pb2

    server, keys, ca = secured
    with LoraplexClient(server.address, 120, api_key=keys["capped"], tls_ca=ca) as client:
        stream = client.generate_stream(
            pb.GenerateRequest(prompt="Count to fifty.", max_new_tokens=64, ignore_eos=True)
        )
        next(stream)  # in flight: the tenant's one allowed request
        with pytest.raises(grpc.RpcError) as err:
            client.generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=1))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailing = dict(err.value.trailing_metadata())
        assert int(trailing["retry-after-ms"]) > 0
        status = status_pb2.Status.FromString(trailing["grpc-status-details-bin"])
        info = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(info) and info.retry_delay.ToMilliseconds() > 0
        with connect_other(server, keys, ca) as other:  # another tenant is not held back
            other.generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=1))
        stream.cancel()
        for _ in range(100):  # the cancelled stream's place comes back
            try:
                client.generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=1))
                break
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                time.sleep(0.1)
        else:
            raise AssertionError("the tenant's limit never freed after the cancel")
        # More than a minute's worth of tokens can never pass: not retryable, so invalid.
        with pytest.raises(grpc.RpcError) as err:
            client.generate(pb.GenerateRequest(prompt="Hi", max_new_tokens=700))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details().startswith("max_new_tokens:")


def connect_other(server, keys, ca) -> LoraplexClient:
    return LoraplexClient(server.address, 120, api_key=keys["globex"], tls_ca=ca)


def test_refusals_carry_the_request_id(secured):
    server, _, ca = secured
    with LoraplexClient(server.address, 30, tls_ca=ca) as anonymous:
        with pytest.raises(grpc.RpcError) as err:
            anonymous.inference.ModelInfo(
                pb.ModelInfoRequest(), metadata=(("x-request-id", "trace-7"),)
            )
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(err.value.trailing_metadata())["x-request-id"] == "trace-7"


# -- the HTTP API: the same keys, roles and tenancy, over the same TLS -----------------------


def https(server, ca, method: str, path: str, key: str | None = None, body: object = None):
    """(status, headers, JSON or text) of one HTTPS call to the server's HTTP API."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection("127.0.0.1", server.server.http_port, context=context)
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["authorization"] = f"Bearer {key}"
    conn.request(method, path, body=json.dumps(body or {}).encode(), headers=headers)
    response = conn.getresponse()
    raw = response.read()
    conn.close()
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = raw.decode()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, answer


def openai_client(server, ca, key: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"https://127.0.0.1:{server.server.http_port}/v1",
        api_key=key,
        max_retries=0,
        http_client=openai.DefaultHttpxClient(verify=str(ca)),
    )


def test_every_http_route_needs_a_key_and_admin_routes_an_admin_key(secured):
    server, keys, ca = secured
    for route in ROUTES:
        path = route.path.replace("{model_id:path}", "anything")
        if route.access is Access.OPEN:  # no key needed (/metrics: 404, metrics are off here)
            assert https(server, ca, route.method, path)[0] == (404 if path == "/metrics" else 200)
            continue
        status, headers, answer = https(server, ca, route.method, path)
        assert status == 401 and headers["www-authenticate"] == "Bearer", path
        assert answer["error"]["type"] == "authentication_error"
        assert https(server, ca, route.method, path, "lpx_not-a-key")[0] == 401
        status, _, answer = https(server, ca, route.method, path, keys["client"])
        if route.access is Access.ADMIN:
            assert status == 403 and answer["error"]["type"] == "permission_error", path
        else:
            assert status not in (401, 403), path


def test_http_tenancy_matches_grpc(secured, peft_reference):
    server, keys, ca = secured
    _, _, dirs = peft_reference
    with LoraplexClient(server.address, 120, api_key=keys["admin"], tls_ca=ca) as admin:
        admin.push("acme-own", dirs["attn-r8"], tenant="acme")
        admin.push("globex-own", dirs["all-r16"], tenant="globex")
        admin.push("common", dirs["mix-r32"], tenant="globex", shared=True)
    acme = openai_client(server, ca, keys["client"])
    models = {m.id: m for m in acme.models.list().data}
    assert {"acme-own", "common"} <= set(models) and "globex-own" not in models
    assert models["acme-own"].owned_by == "acme" and models["common"].owned_by == "globex"
    base = server.runtime.info.model_id
    assert models["acme-own"].parent == base
    answer = acme.chat.completions.create(
        model="acme-own", messages=[{"role": "user", "content": "Hi"}], max_tokens=2
    )
    assert answer.model == "acme-own" and answer.usage.completion_tokens == 2

    def refusal(model: str, path: str = "/v1/chat/completions") -> tuple[int, dict]:
        body = {"model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
        if path == "/v1/completions":
            body = {"model": model, "prompt": "Hi", "max_tokens": 1}
        status, _, answer = https(server, ca, "POST", path, keys["client"], body)
        answer["error"]["message"] = answer["error"]["message"].replace(model, "<id>")
        return status, answer

    # Another tenant's adapter and an id nobody registered: the very same 404.
    for path in ("/v1/chat/completions", "/v1/completions"):
        assert refusal("globex-own", path) == refusal("never-registered", path)
        assert refusal("globex-own", path)[0] == 404
    other = https(server, ca, "GET", "/v1/models/globex-own", keys["client"])
    nobody = https(server, ca, "GET", "/v1/models/never-registered", keys["client"])
    assert other[0] == nobody[0] == 404
    assert other[2]["error"]["code"] == nobody[2]["error"]["code"] == "model_not_found"
    # A client key may not load adapters; an admin key may, as with vLLM.
    load = {"lora_name": "via-http", "lora_path": str(dirs["attn-r8"])}
    assert https(server, ca, "POST", "/v1/load_lora_adapter", keys["client"], load)[0] == 403


def test_http_tenant_limit_is_429_with_retry_after(secured):
    server, keys, ca = secured
    capped = openai_client(server, ca, keys["capped"])
    base = server.runtime.info.model_id
    stream = capped.completions.create(
        model=base,
        prompt="Count to fifty.",
        max_tokens=64,
        stream=True,
        extra_body={"ignore_eos": True},  # a sampled end of text would end it at once
    )
    next(iter(stream))  # in flight: the tenant's one allowed request
    status, headers, answer = https(
        server, ca, "POST", "/v1/completions", keys["capped"],
        {"model": base, "prompt": "Hi", "max_tokens": 1},
    )  # fmt: skip
    stream.close()
    assert status == 429 and int(headers["retry-after"]) >= 1
    assert answer["error"]["type"] == "rate_limit_error"
