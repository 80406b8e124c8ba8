"""The local runtimes behind the router, balanced by gRPC itself.

Each target is one channel with gRPC's `round_robin` policy and client-side health checking
(the service config's `healthCheckConfig`): a target that names many runtimes (a headless
Service's `dns:///` name, an `ipv4:` list) is spread over its SERVING addresses by gRPC, whose
resolver follows pods as they come and go. Calls rotate over the channels only when several
targets are given (named hosts cannot share one channel).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

from services.core.api import SERVICE_NAME, pb, pb_grpc
from services.core.security import channel, token_metadata

log = logging.getLogger(__name__)

URI_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


class LocalUnavailable(Exception):
    """No runtime could answer."""


def channel_targets(local: list[str]) -> list[str]:
    """gRPC targets for `--local` entries: URIs as given; plain HOST:PORT entries with IP
    literals joined into one `ipv4:`/`ipv6:` target (one balanced channel); named hosts one
    target each."""
    targets: list[str] = []
    ipv4: list[str] = []
    ipv6: list[str] = []
    for entry in local:
        if entry.startswith(URI_SCHEMES):
            targets.append(entry)
            continue
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(
                f"local: {entry!r} is neither HOST:PORT nor a gRPC target URI "
                f"(dns:///NAME:PORT, ipv4:ADDR:PORT[,ADDR:PORT...])"
            )
        try:
            address = ipaddress.ip_address(host.strip("[]"))
        except ValueError:
            targets.append(entry)
            continue
        (ipv4 if address.version == 4 else ipv6).append(entry)
    if ipv4:
        targets.insert(0, "ipv4:" + ",".join(ipv4))
    if ipv6:
        targets.insert(0, "ipv6:" + ",".join(ipv6))
    return targets


def service_config() -> str:
    """round_robin over the SERVING runtimes; a call whose runtime is gone before it answered
    is retried by gRPC on another (Predict and Generate have no side effects)."""
    retry = {
        "maxAttempts": 3,
        "initialBackoff": "0.05s",
        "maxBackoff": "0.5s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({
        "loadBalancingConfig": [{"round_robin": {}}],
        "healthCheckConfig": {"serviceName": SERVICE_NAME},
        "methodConfig": [{"name": [{"service": SERVICE_NAME}], "retryPolicy": retry}],
    })  # fmt: skip


CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.service_config", service_config()),
    ("grpc.enable_retries", 1),
    # A runtime loading its model refuses connections for a while; gRPC's default backoff
    # (up to 2 min) would keep the router from seeing it come up.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


@dataclass
class Target:
    uri: str
    channel: Any
    stub: Any = field(init=False)
    ready: bool = False

    def __post_init__(self) -> None:
        self.stub = pb_grpc.InferenceStub(self.channel)


class LocalRuntimes:
    def __init__(
        self,
        local: list[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        self._targets = [
            Target(uri, channel(uri, credentials=credentials, options=CHANNEL_OPTIONS, aio=True))
            for uri in channel_targets(local)
        ]
        self._metadata = token_metadata(token)
        self._next = 0
        self._on_change = on_change
        self._announced: bool | None = None
        self._watchers: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._announce()
        self._watchers = [asyncio.create_task(self._watch(t)) for t in self._targets]

    async def close(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        for target in self._targets:
            await target.channel.close()

    async def _watch(self, target: Target) -> None:
        """READY means some runtime behind the target passes its health check."""
        while True:
            state = target.channel.get_state(try_to_connect=True)
            ready = state == grpc.ChannelConnectivity.READY
            if ready != target.ready:
                log.info("runtime health changed", extra={"target": target.uri, "ready": ready})
                target.ready = ready
                await self._announce()
            await target.channel.wait_for_state_change(state)

    async def _announce(self) -> None:
        """Tell on_change when "some runtime can answer" flips (and once at start)."""
        now = self.any_ready
        if now != self._announced and self._on_change is not None:
            self._announced = now
            await self._on_change(now)

    @property
    def any_ready(self) -> bool:
        return any(t.ready for t in self._targets)

    def _order(self) -> list[Target]:
        """The ready targets in turn, then the rest (a call there fails fast, or connects)."""
        start = self._next % len(self._targets)
        self._next += 1
        turn = self._targets[start:] + self._targets[:start]
        return [t for t in turn if t.ready] + [t for t in turn if not t.ready]

    async def call(self, method: str, request: Any, timeout: float) -> Any:
        """A unary call through the next target; the next one on UNAVAILABLE."""
        for target in self._order():
            try:
                call = getattr(target.stub, method)
                return await call(request, timeout=timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
        raise LocalUnavailable("no runtime is available")

    def generate(
        self, request: pb.GenerateRequest, timeout: float
    ) -> AsyncIterator[pb.GenerateChunk]:
        return self.stream("Generate", request, timeout)

    async def stream(self, method: str, request: Any, timeout: float) -> AsyncIterator[Any]:
        """A server-streaming call through the next target; the next one on UNAVAILABLE
        before anything came."""
        for target in self._order():
            stream = getattr(target.stub, method)(request, timeout=timeout,
                                                  metadata=self._metadata)  # fmt: skip
            started = False
            try:
                async for chunk in stream:
                    started = True
                    yield chunk
                return
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or started:
                    raise
            finally:
                stream.cancel()
        raise LocalUnavailable("no runtime is available")
