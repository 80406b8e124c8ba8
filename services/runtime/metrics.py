"""Prometheus metrics of the runtime, served on their own port."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class RuntimeMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.calls = Counter(
            "edgedistill_calls",
            "gRPC calls by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edgedistill_call_latency_seconds",
            "gRPC call latency",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "edgedistill_time_to_first_token_seconds",
            "From arrival to the first token",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tokens = Counter(
            "edgedistill_tokens",
            "Tokens processed; direction is prompt or completion",
            ["direction"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "edgedistill_queue_depth", "Calls waiting for the model", registry=self.registry
        )
        self.in_flight = Gauge(
            "edgedistill_in_flight", "Calls being generated now", registry=self.registry
        )
        self.predict_outcomes = Counter(
            "edgedistill_predict_outcomes",
            "Predict results by outcome (parsed, unparsed, truncated)",
            ["outcome"],
            registry=self.registry,
        )
