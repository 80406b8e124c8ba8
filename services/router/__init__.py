"""The router container: local first, API fallback only where it pays.

Implements the same edgedistill.v1.Inference service as the runtime, in front of one or more
runtimes. Never imports services.builder.
"""
