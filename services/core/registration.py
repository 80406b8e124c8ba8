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
    def unary(method: Any, request: Any, response: Any) -> Any:
        return grpc.unary_unary_rpc_method_handler(
            _guard_unary(method),
            request_deserializer=_tolerant(request),
            response_serializer=response.SerializeToString,
        )

    handlers = {
        "Predict": unary(servicer.Predict, pb.PredictRequest, pb.PredictResponse),
        "Generate": grpc.unary_stream_rpc_method_handler(
            _guard_stream(servicer.Generate),
            request_deserializer=_tolerant(pb.GenerateRequest),
            response_serializer=pb.GenerateChunk.SerializeToString,
        ),
        "GetModelInfo": unary(servicer.GetModelInfo, pb.GetModelInfoRequest, pb.ModelInfo),
        "Tokenize": unary(servicer.Tokenize, pb.TokenizeRequest, pb.TokenizeResponse),
        "Detokenize": unary(servicer.Detokenize, pb.DetokenizeRequest, pb.DetokenizeResponse),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
