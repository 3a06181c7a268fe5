"""The agent service: applications and their agents, their events, and the daemon's bridge to
its policies. One service for agents, as ``kv_service`` is one for blocks:

* the registry (``AppRegistry``): each app's DAG and each agent's record. It validates what
  peers report and owns the agent's phase (``tokencake.phases`` moves it; the policies'
  copies follow the same machine);
* the agent ops' handlers (``AgentService``): an event is validated, applied to the
  registry, then told to the policies. An event that does not fit the agent's phase (a
  second ``llm_call_start`` while one runs, a ``tool_call_end`` for another call) is
  acknowledged as not accepted and changes nothing, except an idle agent's ``tool_call_end``
  whose start another sender has not reported yet: it is held for that start
  (``tokencake.phases``, "Early ends");
* events in (``SchedulerBridge``): one policy per registered engine (it schedules that
  engine's GPU KV pool). Every policy hears of every application; an agent's events go to
  the engine that serves it (named in its last ``llm_call_start``; to all while it has
  none), as the struct the peer sent, with the daemon's clock. The engine's own reports
  (pool state, copies, the L2 tier) become the policy's engine events;
* decisions out (``DecisionLog``, through ``DaemonParts.apply``): every part's decisions are
  numbered, kept for ``tokencake-ctl decisions``, counted, and pushed to the engine they
  concern when its connector acts on that kind. An upload also asks the L2 tier to bring
  back what of the agent's KV went there, so the engine finds it in the arena.

No scheduling logic lives here; priorities, critical paths and decisions are the policies'
(``daemon/scheduler``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokencake import phases
from tokencake import protocol as p
from tokencake.daemon.engines import EngineRegistry
from tokencake.daemon.eviction import EvictionPolicy, make_policy
from tokencake.daemon.metrics import DaemonMetrics
from tokencake.daemon.scheduler import events as ev
from tokencake.daemon.scheduler.dag import DagError, topological_order
from tokencake.daemon.scheduler.policy import Policy, PolicyConfig, create_policy, policy_class
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


# ---------------------------------------------------------------------- events in


@dataclass(slots=True)
class AgentSummary:
    """What the policies know of one agent, for ``tokencake-ctl agents``."""

    priority: float = 0.0
    on_critical_path: bool = False
    host_blocks: int = 0
    protect_blocks: int = 0
    app_registered_s: float | None = None
    """None when no policy tracks the agent."""
    app_lead_s: float = 0.0
    """How far ahead of its registration the agent's application ranks (the tail guard)."""


