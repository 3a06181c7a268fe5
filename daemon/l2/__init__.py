"""The L2 tier: KV blocks beyond the host arena, in a store shared by many daemons.

``codec`` names blocks and seals their values, ``backends`` talks to a store (Redis, Redis
Cluster, Valkey, a local directory), ``tier`` moves values on worker threads behind bounded
queues, and ``bridge`` connects it all to the host store and the arena on the event loop.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from tokencake.daemon.config import DaemonConfig
    from tokencake.daemon.l2.bridge import L2Bridge


class L2StartError(RuntimeError):
    """The configured L2 tier cannot be set up; the message is one line."""


def open_l2(config: DaemonConfig, registry: CollectorRegistry | None = None) -> L2Bridge:
    """The L2 tier ``config`` asks for. Imported only when one is configured, so a daemon
    without one needs none of its packages (``pip install 'tokencake[l2]'``)."""
    try:
        from tokencake.daemon.l2.backends import L2Error
        from tokencake.daemon.l2.bridge import open_bridge
    except ImportError as exc:
        raise L2StartError(
            f"l2_backend {config.l2_backend} needs {exc.name}: pip install 'tokencake[l2]'"
        ) from None
    try:
        return open_bridge(config, registry)
    except L2Error as exc:
        raise L2StartError(str(exc)) from None
