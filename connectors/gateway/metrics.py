"""The gateway's Prometheus metrics, served at ``/tokencake/metrics`` (``/metrics`` is the
engine's, passed through)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

ERROR_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "tokencake_gateway_requests",
            "Requests proxied, by endpoint and upstream status (0: no upstream answer).",
            ["endpoint", "status"],
            registry=r,
        )
        self.tool_calls = Counter(
            "tokencake_gateway_inferred_tool_calls",
            "Tool calls the gateway inferred from responses, by tool kind.",
            ["tool"],
            registry=r,
        )
        self.prediction_error = Histogram(
            "tokencake_gateway_tool_prediction_error_seconds",
            "|predicted - observed| tool duration, for calls that had a prediction.",
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.tool_seconds = Histogram(
            "tokencake_gateway_tool_seconds",
            "Observed tool call durations (response end to the next request).",
            buckets=ERROR_BUCKETS,
            registry=r,
        )
        self.conversations = Gauge(
            "tokencake_gateway_conversations", "Conversations tracked now.", registry=r
        )
        self.identity = Counter(
            "tokencake_gateway_conversations_started",
            "Conversations started, by the identity rule that named them.",
            ["rule"],
            registry=r,
        )
        self.passthrough = Counter(
            "tokencake_gateway_passthrough",
            "Requests forwarded unchanged (daemon_down, registering, managed, untracked).",
            ["reason"],
            registry=r,
        )
        self.upstream_errors = Counter(
            "tokencake_gateway_upstream_errors",
            "Requests no upstream answered (connection refused, reset, timeout).",
            registry=r,
        )
        self.client_disconnects = Counter(
            "tokencake_gateway_client_disconnects",
            "Requests whose client went away before the response ended.",
            registry=r,
        )
