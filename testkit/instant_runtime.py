"""A STAND-IN runtime that answers every Predict at once, without a model: for measuring what
the router itself costs (bench/router_capacity.py). Same service, health and reflection-free
wire as the real runtime; the answer is each output field's name, parsed, confidence 1.0.

    python -m testkit.instant_runtime --port PORT --program program.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.core.api import SERVICE_NAME, pb, pb_grpc
from services.core.registration import add_inference_servicer


class InstantInference(pb_grpc.InferenceServicer):
    """Every RPC the service has (the rest UNIMPLEMENTED, as the generated base answers)."""

    def __init__(self, outputs: list[str]) -> None:
        self._outputs = outputs

    async def Predict(self, request: pb.PredictRequest, context: Any) -> pb.PredictResponse:
        return pb.PredictResponse(
            outputs={name: name for name in self._outputs},
            outcome=pb.PREDICT_OUTCOME_PARSED,
            confidence=1.0,
            served_by=pb.SERVED_BY_LOCAL,
        )

    async def Generate(self, request: pb.GenerateRequest, context: Any) -> Any:
        yield pb.GenerateChunk(text="ok")

    async def GetModelInfo(self, request: pb.GetModelInfoRequest, context: Any) -> pb.ModelInfo:
        return pb.ModelInfo(model_name="instant stand-in")


async def serve(port: int, outputs: list[str]) -> None:
    server = grpc.aio.server()
    add_inference_servicer(InstantInference(outputs), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--program", type=Path, required=True)
    args = parser.parse_args()
    fields = [field["name"] for field in json.loads(args.program.read_text())["outputs"]]
    asyncio.run(serve(args.port, fields))
