"""The gRPC contract, generated from proto/edgedistill/v1/inference.proto by `make setup`.

Import the messages and stubs from here, not from the generated modules' own path.
"""

from services.core.api.edgedistill.v1 import inference_pb2 as pb
from services.core.api.edgedistill.v1 import inference_pb2_grpc as pb_grpc

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Inference"].full_name

__all__ = ["SERVICE_NAME", "pb", "pb_grpc"]
