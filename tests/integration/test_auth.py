"""Authentication and roles on a server with an API key file, served over TLS: every RPC the
server offers (found through reflection) refuses a call without a valid key."""

from __future__ import annotations

import datetime
import ipaddress

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from loraplex.server.auth import hash_key, new_key
from loraplex.server.client import LoraplexClient
from loraplex.server.config import EngineConfig, ModelConfig, ServerConfig
from loraplex.server.interceptor import ADMIN_METHODS, EXEMPT_PREFIXES
from loraplex.v1 import inference_pb2 as pb
from tests.helpers import ServerThread

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


@pytest.fixture(scope="module")
def secured(model_home, tmp_path_factory):
    """A TLS server with a client key and an admin key; yields (server, keys, ca path)."""
    tmp = tmp_path_factory.mktemp("auth")
    keys = {"client": new_key(), "admin": new_key()}
    (tmp / "keys.toml").write_text(
        "".join(
            f'[[keys]]\nname = "{role}-key"\ntenant = "acme"\nrole = "{role}"\n'
            f'sha256 = "{hash_key(key)}"\n'
            for role, key in keys.items()
        )
    )
    cert, key = self_signed(tmp)
    config = ServerConfig(
        port=0,
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
            if method in ADMIN_METHODS:
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