class SchedulerBridge:
    """Feeds protocol events to per-engine policies; turns decisions into records."""

    def __init__(self, policy_name: str, *, clock: Callable[[], float]) -> None:
        policy_class(policy_name)  # fail at start, with the registry's message, on a bad name
        self.policy_name = policy_name
        self._clock = clock
        self._policies: dict[str, Policy] = {}
        self._configs: dict[str, PolicyConfig] = {}
        self._pool_sizes: dict[str, int] = {}
        self._apps: dict[str, AppRecord] = {}
        self._tags: dict[tuple[str, str], int] = {}
        self._tag_agents: dict[int, tuple[str, str]] = {}
        self._next_tag = 1

    # ------------------------------------------------------------------ engines

    def engine_registered(
        self,
        engine_id: str,
        num_gpu_blocks: int,
        bytes_per_block: int,
        host_blocks: int = 0,
        l2_bytes_per_s: float = 1e9,
    ) -> None:
        config = PolicyConfig(
            bytes_per_block=bytes_per_block, host_blocks=host_blocks, l2_bytes_per_s=l2_bytes_per_s
        )
        self._configs[engine_id] = config
        policy = create_policy(self.policy_name, config)
        self._policies[engine_id] = policy
        now = self._clock()
        self._pool_sizes[engine_id] = num_gpu_blocks
        self._prime(policy, num_gpu_blocks, now)

    def _prime(self, policy: Policy, num_gpu_blocks: int, now: float) -> None:
        """Bring a fresh policy up to date: the engine's pool and the live applications."""
        if num_gpu_blocks > 0:
            # An engine's pool is taken as empty until its next report says otherwise:
            # without this the policy reads "0 free" (a full GPU) and offloads under no
            # pressure (found by bench/bench_fidelity.py).
            policy.on_event(ev.EngineState(num_gpu_blocks, num_gpu_blocks, 0, 0), now)
        for app in self._apps.values():
            policy.on_event(_registered(app), now)

    def engine_gone(self, engine_id: str) -> None:
        self._policies.pop(engine_id, None)
        self._configs.pop(engine_id, None)
        self._pool_sizes.pop(engine_id, None)

    def switch_policy(self, name: str) -> None:
        """SIGHUP to another policy: fresh instances, live apps replayed into them."""
        policy_class(name)
        self.policy_name = name
        for engine_id, config in self._configs.items():
            self._policies[engine_id] = policy = create_policy(name, config)
            self._prime(policy, self._pool_sizes.get(engine_id, 0), self._clock())

    def engine_state(
        self,
        engine_id: str,
        total: int,
        free: int,
        waiting: int,
        running: int,
        host_total: int = -1,
        host_free: int = -1,
        waiting_blocks: int = 0,
    ) -> list[p.DecisionRecord]:
        if free < 0:
            return []  # the engine did not report its pool
        event = ev.EngineState(total, free, waiting, running, waiting_blocks, host_total, host_free)
        return self._to_engine(engine_id, event)

    def transfer_measured(
        self, engine_id: str, direction: ev.Direction, nbytes: int, seconds: float, blocks: int
    ) -> list[p.DecisionRecord]:
        """A timed copy; its decisions are those of timers and uploads that came due."""
        if seconds <= 0 or nbytes <= 0:
            return []
        event = ev.TransferMeasured(direction, nbytes, seconds, blocks)
        return self._to_engine(engine_id, event)

    def transfer_done(
        self, engine_id: str, app_id: str, agent_id: str, direction: ev.Direction, blocks: int
    ) -> list[p.DecisionRecord]:
        event = ev.TransferDone(app_id, agent_id, direction, blocks)
        return self._to_engine(engine_id, event)

    def eviction_policy(self) -> EvictionPolicy:
        return make_policy("lru")

    # ------------------------------------------------------------------ agent events

    def app_registered(self, app: AppRecord) -> list[p.DecisionRecord]:
        self._apps[app.app_id] = app
        return self._to_all(_registered(app))

    def agent_event(self, agent: AgentRecord, event: ev.Event) -> list[p.DecisionRecord]:
        """One of the agent's events, as its peer sent it (the registry took it), or a tool
        call whose end came before its start, as the registry applied it: to the policy of
        the agent's engine, or to all while it has none."""
        policy = self._policies.get(agent.engine_id)
        if policy is None:
            return self._to_all(event)
        return self._records(agent.engine_id, policy.on_event(event, self._clock()))

    def llm_call_finish(
        self, agent: AgentRecord, event: p.LlmCallFinish, *, admitted: bool
    ) -> list[p.DecisionRecord]:
        """The call's end; ``admitted``: an ``llm_call_admitted`` came before it."""
        out: list[p.DecisionRecord] = []
        if agent.engine_id in self._policies and not admitted:
            # No llm_call_admitted came: the finish implies the admission, and the engine's
            # pool reports since then counted the request's blocks as taken.
            implied = p.LlmCallAdmitted(
                event.app_id, event.agent_id, event.request_id, event.kv_blocks, reported=True
            )
            out = self.agent_event(agent, implied)
        return out + self.agent_event(agent, event)

    def app_end(self, app: AppRecord) -> list[p.DecisionRecord]:
        self._apps.pop(app.app_id, None)
        for agent_id in app.agents:
            self._tag_agents.pop(self._tags.pop((app.app_id, agent_id), 0), None)
        return self._to_all(p.AppEnd(app.app_id))

    # ------------------------------------------------------------------ the L2 tier

    def l2_measured(self, nbytes: int, seconds: float, blocks: int) -> list[p.DecisionRecord]:
        """One timed L2 fetch (a chain, L2 -> arena). The tier is the daemon's, not an
        engine's: every engine's cost model learns from it."""
        if seconds <= 0 or nbytes <= 0:
            return []
        return self._to_all(ev.TransferMeasured("l2", nbytes, seconds, blocks))

    def kv_to_l2(self, blocks_by_tag: dict[int, int]) -> list[p.DecisionRecord]:
        """The host store evicted these agents' blocks (by slot tag), written back to L2."""
        return self._by_tag(blocks_by_tag, lambda a, g, n: ev.KvTierMoved(a, g, n, "l2"))

    def kv_lost(self, blocks_by_tag: dict[int, int]) -> list[p.DecisionRecord]:
        """The host store evicted these agents' blocks (by slot tag) and L2 did not take
        them (the write was dropped): this host no longer has them."""
        return self._by_tag(blocks_by_tag, lambda a, g, n: ev.KvEvicted(a, g, n, "host"))

    def _by_tag(
        self, blocks_by_tag: dict[int, int], event: Callable[[str, str, int], ev.Event]
    ) -> list[p.DecisionRecord]:
        out: list[p.DecisionRecord] = []
        for tag, blocks in blocks_by_tag.items():
            key = self._tag_agents.get(tag)
            if key is not None:
                out.extend(self._to_all(event(key[0], key[1], blocks)))
        return out

    def kv_from_l2(self, app_id: str, agent_id: str, blocks: int) -> list[p.DecisionRecord]:
        """An upload's prefetch placed ``blocks`` of the agent's KV back in the arena."""
        return self._to_all(ev.KvTierMoved(app_id, agent_id, blocks, "host"))

    def tick(self, now: float) -> list[p.DecisionRecord]:
        out: list[p.DecisionRecord] = []
        for engine_id, policy in self._policies.items():
            out.extend(self._records(engine_id, policy.tick(now)))
        return out

    # ------------------------------------------------------------------ views

    def agent_tag(self, app_id: str, agent_id: str) -> int:
        """A small int naming an agent in the host store's slot table (0: none)."""
        tag = self.peek_tag(app_id, agent_id)
        if tag and (app_id, agent_id) not in self._tags:
            self._tags[(app_id, agent_id)] = tag
            self._tag_agents[tag] = (app_id, agent_id)
            self._next_tag = self._next_tag % 0x7FFFFFFF + 1
        return tag

    def peek_tag(self, app_id: str, agent_id: str) -> int:
        """The tag ``agent_tag`` would give, without giving it (for a request that may
        still be refused: a refused request changes nothing)."""
        if not app_id:
            return 0
        return self._tags.get((app_id, agent_id), self._next_tag)

    def agent_view(self, agent: AgentRecord) -> AgentSummary:
        policy = self._policies.get(agent.engine_id)
        candidates = [policy] if policy is not None else list(self._policies.values())
        for candidate in candidates:
            view = candidate.agent_view(agent.app_id, agent.agent_id)
            if view is not None:
                return AgentSummary(
                    view.priority,
                    view.on_critical_path,
                    view.host_blocks,
                    view.protect_blocks,
                    view.app_registered_s,
                    view.app_lead_s,
                )
        return AgentSummary()

    def critical_path(self, app_id: str) -> list[str]:
        for policy in self._policies.values():
            path = policy.critical_path(app_id)
            if path:
                return path
        return []

    # ------------------------------------------------------------------ routing

    def _to_engine(self, engine_id: str, event: ev.Event) -> list[p.DecisionRecord]:
        policy = self._policies.get(engine_id)
        if policy is None:
            return []
        return self._records(engine_id, policy.on_event(event, self._clock()))

    def _to_all(self, event: ev.Event) -> list[p.DecisionRecord]:
        out: list[p.DecisionRecord] = []
        now = self._clock()
        for engine_id, policy in self._policies.items():
            out.extend(self._records(engine_id, policy.on_event(event, now)))
        return out

    def _records(self, engine_id: str, decisions: list[p.DecisionRecord]) -> list[p.DecisionRecord]:
        """The policy's decisions, named with the engine and the policy that took them."""
        for decision in decisions:
            decision.engine_id = engine_id
            decision.policy = self.policy_name
        return decisions


