"""Registers an `Inference` servicer so that undecodable requests are INVALID_ARGUMENT.

The generated `add_InferenceServicer_to_server` lets protobuf's DecodeError (random bytes,
invalid UTF-8 in a string field) surface as INTERNAL "Exception deserializing request!". Here
the deserializer keeps the error, and the call is refused as INVALID_ARGUMENT naming it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import DecodeError

from services.core.api import SERVICE_NAME, pb


@dataclass(frozen=True)
class UndecodableRequest:
    message: str


def _tolerant(message_type: Any) -> Callable[[bytes], Any]:
    name = message_type.DESCRIPTOR.name

    def deserialize(data: bytes) -> Any:
        try:
            return message_type.FromString(data)
        except (DecodeError, ValueError) as err:
            return UndecodableRequest(f"request: not a valid {name} ({err})")

    return deserialize


def _guard_unary(method: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        return await method(request, context)

    return handler


def _guard_stream(method: Callable[[Any, Any], AsyncIterator[Any]]) -> Callable[..., Any]:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, UndecodableRequest):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
        async for item in method(request, context):
            yield item

    return handler


def add_inference_servicer(servicer: Any, server: grpc.aio.Server) -> None:
    """Every RPC of the service, as the proto lists them, served by the servicer's method of
    the same name (an RPC added to the proto needs no line here)."""
    handlers = {}
    for rpc in pb.DESCRIPTOR.services_by_name[SERVICE_NAME.rsplit(".", 1)[-1]].methods:
        request, response = getattr(pb, rpc.input_type.name), getattr(pb, rpc.output_type.name)
        method = getattr(servicer, rpc.name)
        make, guard = (
            (grpc.unary_stream_rpc_method_handler, _guard_stream)
            if rpc.server_streaming
            else (grpc.unary_unary_rpc_method_handler, _guard_unary)
        )
        handlers[rpc.name] = make(guard(method), request_deserializer=_tolerant(request),
                                  response_serializer=response.SerializeToString)  # fmt: skip
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
