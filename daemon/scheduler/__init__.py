"""The scheduler brain: pure decision code shared by the daemon and the simulator.

Start with ``policy`` (the interface and registry), ``events`` (what goes in) and the
decision structs of ``tokencake.protocol`` (what comes out: ``DecisionRecord``).
"""

from __future__ import annotations

from tokencake.daemon.scheduler.events import (
    AppEnd,
    AppRegistered,
    EngineState,
    Event,
    KvEvicted,
    KvTierMoved,
    LlmCallAdmitted,
    LlmCallFinish,
    LlmCallPreempted,
    LlmCallStart,
    Tick,
    ToolCallEnd,
    ToolCallStart,
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
    "AgentView",
    "AppEnd",
    "AppRegistered",
    "CachedKv",
    "EngineState",
    "Event",
    "KvEvicted",
    "KvTierMoved",
    "LlmCallAdmitted",
    "LlmCallFinish",
    "LlmCallPreempted",
    "LlmCallStart",
    "Policy",
    "PolicyConfig",
    "PolicyError",
    "PolicyInfo",
    "Tick",
    "ToolCallEnd",
    "ToolCallStart",
    "TransferDone",
    "TransferMeasured",
    "UnknownPolicyError",
    "WaitingRequest",
    "create_policy",
    "list_policies",
    "register_policy",
]