def _registered(app: AppRecord) -> p.RegisterApp:
    """The app's registration, as a policy created after it must hear it."""
    return p.RegisterApp(app.app_id, app.dag, app.tenant)


# ---------------------------------------------------------------------- decisions out


class DecisionLog:
    def __init__(
        self,
        history: int,
        *,
        metrics: DaemonMetrics,
        engines: EngineRegistry,
        send: Callable[[bytes, bytes], bool],
        on_upload: Callable[[str, str], None],
    ) -> None:
        self.records: deque[p.DecisionRecord] = deque(maxlen=max(1, history))
        self.seq = 0
        self._metrics = metrics
        self._engines = engines
        self._send = send
        self._on_upload = on_upload

    def resize(self, history: int) -> None:
        self.records = deque(self.records, maxlen=max(1, history))

    def apply(self, decisions: list[p.DecisionRecord]) -> None:
        """Keep each decision for introspection and push it to the engine it concerns."""
        for decision in decisions:
            self.seq += 1
            decision.seq = self.seq
            self.records.append(decision)
            self._metrics.decisions.labels(decision.kind).inc()
            if decision.kind == "upload":
                self._on_upload(decision.app_id, decision.agent_id)
            engine = self._engines.get(decision.engine_id)
            if engine is not None and decision.kind in p.PUSHED_KINDS:
                self._send(engine.identity, p.encode_push(p.DECISION_PUSH_OP, decision))
