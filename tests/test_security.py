"""TLS, mutual TLS and bearer tokens on the runtime and the router (real servers, real certs)."""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.api import pb
from services.core.client import InferenceClient
from services.core.security import channel_credentials, token_matches
from testkit.bundles import make_bundle
from testkit.processes import REPO, ServerProcess, free_port

TOKEN = "s3cret-runtime-token"
HTTP_PORT = free_port()  # the secure runtime's OpenAI-compatible API
ROUTER_TOKEN = "s3cret-router-token"


@dataclass
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from another CA
    rogue_key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    issuer_name, issuer_key = issuer or (name, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")

    def write(name: str, data: bytes) -> Path:
        (root / name).write_bytes(data)
        return root / name

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("edgedistill test CA", ca_key, None, ca=True)
    issuer = (ca.subject, ca_key)
    server_key, client_key, rogue_key = (ec.generate_private_key(ec.SECP256R1()) for _ in "abc")
    rogue_ca_key = ec.generate_private_key(ec.SECP256R1())
    rogue_ca = _certificate("rogue CA", rogue_ca_key, None, ca=True)
    return Pki(
        ca=write("ca.pem", pem(ca)),
        server_cert=write(
            "server.pem", pem(_certificate("localhost", server_key, issuer, server=True))
        ),
        server_key=write("server.key", _key_pem(server_key)),
        client_cert=write("client.pem", pem(_certificate("router", client_key, issuer))),
        client_key=write("client.key", _key_pem(client_key)),
        rogue_cert=write(
            "rogue.pem", pem(_certificate("rogue", rogue_key, (rogue_ca.subject, rogue_ca_key)))
        ),
        rogue_key=write("rogue.key", _key_pem(rogue_key)),
    )  # fmt: skip


def tls(pki: Pki, client: bool = True) -> grpc.ChannelCredentials:
    if client:
        return channel_credentials(pki.ca, pki.client_cert, pki.client_key)
    return channel_credentials(pki.ca)


@pytest.fixture(scope="module")
def secure_runtime(pki: Pki, gguf_path: Path, program_path: Path) -> Iterator[ServerProcess]:
    server = ServerProcess(
        ["serve", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--model", str(gguf_path), "--program", str(program_path), "--n-ctx", "1024",
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
         "--tls-client-ca", str(pki.ca), "--http-port", str(HTTP_PORT)],
        env={"EDGEDISTILL_AUTH_TOKEN": TOKEN},
    )  # fmt: skip
    server.wait_serving(credentials=tls(pki))
    yield server
    server.terminate()


def predict_code(
    target: str, credentials: grpc.ChannelCredentials | None, token: str | None
) -> grpc.StatusCode:
    with InferenceClient(target, timeout_s=30, credentials=credentials, token=token) as client:
        try:
            reply = client.predict({"country": "Italy"}, max_tokens=16)
        except grpc.RpcError as err:
            return err.code()  # type: ignore[no-any-return]
    assert reply.outcome == pb.PREDICT_OUTCOME_PARSED
    return grpc.StatusCode.OK


def test_mutual_tls_and_token_are_both_required(secure_runtime: ServerProcess, pki: Pki) -> None:
    target = secure_runtime.target
    assert predict_code(target, tls(pki), TOKEN) == grpc.StatusCode.OK
    assert predict_code(target, tls(pki), None) == grpc.StatusCode.UNAUTHENTICATED
    assert predict_code(target, tls(pki), TOKEN + "x") == grpc.StatusCode.UNAUTHENTICATED
    assert predict_code(target, tls(pki), TOKEN[:-1]) == grpc.StatusCode.UNAUTHENTICATED
    # No client certificate, a certificate from another CA, or no TLS at all: no connection.
    assert predict_code(target, tls(pki, client=False), TOKEN) == grpc.StatusCode.UNAVAILABLE
    rogue = channel_credentials(pki.ca, pki.rogue_cert, pki.rogue_key)
    assert predict_code(target, rogue, TOKEN) == grpc.StatusCode.UNAVAILABLE
    assert predict_code(target, None, TOKEN) == grpc.StatusCode.UNAVAILABLE


def test_streaming_and_info_need_the_token_too(secure_runtime: ServerProcess, pki: Pki) -> None:
    with InferenceClient(secure_runtime.target, credentials=tls(pki)) as client:
        with pytest.raises(grpc.RpcError) as caught:
            list(client.generate([("user", "hi")], max_tokens=4))
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.RpcError) as caught:
            client.info()
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_the_http_api_wants_the_same_client_certificate_and_token(
    secure_runtime: ServerProcess, pki: Pki
) -> None:
    import httpx

    url = f"https://localhost:{HTTP_PORT}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    client_cert = (str(pki.client_cert), str(pki.client_key))
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    trusting.load_cert_chain(*client_cert)
    with httpx.Client(verify=trusting, timeout=30) as client:
        assert client.post(url, json=body, headers=bearer).status_code == 200
        assert client.post(url, json=body).status_code == 401
    no_certificate = ssl.create_default_context(cafile=str(pki.ca))
    rogue = ssl.create_default_context(cafile=str(pki.ca))
    rogue.load_cert_chain(str(pki.rogue_cert), str(pki.rogue_key))
    for context in (no_certificate, rogue):
        with pytest.raises(httpx.TransportError), httpx.Client(verify=context) as client:
            client.post(url, json=body, headers=bearer)
    with pytest.raises(httpx.TransportError):  # no TLS at all
        httpx.post(url.replace("https", "http"), json=body, headers=bearer)


