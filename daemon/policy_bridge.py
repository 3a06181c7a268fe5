"""The daemon's bridge to its policies: events in, decisions out.

* In (``SchedulerBridge``): one policy instance per registered engine (it schedules that
  engine's GPU KV pool). Every policy hears about every application; an agent's events go
  to the engine that serves it (the one named in its last ``llm_call_start``; to all
  engines while it has none), as the wire struct the peer sent with the daemon's clock
  beside it. The engine's own reports (pool state, copies, the L2 tier) become the
  policy's engine events.
* Out (``DecisionLog``): every part's decisions (the agent service's, the copy accounting's,
  the housekeeping tick's) are numbered, kept for ``tokencake-ctl decisions``, counted, and
  pushed to the engine they concern when its connector acts on that kind. An upload also
  asks the L2 tier to bring back what of the agent's KV went there, so the engine finds it
  in the arena.

No scheduling logic lives here: the policies are ``daemon/scheduler``'s.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from tokencake import protocol as p
from tokencake.daemon.agent_service import AgentRecord, AppRecord
from tokencake.daemon.engines import EngineRegistry
from tokencake.daemon.eviction import EvictionPolicy, make_policy
from tokencake.daemon.metrics import DaemonMetrics
from tokencake.daemon.scheduler import events as ev
from tokencake.daemon.scheduler.events import AgentEvent
from tokencake.daemon.scheduler.policy import Policy, PolicyConfig, create_policy, policy_class

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

    # Decisions an engine connector acts on; ``keep`` and ``partition`` are kept for
    # operators only (partition is applied through admission queries, not pushes).
    PUSHED_KINDS = p.PUSHED_KINDS

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

    def agent_event(
        self, agent: AgentRecord, event: AgentEvent | p.LlmCallPreempted | ev.ToolCallOver
    ) -> list[p.DecisionRecord]:
        """One of the agent's events, as its peer sent it (the registry took it), or a tool
        call whose end came before its start, as the registry applied it."""
        return self._to_agent(agent, event)

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
            out = self._to_agent(agent, implied)
        return out + self._to_agent(agent, event)

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

    def _to_agent(self, agent: AgentRecord, event: ev.Event) -> list[p.DecisionRecord]:
        policy = self._policies.get(agent.engine_id)
        if policy is None:
            return self._to_all(event)
        return self._records(agent.engine_id, policy.on_event(event, self._clock()))

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
        pushed_kinds: frozenset[str],
        send: Callable[[bytes, bytes], bool],
        on_upload: Callable[[str, str], None],
    ) -> None:
        self.records: deque[p.DecisionRecord] = deque(maxlen=max(1, history))
        self.seq = 0
        self._metrics = metrics
        self._engines = engines
        self._pushed_kinds = pushed_kinds
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
            if engine is not None and decision.kind in self._pushed_kinds:
                self._send(engine.identity, p.encode_push(p.DECISION_PUSH_OP, decision))

    def list(self, _identity: bytes, req: p.ListDecisions) -> p.ListDecisionsReply:
        picked: list[p.DecisionRecord] = []
        for decision in reversed(self.records):
            if req.agent_id and decision.agent_id != req.agent_id:
                continue
            picked.append(decision)
            if len(picked) >= req.limit:
                break
        picked.reverse()
        return p.ListDecisionsReply(decisions=picked)
