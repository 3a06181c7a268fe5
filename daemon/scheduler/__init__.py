"""The scheduler brain: pure decision code shared by the daemon and the simulator.

Start with ``policy`` (the interface and registry), ``events`` (what goes in: the
protocol's agent events, and the engine's reports) and the decision structs of
``tokencake.protocol`` (what comes out: ``DecisionRecord``).
"""

from __future__ import annotations

from tokencake.daemon.scheduler.events import (
    AgentEvent,
    EngineEvent,
    EngineState,
    Event,
    KvEvicted,
    KvTierMoved,
    LlmCallPreempted,
    Tick,
    TransferDone,
    TransferMeasured,
)
from tokencake.daemon.scheduler.policy import (
    AgentView,
    CachedKv,
    Policy,
    PolicyConfig,
    PolicyError,
    PolicyInfo,
    UnknownPolicyError,
    WaitingRequest,
    create_policy,
    list_policies,
    register_policy,
)

__all__ = [
    "AgentEvent",
    "AgentView",
    "CachedKv",
    "EngineEvent",
    "EngineState",
    "Event",
    "KvEvicted",
    "KvTierMoved",
    "LlmCallPreempted",
    "Policy",
    "PolicyConfig",
    "PolicyError",
    "PolicyInfo",
    "Tick",
    "TransferDone",
    "TransferMeasured",
    "UnknownPolicyError",
    "WaitingRequest",
    "create_policy",
    "list_policies",
    "register_policy",
]
