"""The gateway's Prometheus metrics, served at ``/tokencake/metrics`` (``/metrics`` is the
engine's, passed through)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

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

    def count_daemon_messages(self, read: Callable[[], dict[str, int]]) -> None:
        """Export the daemon link's own counts (``read``: outcome -> count) at each scrape."""
        self.registry.register(_DaemonMessages(read))


class _DaemonMessages(Collector):
    def __init__(self, read: Callable[[], dict[str, int]]) -> None:
        self.read = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "tokencake_gateway_daemon_messages",
            "Agent events and app registrations for tokencaked, by outcome: sent (acknowledged),"
            " missed (not delivered: daemon down, no reply in time, link full), rejected.",
            labels=["outcome"],
        )
        for outcome, count in self.read().items():
            family.add_metric([outcome], count)
        yield family
