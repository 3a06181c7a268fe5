"""Applications and their agents as the daemon knows them: the DAG and each node's phase.

The registry validates what peers report (unknown apps and agents are typed errors, DAGs
must be acyclic) so the scheduler only ever sees consistent events. It owns the agent's
phase (``tokencake.phases`` moves it; the policies' copies follow the same machine). It holds
no scheduling logic; priorities and critical paths come from the scheduler.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from tokencake import phases
from tokencake.daemon.scheduler.dag import DagError, topological_order
from tokencake.protocol import MAX_NAME_CHARS, AppDag, ErrorCode, ProtocolError

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class AgentRecord:
    app_id: str
    agent_id: str
    agent_type: str
    importance: float
    state: str = phases.IDLE
    """The agent's phase (``tokencake.phases``)."""
    state_since: float = 0.0
    engine_id: str = ""
    kv_blocks: int = 0
    llm_calls: int = 0
    tool_calls: int = 0
    tool_kind: str = ""
    tool_call_id: str = ""
    tool_predicted_s: float | None = None


@dataclass(slots=True)
class AppRecord:
    app_id: str
    tenant: str
    dag: AppDag
    registered_at: float
    agents: dict[str, AgentRecord] = field(default_factory=dict)
    ended: bool = False


def validate_dag(dag: AppDag) -> None:
    """Reject DAGs a scheduler cannot reason about: duplicates, dangling edges, cycles.

    Lengths and ranges (ids, node count, durations) were checked as the request was decoded
    (the ``msgspec.Meta`` constraints of ``protocol.RegisterApp``)."""
    ids: set[str] = set()
    for node in dag.nodes:
        if node.id in ids:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"duplicate node id {node.id!r}")
        ids.add(node.id)
    for src, dst in dag.edges:
        if src not in ids or dst not in ids:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"edge {src!r}->{dst!r} names no node")
        if src == dst:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"self-loop on {src!r}")
    try:
        topological_order(ids, dag.edges)
    except DagError as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, str(exc)) from None


class AppRegistry:
    """All live applications. Ended apps are kept briefly for introspection, then pruned."""

    def __init__(self, keep_ended: int = 256) -> None:
        self._apps: dict[str, AppRecord] = {}
        self._ended: deque[str] = deque()
        self._keep_ended = keep_ended

    def __len__(self) -> int:
        return len(self._apps)

    def apps(self) -> list[AppRecord]:
        return list(self._apps.values())

    def num_agents(self) -> int:
        return sum(len(app.agents) for app in self._apps.values() if not app.ended)

    def register(self, app_id: str, dag: AppDag, tenant: str, now: float) -> tuple[AppRecord, bool]:
        """Returns (record, created). Re-registering an identical live app is a no-op."""
        validate_dag(dag)
        existing = self._apps.get(app_id)
        if existing is not None and not existing.ended:
            if existing.dag == dag and existing.tenant == tenant:
                return existing, False
            raise ProtocolError(
                ErrorCode.CONFLICT, f"app {app_id!r} is live with a different DAG or tenant"
            )
        record = AppRecord(app_id=app_id, tenant=tenant, dag=dag, registered_at=now)
        for node in dag.nodes:
            record.agents[node.id] = AgentRecord(
                app_id=app_id,
                agent_id=node.id,
                agent_type=node.agent_type or node.id,
                importance=node.importance,
                state_since=now,
            )
        if existing is not None:
            self._ended.remove(app_id)
        self._apps[app_id] = record
        return record, True

    def app(self, app_id: str) -> AppRecord:
        record = self._apps.get(app_id)
        if record is None or record.ended:
            raise ProtocolError(ErrorCode.UNKNOWN_APP, f"no live app {app_id[:MAX_NAME_CHARS]!r}")
        return record

    def agent(self, app_id: str, agent_id: str) -> AgentRecord:
        agent = self.app(app_id).agents.get(agent_id)
        if agent is None:
            raise ProtocolError(
                ErrorCode.UNKNOWN_AGENT,
                f"app {app_id!r} has no agent {agent_id[:MAX_NAME_CHARS]!r}",
            )
        return agent

    def idle(self, now: float, idle_s: float) -> list[str]:
        """Live apps none of whose agents changed state for ``idle_s`` seconds."""
        cutoff = now - idle_s
        return [
            app.app_id
            for app in self._apps.values()
            if not app.ended
            and app.registered_at < cutoff
            and all(a.state_since < cutoff for a in app.agents.values())
        ]

    def end(self, app_id: str, now: float) -> AppRecord:
        record = self.app(app_id)
        record.ended = True
        for agent in record.agents.values():
            agent.state = phases.DONE
            agent.state_since = now
        self._ended.append(app_id)
        while len(self._ended) > self._keep_ended:
            self._apps.pop(self._ended.popleft(), None)
        return record
