"""Prometheus metrics of one gateway app, in a registry of its own.

A registry per app (not prometheus_client's global one) lets tests and benchmarks run several
gateways in one process without "duplicated timeseries" errors, and keeps the metrics of one
app its own.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "GatewayMetrics"]

# Routing takes microseconds without the encoder and ~10 ms with it: buckets span both.
_DECISION_BUCKETS = (
    0.00002, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 1.0,
)
_BACKEND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GatewayMetrics:
    """The gateway's metrics (all names start with ``tagrouter_``)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.decision_seconds = Histogram(
            "tagrouter_decision_seconds",
            "Time to route one request: tagging, alignment and the decider",
            buckets=_DECISION_BUCKETS,
            registry=r,
        )
        self.routed = Counter(
            "tagrouter_routed", "Requests routed, by answering model and reason",
            ["model", "reason"], registry=r,
        )
        self.backend_seconds = Histogram(
            "tagrouter_backend_seconds",
            "Backend latency: whole answer (non-streaming) or time to the first event (streaming)",
            ["backend"],
            buckets=_BACKEND_BUCKETS,
            registry=r,
        )
        self.backend_errors = Counter(
            "tagrouter_backend_errors",
            "Failed backend calls, by kind (timeout, connect, reset, status, malformed)",
            ["backend", "kind"],
            registry=r,
        )
        self.feedback = Counter(
            "tagrouter_feedback", "Feedback requests, by result (accepted, unknown, duplicate, "
            "invalid, unavailable)", ["result"], registry=r,
        )
        self.rejected = Counter(
            "tagrouter_rejected", "Requests refused before routing, by reason", ["reason"],
            registry=r,
        )
        self.inflight = Gauge(
            "tagrouter_inflight_requests", "Requests in flight on the /v1 endpoints", registry=r
        )
        self.store_version = Gauge(
            "tagrouter_store_version", "Version of the outcome store (feedback applied)",
            registry=r,
        )
        self.sessions = Gauge("tagrouter_sessions", "Sessions held", registry=r)
        # Spending (policy.spending): by client key id and the backend that answered.
        self.cost_usd = Counter(
            "tagrouter_cost_usd", "USD charged for answered requests, at the price of the "
            "backend that answered", ["key", "model"], registry=r,
        )
        self.usage_tokens = Counter(
            "tagrouter_usage_tokens", "Tokens charged, by kind (input, output)",
            ["key", "model", "kind"], registry=r,
        )
        self.usage_estimated = Counter(
            "tagrouter_usage_estimated", "Answers charged on estimated usage (the backend "
            "reported none)", ["key", "model"], registry=r,
        )

    def track_store_version(self, fn: Callable[[], float]) -> None:
        """Reads the store version when scraped, so the gauge never lags."""
        self.store_version.set_function(fn)

    def track_sessions(self, fn: Callable[[], float]) -> None:
        self.sessions.set_function(fn)

    def render(self) -> bytes:
        return generate_latest(self.registry)
