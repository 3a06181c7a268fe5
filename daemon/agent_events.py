"""Agent events from clients and engines: validated, applied to the app registry, then told
to the scheduler, whose decisions go out through ``apply``.

An event that does not fit the agent's phase (``tokencake.phases``: a second
``llm_call_start`` while one runs, a ``tool_call_end`` for another call) is acknowledged as
not accepted and changes nothing.
"""

from __future__ import annotations

import logging
import math

from tokencake import phases
from tokencake import protocol as p
from tokencake.daemon.apps import AgentRecord
from tokencake.daemon.parts import DaemonParts
from tokencake.protocol import ErrorCode, ProtocolError

logger = logging.getLogger(__name__)

IDLE_CHECK_S = 10.0
"""How often, at most, live apps are checked for ``app_idle_timeout_s``."""


class AgentEvents:
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

    def llm_call_start(self, _identity: bytes, req: p.LlmCallStart) -> p.EventAck:
        agent = self._parts.apps.agent(req.app_id, req.agent_id)
        if req.engine_id and self._parts.engines.get(req.engine_id) is None:
            raise ProtocolError(ErrorCode.UNKNOWN_ENGINE, f"no engine {req.engine_id[:64]!r}")
        if not self._move(agent, req):
            return p.EventAck(accepted=False)
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

    def llm_call_finish(self, _identity: bytes, req: p.LlmCallFinish) -> p.EventAck:
        agent = self._parts.apps.agent(req.app_id, req.agent_id)
        admitted = agent.state == phases.RUNNING
        if not self._move(agent, req):
            return p.EventAck(accepted=False)
        agent.kv_blocks = req.kv_blocks
        return self._ack(self._parts.scheduler.llm_call_finish(agent, req, admitted=admitted))

    def tool_call_start(self, _identity: bytes, req: p.ToolCallStart) -> p.EventAck:
        agent = self._parts.apps.agent(req.app_id, req.agent_id)
        if not self._move(agent, req):
            return p.EventAck(accepted=False)
        agent.tool_calls += 1
        agent.tool_kind, agent.tool_call_id = req.tool_kind, req.call_id
        agent.tool_predicted_s = req.predicted_s
        return self._ack(self._parts.scheduler.agent_event(agent, req))

    def tool_call_end(self, _identity: bytes, req: p.ToolCallEnd) -> p.EventAck:
        agent = self._parts.apps.agent(req.app_id, req.agent_id)
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
            self._parts.apply(self._parts.scheduler.app_end(self._parts.apps.end(app_id, now)))
        if idle:
            self._parts.metrics.apps.set(len(self._parts.apps))

    def app_end(self, _identity: bytes, req: p.AppEnd) -> p.EventAck:
        record = self._parts.apps.end(req.app_id, self._parts.clock())
        self._parts.metrics.apps.set(len(self._parts.apps))
        return self._ack(self._parts.scheduler.app_end(record))
