"""The runtime container: the gRPC inference service over a local GGUF model.

Never imports services.builder: torch and transformers stay out of the runtime image.
"""
