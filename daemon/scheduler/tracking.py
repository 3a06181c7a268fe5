"""The base every shipped policy extends: events in, world model updated, hooks called.

``TrackingPolicy`` turns events into per-agent state (phase, GPU/host blocks, transfers in
flight, tool call and its prediction) through the layers below it, then lets the policy
decide in hooks (``_on_tool_start``...):

* ``agents``: the agent model (``AppState``, ``AgentState``, the phases);
* ``accounting``: block counts per agent and for the engine's pool;
* ``uploads``: the queue of uploads and its release in pieces;
* ``timers``: deadlines, host TTL, pin expiry and the policies' own timers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from tokencake import protocol as p
from tokencake.daemon.scheduler.agents import DONE, IDLE, RUNNING, TOOL, AgentState, AppState
from tokencake.daemon.scheduler.dag import DagError, analyse
from tokencake.daemon.scheduler.events import (
    EngineState,
    Event,
    KvEvicted,
    KvTierMoved,
    LlmCallPreempted,
    Tick,
    ToolCallOver,
    TransferDone,
    TransferMeasured,
)
from tokencake.daemon.scheduler.policy import (
    AgentView,
    CachedKv,
    EventOrderError,
    PolicyConfig,
    WaitingRequest,
)
from tokencake.daemon.scheduler.predictor import Z_Q95, Prediction
from tokencake.daemon.scheduler.timers import T_DEADLINE, T_SETTLE, TimedPolicy
from tokencake.daemon.scheduler.uploads import MAX_UPLOAD_FAILURES
from tokencake.protocol import AppDag

logger = logging.getLogger(__name__)

_POOL_EVENTS = frozenset({Tick, EngineState, TransferDone, KvEvicted, LlmCallPreempted, p.AppEnd})
"""Events after which queued uploads may find GPU room (others cannot free blocks)."""


class TrackingPolicy(TimedPolicy):
    """Base of the shipped policies: events drive the world model, hooks decide."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        # The class's functions, not bound methods: a bound method in the instance would
        # make every policy a reference cycle, so a dropped one (its engine left) and all it
        # holds would wait for a full collection (docs/benchmarks.md, the memory line).
        cls = type(self)
        self._handlers: dict[type, Callable[[Any, Any, list[p.DecisionRecord]], None]] = {
            p.RegisterApp: cls._ev_app_registered,
            p.LlmCallStart: cls._ev_llm_start,
            p.LlmCallAdmitted: cls._ev_llm_admitted,
            LlmCallPreempted: cls._ev_llm_preempted,
            p.LlmCallFinish: cls._ev_llm_finish,
            p.ToolCallStart: cls._ev_tool_start,
            p.ToolCallEnd: cls._ev_tool_end,
            ToolCallOver: cls._ev_tool_over,
            p.AppEnd: cls._ev_app_end,
            EngineState: cls._ev_engine_state,
            TransferMeasured: cls._ev_transfer_measured,
            TransferDone: cls._ev_transfer_done,
            KvEvicted: cls._ev_kv_evicted,
            KvTierMoved: cls._ev_kv_tier_moved,
            Tick: cls._ev_tick,
        }

    # ------------------------------------------------------------------ driver

    def on_event(self, event: Event, now: float) -> list[p.DecisionRecord]:
        if not math.isfinite(now):
            raise EventOrderError(f"event time must be finite, got {now!r}")
        if now < self.now:
            raise EventOrderError(f"event at {now} is before the previous one at {self.now}")
        self.now = now
        out: list[p.DecisionRecord] = []
        kind = type(event)
        handler = self._handlers.get(kind)
        if handler is None:
            raise TypeError(f"not a scheduler event: {kind.__name__}")
        handler(self, event, out)
        if self._timers and self._timers[0][0] <= now:
            self._run_timers(out)
        if self._uploads and (self._upload_queued or kind in _POOL_EVENTS):
            self._upload_queued = False
            self._pump_uploads(out)
        return out

    # ------------------------------------------------------------------ hooks

    def _on_app_registered(self, app: AppState, out: list[p.DecisionRecord]) -> None:
        """Called once per new app."""

    def _on_llm_start(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        """Default: KV that is only on the host comes back now (reload on a prefix hit)."""
        self._reload(agent, p.URGENT, "reload_on_llm_start", out)

    def _on_llm_finish(
        self, agent: AgentState, ev: p.LlmCallFinish, out: list[p.DecisionRecord]
    ) -> None:
        """Called after the agent's KV size was updated."""

    def _on_llm_preempted(self, agent: AgentState, freed: int, out: list[p.DecisionRecord]) -> None:
        """Called after a preemption released ``freed`` blocks (the engine's count), now idle
        and cached."""

    def _on_upload_given_up(
        self, agent: AgentState, terms: dict[str, p.Term], out: list[p.DecisionRecord]
    ) -> None:
        """An upload during a tool call failed ``MAX_UPLOAD_FAILURES`` times and was
        cancelled. Default: the host copy is dropped."""
        self._drop(agent, "host", agent.host_blocks, "upload_failed", terms, out)

    def _on_tool_start(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        """The tool call and its prediction are recorded; decide what to do with the KV."""

    def _on_tool_end(self, agent: AgentState, actual_s: float, out: list[p.DecisionRecord]) -> None:
        """Default: KV that went to the host during the call comes back with priority."""
        self._reload(agent, p.URGENT, "early_or_on_time_return", out)

    def _on_engine_state(self, out: list[p.DecisionRecord]) -> None:
        """Called after each engine report and each tick."""

    # ------------------------------------------------------------------ event handlers

    def _ev_app_registered(self, ev: p.RegisterApp, out: list[p.DecisionRecord]) -> None:
        if ev.app_id in self.apps:
            return
        cfg = self.config
        try:
            info = self._analysed(ev.dag)
        except DagError as exc:
            logger.warning("app %s: %s; scheduling it without its edges", ev.app_id, exc)
            seen: set[str] = set()
            nodes = []
            for node in ev.dag.nodes:
                if node.id not in seen:
                    seen.add(node.id)
                    nodes.append(node)
            info = analyse(AppDag(nodes=nodes), cfg.llm_s_default, cfg.default_tool_s)
        app = self.apps[ev.app_id] = AppState(ev.app_id, info, self.now, ev.tenant)
        self._on_app_registered(app, out)

    def _ev_llm_start(self, ev: p.LlmCallStart, out: list[p.DecisionRecord]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id)
        if agent is None:
            return
        if agent.phase == TOOL:
            self._finish_tool(agent, out)
        blocks = (
            ev.blocks if ev.blocks > 0 else -(-max(ev.prompt_tokens, 0) // self.config.block_tokens)
        )
        self._remove_waiting(agent)
        self._add_waiting(agent, blocks)
        agent.last_used_s = self.now
        # Contexts are append-only: this call reads its own KV and its DAG predecessors'
        # (through nodes that never call the model, such as a collector).
        self._reader_outcome(agent, True)
        app = agent.app
        nodes = app.info.nodes
        todo = list(agent.node.pred) if app.awaiting else []
        seen: set[int] = set()
        while todo:
            j = todo.pop()
            if j in seen:
                continue
            seen.add(j)
            pred = app.agents.get(nodes[j].node_id)
            if pred is None:
                todo.extend(nodes[j].pred)
            else:
                self._reader_outcome(pred, True)
        self._on_llm_start(agent, out)

    def _ev_llm_admitted(self, ev: p.LlmCallAdmitted, out: list[p.DecisionRecord]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id)
        if agent is None:
            return
        self._remove_waiting(agent)
        self._set_phase(agent, RUNNING)
        if ev.kv_blocks > 0:
            # Every block the request holds leaves the free count, its own cached prefix
            # too: idle cached blocks were counted free.
            self._set_gpu(agent, ev.kv_blocks)
            if not ev.reported:
                self.gpu_free -= ev.kv_blocks
        agent.last_used_s = self.now
        self._unpin(agent, "running", out)

    def _ev_llm_preempted(self, ev: LlmCallPreempted, out: list[p.DecisionRecord]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id, create=False)
        if agent is None:
            return
        freed = min(max(ev.blocks_freed, 0), agent.gpu_blocks)
        self._set_gpu(agent, agent.gpu_blocks - freed)
        self.gpu_free += freed
        agent.preemptions += 1
        self._add_waiting(agent, max(freed, 1))
        released = max(ev.blocks_freed, freed)
        # The engine may report fewer still cached (a running request took the rest).
        cached = released if ev.blocks_cached < 0 else min(ev.blocks_cached, released)
        self._on_llm_preempted(agent, cached, out)

    def _ev_llm_finish(self, ev: p.LlmCallFinish, out: list[p.DecisionRecord]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id)
        if agent is None:
            return
        self._remove_waiting(agent)
        if agent.phase == RUNNING:
            # The request's blocks are now idle cached KV, which the engine counts as free
            # (a new request may evict them): vLLM's free block queue, the simulator's too.
            self.gpu_free = min(self.gpu_free + agent.gpu_blocks, max(self.gpu_total, 0))
        self._set_phase(agent, IDLE)
        if ev.kv_blocks > 0:
            self._set_gpu(agent, ev.kv_blocks)
            agent.kv_size = ev.kv_blocks
        if agent.llm_calls == 0:
            agent.app.done_nodes += 1
            group = agent.node.join_group
            if group:
                agent.app.join_done[group] = agent.app.join_done.get(group, 0) + 1
        agent.llm_calls += 1
        agent.last_used_s = self.now
        self._on_llm_finish(agent, ev, out)

    def _ev_tool_start(self, ev: p.ToolCallStart, out: list[p.DecisionRecord]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id)
        if agent is None:
            return
        pred = self._begin_tool(agent, ev.tool_kind, ev.predicted_s, out)
        cfg = self.config
        horizon = cfg.deadline_factor * pred.quantile_s(Z_Q95)
        agent.deadline_s = self.now + min(max(horizon, cfg.deadline_min_s), cfg.deadline_max_s)
        self._push_timer(agent.deadline_s, T_DEADLINE, agent, agent.tool_token)
        self._on_tool_start(agent, out)

    def _begin_tool(
        self, agent: AgentState, kind: str, hint: float | None, out: list[p.DecisionRecord]
    ) -> Prediction:
        """The agent is in a tool call from now: recorded, with its prediction."""
        if agent.phase == TOOL:
            self._finish_tool(agent, out)
        self._remove_waiting(agent)
        self._set_phase(agent, TOOL)
        agent.tool_token += 1
        agent.tool_start = self.now
        agent.tool_kind = kind
        agent.call_offloaded = 0
        agent.tool_hint = hint
        agent.overdue = False
        pred = self.predictor.predict(agent.klass, kind, hint)
        agent.prediction = pred
        agent.predicted_s = pred.median_s
        return pred

    def _ev_tool_end(self, ev: p.ToolCallEnd, out: list[p.DecisionRecord]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id, create=False)
        if agent is None or agent.phase != TOOL:
            return
        self._finish_tool(agent, out)

    def _ev_tool_over(self, ev: ToolCallOver, out: list[p.DecisionRecord]) -> None:
        """A tool call heard of after its end: it began and ended, and its length is learnt,
        but nothing is decided for it (an offload or a pin would come after the call)."""
        agent = self._agent(ev.app_id, ev.agent_id)
        if agent is None:
            return
        self._begin_tool(agent, ev.tool_kind, ev.predicted_s, out)
        agent.tool_start = self.now - max(ev.duration_s, 0.0)
        self._finish_tool(agent, out)

    def _finish_tool(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        actual = self.now - agent.tool_start
        self.predictor.observe(
            agent.klass, agent.tool_kind, actual, agent.tool_hint, agent.prediction
        )
        self.mean_predictor.observe(agent.klass, agent.tool_kind, actual)
        agent.tool_token += 1
        self._set_phase(agent, IDLE)
        agent.last_used_s = self.now
        if agent.await_reader is None:
            agent.app.awaiting += 1
        agent.await_reader = (agent.klass, agent.tool_kind)
        self._unpin(agent, "tool_returned", out)
        self._on_tool_end(agent, actual, out)

    def _ev_app_end(self, ev: p.AppEnd, out: list[p.DecisionRecord]) -> None:
        app = self.apps.get(ev.app_id)
        if app is None or app.ended:
            return
        app.ended = True
        for agent in app.agents.values():
            self._reader_outcome(agent, False)
            self._remove_waiting(agent)
            agent.tool_token += 1
            self._cancel_upload(agent)
            self._unpin(agent, "app_end", out)
            self._set_phase(agent, DONE)
            self._drop(agent, "host", agent.host_blocks, "app_end", {}, out)
            if agent.offloading:
                agent.drop_on_arrival = True
            if agent.offloading or agent.uploading:
                settle_at = self.now + self.config.host_ttl_s
                self._push_timer(settle_at, T_SETTLE, agent, agent.tool_token)
        self._forget_if_settled(app)

    def _forget_if_settled(self, app: AppState) -> None:
        """Release an ended app's state once no copy of it is in flight."""
        if not app.ended:
            return
        for agent in app.agents.values():
            if agent.offloading or agent.uploading:
                return
        for agent in app.agents.values():
            self._set_gpu(agent, 0)
        self.apps.pop(app.app_id, None)
        app.agents.clear()  # app and agents refer to each other: freed now, not by the gc

    def _write_off_copies(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        """The app ended ``host_ttl_s`` ago and a copy the policy decided is still not
        reported: the engine dropped the decision (an agent it does not track, a lost push)
        or copied fewer blocks than decided. Counted as failed, so the app is forgotten
        rather than kept until its engine leaves."""
        app_id, agent_id = agent.key
        if agent.offloading:
            lost = TransferDone(app_id, agent_id, "d2h", agent.offloading, ok=False)
            self._offload_done(agent, lost, out)
        if agent.uploading:
            lost = TransferDone(app_id, agent_id, "h2d", agent.uploading, ok=False)
            self._upload_done(agent, lost, out)
        self._forget_if_settled(agent.app)

    def _ev_engine_state(self, ev: EngineState, out: list[p.DecisionRecord]) -> None:
        self.gpu_total = max(ev.gpu_blocks_total, 0)
        self.gpu_free = max(ev.gpu_blocks_free, 0)
        self.reported_waiting = ev.num_waiting
        self.reported_waiting_blocks = max(ev.waiting_blocks, 0)
        self.num_running = ev.num_running
        if ev.host_blocks_total >= 0:
            self.host_total = ev.host_blocks_total
        if ev.host_blocks_free >= 0:
            self.host_reported_free = ev.host_blocks_free
            self.host_used_at_report = self.host_used
        self._on_engine_state(out)

    def _ev_transfer_measured(self, ev: TransferMeasured, out: list[p.DecisionRecord]) -> None:
        self.cost.observe(ev.direction, ev.nbytes, ev.seconds)

    def _ev_transfer_done(self, ev: TransferDone, out: list[p.DecisionRecord]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id, create=False)
        if agent is None:
            return
        if ev.direction == "d2h":
            self._offload_done(agent, ev, out)
        else:
            self._upload_done(agent, ev, out)
        if agent.app.ended:
            self._forget_if_settled(agent.app)

    def _offload_done(
        self, agent: AgentState, ev: TransferDone, out: list[p.DecisionRecord]
    ) -> None:
        blocks = min(max(ev.blocks, 0), agent.offloading)
        agent.offloading -= blocks
        self.gpu_free += blocks  # the copy let go of them: empty, or idle cached again
        if not ev.ok:
            self.host_used -= blocks
            agent.upload_left = min(agent.upload_left, agent.host_blocks + agent.offloading)
            return
        agent.host_blocks += blocks
        if agent.offload_moves:
            moved = min(blocks, agent.gpu_blocks)
            self._set_gpu(agent, agent.gpu_blocks - moved)
        if agent.drop_on_arrival or agent.phase == DONE:
            self._drop(agent, "host", agent.host_blocks, "dropped_on_arrival", {}, out)
        elif agent.upload_parked and agent.upload_left > 0:
            self._requeue_upload(agent)
        elif agent.phase != TOOL and agent.offload_moves:
            self._reload(agent, p.URGENT, "returned_during_offload", out)

    def _upload_done(
        self, agent: AgentState, ev: TransferDone, out: list[p.DecisionRecord]
    ) -> None:
        blocks = min(max(ev.blocks, 0), agent.uploading)
        agent.uploading -= blocks
        self.h2d_in_flight -= blocks
        if ev.ok:
            self._set_gpu(agent, agent.gpu_blocks + blocks)
            if not self.keep_host_copy:
                self._release_host(agent, blocks)
            if agent.phase == DONE:
                self._drop(agent, "host", agent.host_blocks, "app_end", {}, out)
            return
        self.gpu_free += blocks
        agent.upload_failures += 1
        failures: dict[str, p.Term] = {"failures": agent.upload_failures}
        if agent.phase == DONE:
            self._drop(agent, "host", agent.host_blocks, "app_end", {}, out)
        elif agent.phase != TOOL:
            # The reader is here: the engine loads what is on the host when it admits the
            # request (a prefix hit). The copy stays; no retry, and no failure counted.
            agent.upload_failures -= 1
            self._cancel_upload(agent)
        elif agent.upload_failures >= MAX_UPLOAD_FAILURES:
            self._cancel_upload(agent)
            self._on_upload_given_up(agent, failures, out)
        else:
            self._start_upload(
                agent, blocks, agent.upload_priority, "retry_failed_piece", failures, out
            )

    def _ev_kv_evicted(self, ev: KvEvicted, out: list[p.DecisionRecord]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id, create=False)
        if agent is None:
            return
        if ev.where == "gpu":
            # Only idle blocks are evicted, and the engine counted them free already.
            freed = min(max(ev.blocks, 0), agent.gpu_blocks)
            self._set_gpu(agent, agent.gpu_blocks - freed)
        else:
            freed = min(max(ev.blocks, 0), agent.host_blocks - agent.uploading)
            self._release_host(agent, freed)
            agent.upload_left = min(
                agent.upload_left, agent.host_blocks + agent.offloading - agent.uploading
            )

    def _ev_kv_tier_moved(self, ev: KvTierMoved, out: list[p.DecisionRecord]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id, create=False)
        if agent is None:
            return
        moved = max(ev.blocks, 0) if ev.to == "l2" else -max(ev.blocks, 0)
        before = agent.l2_blocks
        agent.l2_blocks = min(max(before + moved, 0), agent.host_blocks)
        # Blocks in L2 take no arena room; blocks brought back take it again.
        self.host_used -= agent.l2_blocks - before
        if moved > 0:
            self._on_kv_in_l2(agent, out)

    def _on_kv_in_l2(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        """Some of the agent's host KV is now in L2 (policies that plan uploads re-plan)."""

    def _ev_tick(self, ev: Tick, out: list[p.DecisionRecord]) -> None:
        self._on_engine_state(out)

    # ------------------------------------------------------------------ queries (defaults)

    def admission_order(
        self, waiting: Sequence[WaitingRequest], now: float
    ) -> list[WaitingRequest]:
        """FCFS: the engine's own order by arrival."""
        return sorted(waiting, key=lambda w: w.arrival_s)

    def eviction_order(self, candidates: Sequence[CachedKv], now: float) -> list[CachedKv]:
        """LRU over unpinned KV."""
        return sorted(
            (c for c in candidates if not self._pinned(c.app_id, c.agent_id, now)),
            key=lambda c: c.last_used_s,
        )

    def may_allocate(self, app_id: str, agent_id: str, n_blocks: int, now: float) -> bool:
        return True

    def _pinned(self, app_id: str, agent_id: str, now: float) -> bool:
        agent = self._agent(app_id, agent_id, create=False)
        return agent is not None and agent.pinned_until > now

    # ------------------------------------------------------------------ introspection

    def priority(self, agent: AgentState, now: float) -> tuple[float, dict[str, p.Term]]:
        """Scheduling priority of an agent (higher first). Base: importance only."""
        return agent.node.importance, {"importance": agent.node.importance}

    def app_lead_s(self, app: AppState) -> float:
        """How far ahead of its registration ``app`` ranks (``AgentView.app_lead_s``).
        Base: none (the engine's own order)."""
        return 0.0

    def agent_view(self, app_id: str, agent_id: str) -> AgentView | None:
        agent = self._agent(app_id, agent_id, create=False)
        if agent is None:
            return None
        score, _ = self.priority(agent, self.now)
        return AgentView(
            app_id=app_id,
            agent_id=agent_id,
            agent_type=agent.klass,
            state=agent.phase,
            importance=agent.node.importance,
            priority=score,
            on_critical_path=agent.critical,
            gpu_blocks=agent.gpu_blocks,
            host_blocks=agent.host_blocks,
            tool_kind=agent.tool_kind if agent.phase == TOOL else "",
            tool_predicted_s=agent.predicted_s if agent.phase == TOOL else None,
            state_since_s=agent.phase_since,
            protect_blocks=self.protected_blocks(agent),
            app_registered_s=agent.app.registered_s,
            app_lead_s=self.app_lead_s(agent.app),
        )

    def protected_blocks(self, agent: AgentState) -> int:
        """Blocks the critical-inversion guard keeps free for ``agent``: none unless a
        policy applies the guard (``TokenCakePolicy``)."""
        return 0

    def agent_views(self, app_id: str = "") -> list[AgentView]:
        apps = (
            [self.apps[app_id]]
            if app_id in self.apps
            else ([] if app_id else list(self.apps.values()))
        )
        views = []
        for app in apps:
            for agent_id in app.agents:
                view = self.agent_view(app.app_id, agent_id)
                if view is not None:
                    views.append(view)
        return views

    def critical_path(self, app_id: str) -> list[str]:
        app = self.apps.get(app_id)
        return list(app.info.critical_path) if app is not None else []

    def iter_agents(self) -> list[AgentState]:
        """Every tracked agent (for tests and invariant checks; O(n))."""
        return [a for app in self.apps.values() for a in app.agents.values()]
