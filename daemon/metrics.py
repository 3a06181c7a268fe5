"""Prometheus metrics, served on a loopback HTTP port from prometheus-client's own thread.

The event loop only increments counters and sets gauges; scraping reads them. Pool gauges
are refreshed by the loop on its housekeeping timer, not by the scrape thread. Requests and
errors, counted on every message, are plain dict counters the loop keeps anyway; the scrape
thread copies them (one atomic ``dict`` copy under the GIL) instead of the loop paying for a
locked prometheus counter per message.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

_TRANSFER_BUCKETS = (1e-4, 5e-4, 1e-3, 5e-3, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class DaemonMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.pool_slots = Gauge(
            "tokencake_pool_slots", "Arena slots by state", ["state"], registry=r
        )
        self.pool_bytes = Gauge("tokencake_pool_bytes", "Arena size in bytes", registry=r)
        self.lookups = Counter(
            "tokencake_lookup_blocks_total", "Blocks asked for by lookups", ["result"], registry=r
        )
        self.bytes_moved = Counter(
            "tokencake_bytes_total",
            "KV bytes moved through the arena",
            ["direction"],
            registry=r,
        )
        self.transfer_seconds = Histogram(
            "tokencake_transfer_seconds",
            "Time from reserve to commit (offload) and load_begin to load_end (upload)",
            ["direction"],
            buckets=_TRANSFER_BUCKETS,
            registry=r,
        )
        self.event_counts: dict[str, int] = {}
        self.error_counts: dict[str, int] = {}
        self.early_tool_ends: dict[str, int] = {}
        """``tool_call_end`` events that came before their start, by outcome (``held``,
        ``applied``, ``dropped``)."""
        r.register(_CountsCollector(self))
        self.decisions = Counter(
            "tokencake_decisions_total", "Scheduler decisions by kind", ["kind"], registry=r
        )
        self.evictions = Counter("tokencake_evictions_total", "Blocks evicted", registry=r)
        self.engines = Gauge("tokencake_engines", "Registered engines", registry=r)
        self.apps = Gauge("tokencake_apps", "Live applications", registry=r)
        self._server: Any = None

    def serve(self, port: int) -> None:
        """Bind 127.0.0.1:port. Raises OSError when the port is taken."""
        if port:
            self._server, _thread = start_http_server(
                port, addr="127.0.0.1", registry=self.registry
            )
            logger.info("metrics on http://127.0.0.1:%d/metrics", port)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


class _CountsCollector(Collector):
    def __init__(self, metrics: DaemonMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily]:
        events = CounterMetricFamily("tokencake_events", "Requests by op", labels=["op"])
        for op, n in dict(self._metrics.event_counts).items():
            events.add_metric([op], n)
        yield events
        errors = CounterMetricFamily("tokencake_errors", "Error replies by code", labels=["code"])
        for code, n in dict(self._metrics.error_counts).items():
            errors.add_metric([code], n)
        yield errors
        early = CounterMetricFamily(
            "tokencake_early_tool_ends", "Tool call ends before their start", labels=["outcome"]
        )
        for outcome, n in dict(self._metrics.early_tool_ends).items():
            early.add_metric([outcome], n)
        yield early
