"""The local runtimes behind the router: round-robin over the healthy ones."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.core.api import pb, pb_grpc
from services.core.security import channel, token_metadata

log = logging.getLogger(__name__)


class LocalUnavailable(Exception):
    """No runtime could answer."""


@dataclass
class Endpoint:
    target: str
    channel: Any
    stub: Any = field(init=False)
    health: Any = field(init=False)
    healthy: bool = False

    def __post_init__(self) -> None:
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)


class LocalRuntimes:
    def __init__(
        self,
        targets: list[str],
        health_interval_s: float,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        token: str | None = None,
        on_change: Callable[[bool], Awaitable[None]] | None = None,
    ) -> None:
        options = [
            ("grpc.max_receive_message_length", 64 << 20),
            # A runtime loading its model refuses connections for a while; gRPC's default
            # backoff (up to 2 min) would keep the router from seeing it come up.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
        ]
        self._endpoints = [
            Endpoint(t, channel(t, credentials=credentials, options=options, aio=True))
            for t in targets
        ]
        self._metadata = token_metadata(token)
        self._interval = health_interval_s
        self._next = 0
        self._on_change = on_change
        self._announced: bool | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._recheck: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.check_all()
        self._watcher = asyncio.create_task(self._watch())

    async def close(self) -> None:
        if self._watcher:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for endpoint in self._endpoints:
            await endpoint.channel.close()

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(e) for e in self._endpoints))
        await self._announce()

    async def _announce(self) -> None:
        """Tell on_change when "some runtime can answer" flips (and once at start)."""
        now = self.any_healthy
        if now != self._announced and self._on_change is not None:
            self._announced = now
            await self._on_change(now)

    async def _check(self, endpoint: Endpoint) -> None:
        try:
            reply = await endpoint.health.Check(
                health_pb2.HealthCheckRequest(), timeout=1.0, metadata=self._metadata
            )
            healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
        except grpc.aio.AioRpcError:
            healthy = False
        if healthy != endpoint.healthy:
            log.info(
                "runtime health changed", extra={"target": endpoint.target, "healthy": healthy}
            )
        endpoint.healthy = healthy

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check_all()

    @property
    def any_healthy(self) -> bool:
        return any(e.healthy for e in self._endpoints)

    async def _order(self) -> list[Endpoint]:
        healthy = [e for e in self._endpoints if e.healthy]
        if not healthy:
            # The last health round may predate a runtime that has just come up: ask again
            # now (one round shared by every waiting call) rather than fail until the next.
            if self._recheck is None or self._recheck.done():
                self._recheck = asyncio.create_task(self.check_all())
            await asyncio.shield(self._recheck)
            healthy = [e for e in self._endpoints if e.healthy]
        if not healthy:
            return []
        start = self._next % len(healthy)
        self._next += 1
        return healthy[start:] + healthy[:start]

    async def call(self, method: str, request: Any, timeout: float) -> Any:
        """A unary call on the next healthy runtime; the next one on UNAVAILABLE."""
        for endpoint in await self._order():
            try:
                call = getattr(endpoint.stub, method)
                return await call(request, timeout=timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                endpoint.healthy = False
        await self._announce()
        raise LocalUnavailable("no healthy runtime")

    async def generate(
        self, request: pb.GenerateRequest, timeout: float
    ) -> AsyncIterator[pb.GenerateChunk]:
        for endpoint in await self._order():
            stream = endpoint.stub.Generate(request, timeout=timeout, metadata=self._metadata)
            started = False
            try:
                async for chunk in stream:
                    started = True
                    yield chunk
                return
            except grpc.aio.AioRpcError as err:
                if err.code() != grpc.StatusCode.UNAVAILABLE or started:
                    raise
                endpoint.healthy = False
            finally:
                stream.cancel()
        await self._announce()
        raise LocalUnavailable("no healthy runtime")
