"""The agent model every policy shares: an app's DAG facts and each agent's state.

One ``AgentState`` per (app, DAG node): its phase, GPU/host blocks, copies in flight, the
tool call it waits on and that call's prediction. ``AppState`` holds an app's analysed DAG
and its agents. The policies (``tracking`` and its subclasses) own and mutate them.

The phases are ``tokencake.phases``' (the daemon's registry keeps the same machine; that
module says why a policy keeps its own copy).
"""

from __future__ import annotations

import math

from tokencake import protocol as p
from tokencake.daemon.scheduler.dag import DagInfo, NodeInfo
from tokencake.daemon.scheduler.predictor import Prediction
from tokencake.phases import DONE, IDLE, RUNNING, TOOL, WAITING

__all__ = ["DONE", "IDLE", "RUNNING", "TOOL", "WAITING", "AgentState", "AppState"]


class AppState:
    __slots__ = (
        "agents",
        "app_id",
        "awaiting",
        "done_nodes",
        "ended",
        "info",
        "join_done",
        "registered_s",
        "tenant",
    )

    def __init__(self, app_id: str, info: DagInfo, now: float, tenant: str = "") -> None:
        self.app_id = app_id
        self.info = info
        self.tenant = tenant
        self.registered_s = now
        self.agents: dict[str, AgentState] = {}
        self.awaiting = 0
        """Agents whose tool call ended and whose KV nobody has read yet (``await_reader``)."""
        self.done_nodes = 0
        self.join_done: dict[str, int] = {}
        self.ended = False

    def node(self, agent_id: str) -> NodeInfo:
        i = self.info.index.get(agent_id)
        if i is not None:
            return self.info.nodes[i]
        return NodeInfo(agent_id, agent_id, 1.0, "", 0.0, 0.0)


class AgentState:
    __slots__ = (
        "app",
        "await_reader",
        "call_offloaded",
        "critical",
        "deadline_s",
        "drop_on_arrival",
        "gpu_blocks",
        "host_blocks",
        "key",
        "klass",
        "kv_size",
        "l2_blocks",
        "last_used_s",
        "llm_calls",
        "node",
        "offload_moves",
        "offloading",
        "overdue",
        "phase",
        "phase_since",
        "pinned_until",
        "predicted_s",
        "prediction",
        "preemptions",
        "tool_hint",
        "tool_kind",
        "tool_start",
        "tool_token",
        "upload_failures",
        "upload_left",
        "upload_parked",
        "upload_piece",
        "upload_pieces",
        "upload_priority",
        "upload_reason",
        "upload_token",
        "uploading",
        "wait_blocks",
        "wait_since",
        "wait_total_s",
    )

    def __init__(self, app: AppState, node: NodeInfo, now: float) -> None:
        self.app = app
        self.node = node
        self.key = (app.app_id, node.node_id)
        self.klass = node.agent_type
        self.critical = node.on_critical_path
        """On the app's critical path: the DAG analysis decides it at registration, and an
        agent's node never changes (read on every event, so a field, not a property)."""
        self.phase = IDLE
        self.phase_since = now
        self.gpu_blocks = 0
        self.host_blocks = 0
        self.l2_blocks = 0  # of host_blocks, those that left the arena for the L2 tier
        self.offloading = 0
        self.offload_moves = True
        self.uploading = 0
        self.upload_left = 0
        self.upload_token = 0
        self.upload_priority = p.URGENT
        self.upload_piece = 0
        self.upload_pieces = 0
        self.upload_parked = False
        self.upload_failures = 0
        self.upload_reason: dict[str, p.Term] = {}
        self.kv_size = 0
        self.pinned_until = -math.inf
        self.wait_since = now
        self.wait_blocks = 0
        self.wait_total_s = 0.0
        self.preemptions = 0
        self.llm_calls = 0
        self.last_used_s = now
        self.tool_kind = ""
        self.tool_start = 0.0
        self.tool_hint: float | None = None
        self.tool_token = 0
        self.prediction: Prediction | None = None
        self.predicted_s: float | None = None
        self.deadline_s = math.inf
        self.overdue = False
        self.drop_on_arrival = False
        self.await_reader: tuple[str, str] | None = None
        """(agent type, tool kind) of the tool call that ended, until something reads the
        agent's KV (its own next call, or a DAG successor's) or its app ends unread."""
        self.call_offloaded = 0
        """Blocks offloaded during the current (or last) tool call."""
