"""The scheduler brain: pure decision code shared by the daemon and the simulator.

Start with ``policy`` (the interface and registry), ``events`` (what goes in) and
``decisions`` (what comes out).
"""

from __future__ import annotations

from tokencake.daemon.scheduler.decisions import (
    Decision,
    Drop,
    Keep,
    Offload,
    Partition,
    Pin,
    Reason,
    Unpin,
    Upload,
)
from tokencake.daemon.scheduler.events import (
    AppEnd,
    AppRegistered,
    EngineState,
    Event,
    KvEvicted,
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
    "Decision",
    "Drop",
    "EngineState",
    "Event",
    "Keep",
    "KvEvicted",
    "LlmCallAdmitted",
    "LlmCallFinish",
    "LlmCallPreempted",
    "LlmCallStart",
    "Offload",
    "Partition",
    "Pin",
    "Policy",
    "PolicyConfig",
    "PolicyError",
    "PolicyInfo",
    "Reason",
    "Tick",
    "ToolCallEnd",
    "ToolCallStart",
    "TransferDone",
    "TransferMeasured",
    "UnknownPolicyError",
    "Unpin",
    "Upload",
    "WaitingRequest",
    "create_policy",
    "list_policies",
    "register_policy",
]
