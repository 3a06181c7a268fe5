"""What the daemon's services share: settings, clock, metrics, registries and the scheduler.

``Daemon`` builds one ``DaemonParts`` and hands it to each service (engines, KV, agents,
introspection), so a service names what it uses once and the wiring lives in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from tokencake import protocol as p
from tokencake.daemon.agent_service import AppRegistry, SchedulerBridge
from tokencake.daemon.config import DaemonConfig
from tokencake.daemon.engines import EngineRegistry
from tokencake.daemon.metrics import DaemonMetrics

ApplyDecisions = Callable[[list[p.DecisionRecord]], None]


@dataclass(slots=True, frozen=True)
class DaemonParts:
    config: Callable[[], DaemonConfig]
    """The running configuration (SIGHUP may replace it)."""
    clock: Callable[[], float]
    """The daemon's monotonic clock."""
    metrics: DaemonMetrics
    engines: EngineRegistry
    apps: AppRegistry
    scheduler: SchedulerBridge
    apply: ApplyDecisions
    """Where the scheduler's decisions go: kept, counted and pushed (``DecisionLog.apply``)."""
