"""How the runtime and the router bring up and take down their gRPC server: the same
services registered, the same ports taken in the same order, the same signals."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Any

import grpc.aio
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.core import security
from services.core.api import SERVICE_NAME
from services.core.http_api import server as http_api
from services.core.registration import add_inference_servicer

log = logging.getLogger(__name__)


async def start(
    server: grpc.aio.Server, servicer: Any, health_servicer: health.aio.HealthServicer,
    settings: Any, metrics_registry: Any,
) -> tuple[int, http_api.HttpFront | None]:  # fmt: skip
    """Register the Inference servicer, health and reflection; take the metrics port, the
    HTTP API's socket and gRPC's port (one that cannot be taken fails here, before anything
    serves); start. Returns gRPC's port and the HTTP API, started, when there is one."""
    add_inference_servicer(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    if settings.metrics_port:
        security.serve_metrics(metrics_registry, settings.host, settings.metrics_port)
    http = http_api.mount(server, settings)
    port = security.add_port(server, settings)
    await server.start()
    if http is not None:
        http.start()
        log.info("http api", extra={"port": http.port})
    return port, http


def stop_requested() -> asyncio.Event:
    """Set on SIGTERM or SIGINT (a container's stop, Ctrl+C)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
