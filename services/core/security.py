"""Transport security for both gRPC services: TLS, mutual TLS, bearer tokens.

Servers: `server_credentials` (TLS, or mTLS with a client CA) and `BearerAuth`, an interceptor
that compares `authorization: Bearer <token>` in constant time and answers UNAUTHENTICATED
otherwise. Clients: `channel` builds a plain or TLS channel, `token_metadata` the header.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

HEALTH_METHODS = frozenset({"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
UNAUTHENTICATED_MESSAGE = (
    "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'"
)


def server_credentials(
    cert: Path, key: Path, client_ca: Path | None = None
) -> grpc.ServerCredentials:
    """TLS with this certificate; with `client_ca`, clients must present a certificate it signed."""
    return grpc.ssl_server_credentials(
        [(key.read_bytes(), cert.read_bytes())],
        root_certificates=client_ca.read_bytes() if client_ca else None,
        require_client_auth=client_ca is not None,
    )


def channel_credentials(
    ca: Path | None, cert: Path | None = None, key: Path | None = None
) -> grpc.ChannelCredentials:
    """TLS trusting `ca` (None: the system roots); `cert`+`key` present a client certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes() if ca else None,
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )


def token_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),) if token else ()


def token_matches(metadata: Sequence[tuple[str, str | bytes]] | None, token: str) -> bool:
    """Whether the call carries exactly this bearer token (constant-time comparison)."""
    expected = f"Bearer {token}".encode()
    for name, value in metadata or ():
        if name == "authorization":
            given = value if isinstance(value, bytes) else value.encode()
            return hmac.compare_digest(given, expected)
    return False


class BearerAuth(grpc.aio.ServerInterceptor):
    """Every call must carry the token; health stays open when `open_health` (for probes)."""

    def __init__(self, token: str, *, open_health: bool = True) -> None:
        self._token = token
        self._open = HEALTH_METHODS if open_health else frozenset()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method in self._open:
            return handler
        if token_matches(details.invocation_metadata, self._token):
            return handler
        return _denying(handler)


async def _deny_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)


async def _deny_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)
    yield  # pragma: no cover - abort raises


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that answers UNAUTHENTICATED."""
    serializers = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(_deny_unary, **serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(_deny_stream, **serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(_deny_unary, **serializers)
    return grpc.stream_stream_rpc_method_handler(_deny_stream, **serializers)


def interceptors(settings: Any) -> list[grpc.aio.ServerInterceptor]:
    """The server's interceptors for these TransportSettings (auth when a token is set)."""
    token = settings.auth_token()
    if not token:
        return []
    return [BearerAuth(token, open_health=not settings.health_requires_auth)]


def add_port(server: grpc.aio.Server, settings: Any) -> int:
    """Bind host:port, with TLS (or mutual TLS) when a certificate is configured."""
    address = f"{settings.host}:{settings.port}"
    try:
        if settings.tls_cert is not None:
            credentials = server_credentials(
                settings.tls_cert, settings.tls_key, settings.tls_client_ca
            )
            port = server.add_secure_port(address, credentials)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError:  # gRPC's "Failed to bind": the OS says why
        port = 0
    if port == 0:
        why = bind_problem(settings.host, settings.port)
        raise OSError(f"port: cannot listen on {address} ({why}); check --host, or choose "
                      "another --port (0 picks a free one)")  # fmt: skip
    return port


def bind_problem(host: str, port: int) -> str:
    """Why the OS will not let host:port be listened on (in use, no such address here)."""
    import socket

    host = host.strip("[]")
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.bind((host, port))
    except OSError as err:
        return err.strerror or str(err)
    return "gRPC refused it"


def serve_metrics(registry: Any, host: str, port: int) -> None:
    """Prometheus' /metrics on host:port; a port it cannot take is named with the fix."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr=host, registry=registry)
    except OSError as err:
        raise OSError(f"metrics_port: cannot listen on {host}:{port} ({err.strerror}); choose "
                      "another --metrics-port, or 0 to turn metrics off") from None  # fmt: skip


def channel(
    target: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
    aio: bool = False,
) -> Any:
    """A plain channel, or a TLS one when credentials are given (sync or asyncio)."""
    module: Any = grpc.aio if aio else grpc
    if credentials is None:
        return module.insecure_channel(target, options=list(options))
    return module.secure_channel(target, credentials, options=list(options))
