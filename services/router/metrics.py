"""Prometheus metrics of the router."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.calls = Counter(
            "edgedistill_router_calls",
            "Calls by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.answers = Counter(
            "edgedistill_router_answers",
            "Predict answers by who served them",
            ["served_by"],
            registry=r,
        )
        self.fallbacks = Counter(
            "edgedistill_router_fallbacks",
            "Calls (Predict, Generate) sent to the API, by reason",
            ["reason"],
            registry=r,
        )
        self.blocked = Counter(
            "edgedistill_router_blocked_fallbacks",
            "Wanted fallbacks not taken, by reason",
            ["reason"],
            registry=r,
        )
        self.fallback_rate = Gauge(
            "edgedistill_router_fallback_rate",
            "Fraction of recent Predict calls sent to the API",
            registry=r,
        )
        self.breaker_state = Gauge(
            "edgedistill_router_breaker_state",
            "API circuit: 0 closed, 1 half-open, 2 open",
            registry=r,
        )
        self.api_latency = Histogram(
            "edgedistill_router_api_latency_seconds",
            "API call latency",
            registry=r,
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.api_tokens = Counter(
            "edgedistill_router_api_tokens",
            "Tokens the API model counted for the calls sent to it, by kind (prompt, completion)",
            ["kind"],
            registry=r,
        )
        self.api_errors = Counter(
            "edgedistill_router_api_errors", "API failures by kind", ["kind"], registry=r
        )
        self.budget_left = Gauge(
            "edgedistill_router_budget_left",
            "API calls left in the window (-1: unlimited)",
            ["window"],
            registry=r,
        )

        self.harvested = Counter(
            "edgedistill_router_harvested",
            "Records written to the harvest, by kind (fallback, sample)",
            ["kind"],
            registry=r,
        )
        self.harvest_on_disk = Gauge(
            "edgedistill_router_harvest_records",
            "Harvest records on disk after retention",
            registry=r,
        )