def test_health_stays_open_without_the_token(secure_runtime: ServerProcess, pki: Pki) -> None:
    with grpc.secure_channel(secure_runtime.target, tls(pki)) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_the_cli_reaches_a_secured_server_from_its_environment(
    secure_runtime: ServerProcess, pki: Pki, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    env = {**os.environ, "EDGEDISTILL_CLIENT_TLS_CA": str(pki.ca),
           "EDGEDISTILL_CLIENT_TLS_CERT": str(pki.client_cert),
           "EDGEDISTILL_CLIENT_TLS_KEY": str(pki.client_key)}  # fmt: skip

    def cli(*args: str, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "services.cli", *args, "--target", secure_runtime.target],
            cwd=REPO, env={**env, **extra}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert cli("health", extra={}).stdout.strip() == "SERVING"
    refused = cli("info", extra={})
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
    info = cli("info", extra={"EDGEDISTILL_CLIENT_TOKEN_FILE": str(token_file)})
    assert info.returncode == 0, info.stderr
    assert '"model_name"' in info.stdout
    missing = cli("info", extra={"EDGEDISTILL_CLIENT_TOKEN_FILE": str(tmp_path / "nope")})
    assert missing.returncode == 2
    assert "token_file (EDGEDISTILL_CLIENT_TOKEN_FILE)" in missing.stderr


def test_router_speaks_mtls_to_the_runtime_and_wants_its_own_token(
    secure_runtime: ServerProcess, pki: Pki, gguf_path: Path, tmp_path: Path
) -> None:
    from testkit.bundles import CAPITALS_PROGRAM

    bundle = make_bundle(tmp_path / "bundle", gguf_path, CAPITALS_PROGRAM)
    local_token = tmp_path / "local-token"
    local_token.write_text(TOKEN)
    router = ServerProcess(
        ["route", "--bundle", str(bundle), "--local", secure_runtime.target,
         "--mode", "local_only", "--host", "127.0.0.1", "--port", "0", "--metrics-port", "0",
         "--local-tls-ca", str(pki.ca), "--local-tls-cert", str(pki.client_cert),
         "--local-tls-key", str(pki.client_key), "--local-token-file", str(local_token),
         "--health-requires-auth"],
        env={"EDGEDISTILL_ROUTER_AUTH_TOKEN": ROUTER_TOKEN},
    )  # fmt: skip
    try:
        with InferenceClient(router.target, timeout_s=60, token=ROUTER_TOKEN) as client:
            reply = client.predict({"country": "Italy"}, max_tokens=16)
        assert reply.served_by == pb.SERVED_BY_LOCAL, reply
        assert predict_code(router.target, None, TOKEN) == grpc.StatusCode.UNAUTHENTICATED
        # --health-requires-auth: probes need the token as well.
        with grpc.insecure_channel(router.target) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert TOKEN not in router.stderr and ROUTER_TOKEN not in router.stderr
    finally:
        router.terminate()
    assert TOKEN not in secure_runtime.stderr


def test_token_comparison() -> None:
    assert token_matches([("authorization", "Bearer abc")], "abc")
    assert token_matches([("authorization", b"Bearer abc")], "abc")
    assert not token_matches([("authorization", "Bearer abd")], "abc")
    assert not token_matches([("authorization", "abc")], "abc")
    assert not token_matches([("x-other", "Bearer abc")], "abc")
    assert not token_matches(None, "abc")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tls-cert", "{cert}"], "tls_cert (--tls-cert / EDGEDISTILL_TLS_CERT): TLS needs both"),
        (["--tls-client-ca", "{ca}"], "tls_client_ca"),
        (["--auth-token-file", "/nonexistent/token"], "auth_token_file"),
    ],
)
def test_inconsistent_security_settings_are_named(
    pki: Pki, gguf_path: Path, args: list[str], message: str
) -> None:
    filled = [a.format(cert=pki.server_cert, ca=pki.ca) for a in args]
    proc = subprocess.run(
        [sys.executable, "-m", "services.cli", "serve", "--model", str(gguf_path), *filled],
        cwd=REPO, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert message in proc.stderr, proc.stderr
