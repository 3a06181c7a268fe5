"""The agent service: applications and their agents, and their events.

One service for agents, as ``kv_service`` is one for blocks, in two parts:

* the registry (``AppRegistry``): each app's DAG and each agent's record. It validates what
  peers report (unknown apps and agents are typed errors, DAGs must be acyclic) and owns the
  agent's phase (``tokencake.phases`` moves it; the policies' copies follow the same
  machine);
* the handlers of the agent ops (``AgentService``): an event is validated, applied to the
  registry, then told to the policies (``policy_bridge.SchedulerBridge``), whose decisions
  go out through ``DaemonParts.apply`` (``policy_bridge.DecisionLog``). An event that does
  not fit the agent's phase (a second ``llm_call_start`` while one runs, a ``tool_call_end``
  for another call) is acknowledged as not accepted and changes nothing, except an idle
  agent's ``tool_call_end`` whose start another sender has not reported yet: it is held for
  that start (``tokencake.phases``, "Early ends").

No scheduling logic lives here; priorities, critical paths and decisions are the policies'
(``daemon/scheduler``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokencake import phases
from tokencake import protocol as p
from tokencake.daemon.scheduler import events as ev
from tokencake.daemon.scheduler.dag import DagError, topological_order
from tokencake.protocol import MAX_NAME_CHARS, AppDag, ErrorCode, ProtocolError

if TYPE_CHECKING:
    from tokencake.daemon.parts import DaemonParts

logger = logging.getLogger(__name__)

IDLE_CHECK_S = 10.0
"""How often, at most, live apps are checked for ``app_idle_timeout_s``."""

# ---------------------------------------------------------------------- the registry


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
    early_ends: tuple[phases.EarlyEnd, ...] = ()
    """``tool_call_end`` events held for their start (``tokencake.phases``)."""


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


# ---------------------------------------------------------------------- the agent ops


class AgentService:
    """The agent ops' handlers: ``register_app``, the call events, ``app_end``."""

    def __init__(self, parts: DaemonParts) -> None:
        self._parts = parts
        self._next_idle_check = -math.inf

    def _ack(self, decisions: list[p.DecisionRecord]) -> p.EventAck:
        self._parts.apply(decisions)
        return p.EventAck(accepted=True, decisions=len(decisions))

    def register_app(self, _identity: bytes, req: p.RegisterApp) -> p.EventAck:
        record, created = self._parts.apps.register(
            req.app_id, req.dag, req.tenant, self._parts.clock()
        )
        if created:
            self._parts.metrics.apps.set(len(self._parts.apps))
            return self._ack(self._parts.scheduler.app_registered(record))
        return p.EventAck(accepted=True)

    def _move(self, agent: AgentRecord, req: phases.PhaseEvent) -> bool:
        """Move the agent's phase by ``req``; False (nothing changed) when it does not fit."""
        if not phases.fits(agent.state, req):
            return False
        agent.state, agent.state_since = phases.after(req), self._parts.clock()
        return True

    def _count_early(self, outcome: str, n: int = 1) -> None:
        if n > 0:
            counts = self._parts.metrics.early_tool_ends
            counts[outcome] = counts.get(outcome, 0) + n

    def _drop_early(self, agent: AgentRecord) -> None:
        """The agent moved on (a new LLM call, its app's end): held ends end nothing now."""
        self._count_early("dropped", len(agent.early_ends))
        agent.early_ends = ()

    def llm_call_start(self, _identity: bytes, req: p.LlmCallStart) -> p.EventAck:
        agent = self._parts.apps.agent(req.app_id, req.agent_id)
        if req.engine_id and self._parts.engines.get(req.engine_id) is None:
            raise ProtocolError(ErrorCode.UNKNOWN_ENGINE, f"no engine {req.engine_id[:64]!r}")
        if not self._move(agent, req):
            return p.EventAck(accepted=False)
        self._drop_early(agent)
        agent.llm_calls += 1
        if req.engine_id:
            agent.engine_id = req.engine_id
        return self._ack(self._parts.scheduler.agent_event(agent, req))

    def llm_call_admitted(self, _identity: bytes, req: p.LlmCallAdmitted) -> p.EventAck:
        agent = self._parts.apps.agent(req.app_id, req.agent_id)
        if not self._move(agent, req):
            return p.EventAck(accepted=False)
        agent.kv_blocks = req.kv_blocks
        return self._ack(self._parts.scheduler.agent_event(agent, req))

    def llm_call_preempted(self, _identity: bytes, req: p.LlmCallPreempted) -> p.EventAck:
        agent = self._parts.apps.agent(req.app_id, req.agent_id)
        if not self._move(agent, req):
            return p.EventAck(accepted=False)
        agent.kv_blocks = req.blocks_freed if req.blocks_cached < 0 else req.blocks_cached
        return self._ack(self._parts.scheduler.agent_event(agent, req))

    def llm_call_finish(self, _identity: bytes, req: p.LlmCallFinish) -> p.EventAck:
        agent = self._parts.apps.agent(req.app_id, req.agent_id)
        admitted = agent.state == phases.RUNNING
        if not self._move(agent, req):
            return p.EventAck(accepted=False)
        agent.kv_blocks = req.kv_blocks
        return self._ack(self._parts.scheduler.llm_call_finish(agent, req, admitted=admitted))

    def tool_call_start(self, _identity: bytes, req: p.ToolCallStart) -> p.EventAck:
        agent = self._parts.apps.agent(req.app_id, req.agent_id)
        if not phases.fits(agent.state, req):
            return p.EventAck(accepted=False)
        now = self._parts.clock()
        early, agent.early_ends, stale = phases.take(agent.early_ends, req.call_id, now)
        self._count_early("dropped", stale)
        agent.tool_calls += 1
        agent.tool_kind, agent.tool_call_id = req.tool_kind, req.call_id
        agent.tool_predicted_s = req.predicted_s
        if early is None:
            self._move(agent, req)
            return self._ack(self._parts.scheduler.agent_event(agent, req))
        # Its end came first: the call is over (the agent stays idle, from now).
        self._count_early("applied")
        agent.state_since = now
        over = ev.ToolCallOver(
            req.app_id, req.agent_id, req.tool_kind, req.predicted_s, early.duration_s
        )
        return self._ack(self._parts.scheduler.agent_event(agent, over))

    def tool_call_end(self, _identity: bytes, req: p.ToolCallEnd) -> p.EventAck:
        agent = self._parts.apps.agent(req.app_id, req.agent_id)
        if phases.held_early(agent.state, req, agent.tool_call_id):
            end = phases.EarlyEnd(req.call_id, self._parts.clock(), agent.state_since)
            agent.early_ends, pushed_out = phases.hold(agent.early_ends, end)
            self._count_early("held")
            self._count_early("dropped", pushed_out)
            return p.EventAck(accepted=True, held=True)
        if req.call_id and req.call_id != agent.tool_call_id:
            return p.EventAck(accepted=False)
        if not self._move(agent, req):
            return p.EventAck(accepted=False)
        return self._ack(self._parts.scheduler.agent_event(agent, req))

    def expire_idle(self, now: float, idle_s: float) -> None:
        """End the apps that sent no event for ``idle_s`` seconds (0: never).

        Their client went away without ``app_end`` (it crashed, or was killed); without
        this their records and the scheduler's state for them would be kept forever.
        """
        if idle_s <= 0 or now < self._next_idle_check:
            return
        self._next_idle_check = now + min(idle_s / 4, IDLE_CHECK_S)
        idle = self._parts.apps.idle(now, idle_s)
        for app_id in idle:
            logger.warning("app idle, ended by the daemon", extra={"app_id": app_id})
            self._parts.apply(self._parts.scheduler.app_end(self._end(app_id, now)))
        if idle:
            self._parts.metrics.apps.set(len(self._parts.apps))

    def _end(self, app_id: str, now: float) -> AppRecord:
        record = self._parts.apps.end(app_id, now)
        for agent in record.agents.values():
            self._drop_early(agent)
        return record

    def app_end(self, _identity: bytes, req: p.AppEnd) -> p.EventAck:
        record = self._end(req.app_id, self._parts.clock())
        self._parts.metrics.apps.set(len(self._parts.apps))
        return self._ack(self._parts.scheduler.app_end(record))
