"""Connector settings, read from ``kv_connector_extra_config``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

SAVE_MODES = ("finished", "tool", "never")
TOOL_OFFLOAD_MODES = ("daemon", "always", "never")


@dataclass(slots=True)
class ConnectorConfig:
    """Every key of ``kv_connector_extra_config`` the connector reads, with its default."""

    endpoint: str = ""
    """tokencaked's ZMQ endpoint; empty: ``$TOKENCAKE_ENDPOINT``, else the daemon default."""
    engine_name: str = ""
    """Stable engine name; empty: ``vllm:<model>``. Re-registering a name replaces it."""
    timeout_ms: float = 20.0
    """Per-request reply timeout. The scheduler thread waits at most this long per call."""
    reconnect_s: float = 1.0
    """How often a down daemon is retried (a non-blocking ZMQ connect plus one register)."""
    save: str = "finished"
    """Which finished requests write their full blocks through to the host store:
    ``finished`` (all), ``tool`` (only those with a tool hint), ``never`` (only on an
    offload decision)."""
    tool_offload: str = "daemon"
    """When a request ends in a tool call: ``daemon`` waits for the daemon's offload/keep
    decision, ``always`` stores and frees the agent's GPU blocks at once, ``never`` keeps them."""
    salt: str = ""
    """Tenant salt passed with every hash (vLLM's ``cache_salt`` is already in its hashes)."""
    priority_refresh_s: float = 0.1
    """``TokenCakeScheduler`` only: how often it asks the daemon for agent priorities
    (``list_agents``) while requests wait; a new agent request triggers one sooner."""
    state_report_s: float = 0.05
    """How often, at most, the engine's pool state (free GPU blocks, waiting and running
    requests) is reported to the daemon when it changed. The daemon's policy decides
    offloads from it (pressure, waiting demand); leases are renewed every heartbeat anyway."""
    reserve_fraction: float = 0.5
    """``TokenCakeScheduler`` only: at most this share of the GPU pool is held back for
    critical-path agents in a tool call; 0 turns the admission guard off."""
    hold_max_s: float = 60.0
    """The longest any hold taken on the daemon's behalf lasts, whatever the daemon says:
    a pin of an agent's GPU blocks, or ``TokenCakeScheduler`` deferring a request to keep
    blocks free for critical agents. Enforced by the connector's own clock every step."""
    preload: bool = True
    """On the daemon's ``upload`` decision, copy the agent's host KV into free GPU blocks
    and register them in vLLM's prefix cache before its next request (predictive upload);
    off: the next request loads it from the host when it arrives."""
    preload_chunk_blocks: int = 16
    """The most GPU blocks a predictive upload takes from vLLM's free queue per step."""
    preload_min_free: float = 0.05
    """A predictive upload leaves at least this share of the pool free, beyond what waiting
    requests need and one block per running request."""
    lookup_retry_s: float = 0.1
    """A waiting request that vLLM could not allocate for is looked up again each step; its
    last answer (a hit, its host slots still pinned, or a miss) stands this long, unless a
    copy of this engine started or ended since. 0: every retry asks the daemon."""
    idle_tick_s: float = 0.005
    """While vLLM has no requests but the connector awaits the daemon's decisions for its
    agents in tool calls, the engine keeps stepping (vLLM's ``has_pending_push_work``) at
    most once per this interval, so decisions and copies happen without traffic."""
    liveness_s: float = 2.0
    """While the connector holds blocks for the daemon, it must have had a reply within
    this long; otherwise it pings once (``timeout_ms``) and, if that fails, marks the link
    down and releases every hold. A dead or stopped daemon holds nothing for longer."""

    def __post_init__(self) -> None:
        if self.save not in SAVE_MODES:
            raise ValueError(f"save must be one of {SAVE_MODES}, got {self.save!r}")
        if self.tool_offload not in TOOL_OFFLOAD_MODES:
            raise ValueError(
                f"tool_offload must be one of {TOOL_OFFLOAD_MODES}, got {self.tool_offload!r}"
            )
        if not 0 < self.timeout_ms <= 10_000:
            raise ValueError("timeout_ms must be in (0, 10000]")
        if self.reconnect_s <= 0:
            raise ValueError("reconnect_s must be positive")
        if not 0 <= self.priority_refresh_s <= 3600:
            raise ValueError("priority_refresh_s must be in [0, 3600]")
        if not 0 < self.state_report_s <= 3600:
            raise ValueError("state_report_s must be in (0, 3600]")
        if not 0 <= self.reserve_fraction <= 1:
            raise ValueError("reserve_fraction must be in [0, 1]")
        if not 0 < self.hold_max_s <= 3600:
            raise ValueError("hold_max_s must be in (0, 3600]")
        if not 1 <= self.preload_chunk_blocks <= 65536:
            raise ValueError("preload_chunk_blocks must be in [1, 65536]")
        if not 0 <= self.preload_min_free < 1:
            raise ValueError("preload_min_free must be in [0, 1)")
        if not 0 <= self.lookup_retry_s <= 60:
            raise ValueError("lookup_retry_s must be in [0, 60]")
        if not 0 <= self.idle_tick_s <= 1:
            raise ValueError("idle_tick_s must be in [0, 1]")
        if not 0 < self.liveness_s <= 3600:
            raise ValueError("liveness_s must be in (0, 3600]")

    @classmethod
    def from_extra(cls, extra: dict[str, Any] | None) -> ConnectorConfig:
        extra = dict(extra or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(f"unknown TokenCake connector keys {unknown}; known: {sorted(known)}")
        return cls(**extra)
