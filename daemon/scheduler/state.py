"""The world model every policy shares, and the base class that keeps it.

``TrackingPolicy`` turns events into per-agent state (phase, GPU/host blocks, transfers in
flight, tool call and its prediction), keeps the engine's last reported pool, runs timers
(predictive uploads, late/deadline/TTL checks, pin expiry) and releases gradual uploads.
Policies subclass it and decide in hooks (``_on_tool_start``...). Everything a hook needs
is reachable in O(1) or through a heap, so one event costs O(log n) in the number of
agents: no hook scans all agents.

Accounting model (what "blocks" mean to the policy):

* ``gpu_blocks``: the agent's KV on the GPU, used by a running request or cached;
* ``host_blocks``: complete copies on the host; ``offloading`` / ``uploading``: copies in
  flight; ``upload_left``: blocks of an accepted upload not yet released as pieces;
* ``host_used`` counts host blocks plus offloads in flight, and never exceeds the host
  capacity: an offload is only decided when it fits;
* ``gpu_free`` is the engine's last report, minus upload pieces released and blocks
  admitted since, plus the blocks the policy knows were freed since. Like vLLM's free block
  queue, it counts idle cached blocks as free: a finished call's blocks return to it, an
  offload holds its blocks until the copy ends, and evicting or dropping idle blocks does
  not change it. Uploads never take blocks the head of the
  waiting queue needs (urgent) or that any waiting request needs (predictive, prefetch):
  this is what keeps the head of the queue from starving behind asynchronous reloads.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from tokencake.daemon.scheduler import decisions as d
from tokencake.daemon.scheduler.costmodel import TransferCostModel
from tokencake.daemon.scheduler.dag import DagError, DagInfo, NodeInfo, analyse
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
    EventOrderError,
    Policy,
    PolicyConfig,
    WaitingRequest,
)
from tokencake.daemon.scheduler.predictor import (
    Z_Q95,
    Prediction,
    RunningMeanPredictor,
    ToolDurationPredictor,
)
from tokencake.protocol import AppDag

logger = logging.getLogger(__name__)

IDLE = "idle"
WAITING = "waiting"
RUNNING = "running"
TOOL = "tool"
DONE = "done"

T_UPLOAD = 0
T_LATE = 1
T_DEADLINE = 2
T_HOST_TTL = 3
T_UNPIN = 4

_POOL_EVENTS = frozenset({Tick, EngineState, TransferDone, KvEvicted, LlmCallPreempted, AppEnd})
"""Events after which queued uploads may find GPU room (others cannot free blocks)."""

MAX_UPLOAD_FAILURES = 3
"""After this many failed pieces the host copy is dropped and the next call recomputes."""
READER_DECAY = 0.9
"""Weight of the past in the per-(agent type, tool kind) record of whether a tool call's KV
was read afterwards (each new outcome counts 1)."""


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
        "deadline_s",
        "drop_on_arrival",
        "gpu_blocks",
        "host_blocks",
        "key",
        "klass",
        "kv_size",
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
        self.phase = IDLE
        self.phase_since = now
        self.gpu_blocks = 0
        self.host_blocks = 0
        self.offloading = 0
        self.offload_moves = True
        self.uploading = 0
        self.upload_left = 0
        self.upload_token = 0
        self.upload_priority = d.URGENT
        self.upload_piece = 0
        self.upload_pieces = 0
        self.upload_parked = False
        self.upload_failures = 0
        self.upload_reason: dict[str, d.Term] = {}
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

    @property
    def critical(self) -> bool:
        return self.node.on_critical_path


class TrackingPolicy(Policy):
    """Base of the shipped policies: bookkeeping, timers and gradual uploads."""

    keep_host_copy = False
    """True when an upload copies (the host keeps its copy, LMCache-style); False moves."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.now = -math.inf
        self.predictor = ToolDurationPredictor(cfg.default_tool_s)
        self.mean_predictor = RunningMeanPredictor(cfg.default_tool_s)
        self.cost = TransferCostModel(
            cfg.bytes_per_block, cfg.d2h_bytes_per_s, cfg.h2d_bytes_per_s, cfg.copy_overhead_s
        )
        self.apps: dict[str, AppState] = {}
        self.waiting: OrderedDict[tuple[str, str], AgentState] = OrderedDict()
        self.guarded: dict[tuple[str, str], AgentState] = {}
        """Critical agents waiting or in a tool call: those ``guard.protected_blocks`` covers."""
        self.reader_stats: dict[tuple[str, str], list[float]] = {}
        """(agent type, tool kind) -> [read, unread]: decayed counts of whether the KV a
        tool call left was read afterwards (``unread_share``)."""
        self.offloads_unread = 0
        """Tool calls whose offloaded KV nobody read afterwards (the app ended first)."""
        self.offload_unread_blocks = 0
        """Their blocks: copies that were pure cost."""
        self.h2d_in_flight = 0
        """Upload blocks issued and not yet landed: the host link's queue right now."""
        self.own_waiting_blocks = 0
        self.crit_waiting_blocks = 0
        self.crit_waiting_by_class: dict[str, int] = {}
        self.class_usage: dict[str, int] = {}
        self.class_crit_usage: dict[str, int] = {}
        self.crit_waiting_blocks_by_class: dict[str, int] = {}
        self.gpu_total = 0
        self.gpu_free = 0
        self.reported_waiting = 0
        self.reported_waiting_blocks = 0
        self.num_running = 0
        self.host_total = cfg.host_blocks
        self.host_reported_free = -1
        self.host_used = 0
        self.host_used_at_report = 0
        self._timers: list[tuple[float, int, int, AgentState, int]] = []
        self._uploads: list[tuple[int, int, AgentState, int]] = []
        self._seq = 0
        self._upload_queued = False
        self._handlers: dict[type, Callable[[Any, list[d.Decision]], None]] = {
            AppRegistered: self._ev_app_registered,
            LlmCallStart: self._ev_llm_start,
            LlmCallAdmitted: self._ev_llm_admitted,
            LlmCallPreempted: self._ev_llm_preempted,
            LlmCallFinish: self._ev_llm_finish,
            ToolCallStart: self._ev_tool_start,
            ToolCallEnd: self._ev_tool_end,
            AppEnd: self._ev_app_end,
            EngineState: self._ev_engine_state,
            TransferMeasured: self._ev_transfer_measured,
            TransferDone: self._ev_transfer_done,
            KvEvicted: self._ev_kv_evicted,
            Tick: self._ev_tick,
        }

    # ------------------------------------------------------------------ driver

    def on_event(self, event: Event) -> list[d.Decision]:
        now = event.now
        if not math.isfinite(now):
            raise EventOrderError(f"event time must be finite, got {now!r}")
        if now < self.now:
            raise EventOrderError(f"event at {now} is before the previous one at {self.now}")
        self.now = now
        out: list[d.Decision] = []
        handler = self._handlers.get(type(event))
        if handler is None:
            raise TypeError(f"not a scheduler event: {type(event).__name__}")
        handler(event, out)
        if self._timers and self._timers[0][0] <= now:
            self._run_timers(out)
        if self._uploads and (self._upload_queued or type(event) in _POOL_EVENTS):
            self._upload_queued = False
            self._pump_uploads(out)
        return out

    # ------------------------------------------------------------------ hooks

    def _on_app_registered(self, app: AppState, out: list[d.Decision]) -> None:
        """Called once per new app."""

    def _on_llm_start(self, agent: AgentState, out: list[d.Decision]) -> None:
        """Default: KV that is only on the host comes back now (reload on a prefix hit)."""
        self._reload(agent, d.URGENT, "reload_on_llm_start", out)

    def _on_llm_finish(self, agent: AgentState, ev: LlmCallFinish, out: list[d.Decision]) -> None:
        """Called after the agent's KV size was updated."""

    def _on_tool_start(self, agent: AgentState, out: list[d.Decision]) -> None:
        """The tool call and its prediction are recorded; decide what to do with the KV."""

    def _on_tool_end(self, agent: AgentState, actual_s: float, out: list[d.Decision]) -> None:
        """Default: KV that went to the host during the call comes back with priority."""
        self._reload(agent, d.URGENT, "early_or_on_time_return", out)

    def _on_timer(self, kind: int, agent: AgentState, out: list[d.Decision]) -> None:
        """Policy-specific timers (T_UPLOAD, T_LATE)."""

    def _on_engine_state(self, out: list[d.Decision]) -> None:
        """Called after each engine report and each tick."""

    def _on_deadline(self, agent: AgentState, out: list[d.Decision]) -> None:
        """The tool call overran its safety deadline: release its GPU KV."""
        if agent.gpu_blocks > 0:
            self._drop(agent, "gpu", agent.gpu_blocks, "safety_deadline", {}, out)

    # ------------------------------------------------------------------ helpers for hooks

    def _agent(self, app_id: str, agent_id: str, create: bool = True) -> AgentState | None:
        app = self.apps.get(app_id)
        if app is None:
            if not create:
                return None
            info = analyse(AppDag(nodes=[]), self.config.llm_s_default, self.config.default_tool_s)
            app = self.apps[app_id] = AppState(app_id, info, self.now)
        agent = app.agents.get(agent_id)
        if agent is None:
            if not create or app.ended:
                return None
            agent = app.agents[agent_id] = AgentState(app, app.node(agent_id), self.now)
            self.class_usage.setdefault(agent.klass, 0)
        return agent

    def _set_phase(self, agent: AgentState, phase: str) -> None:
        if agent.phase != phase:
            agent.phase = phase
            agent.phase_since = self.now
        if agent.critical and phase in (WAITING, TOOL):
            self.guarded[agent.key] = agent
        else:
            self.guarded.pop(agent.key, None)

    def _set_gpu(self, agent: AgentState, blocks: int) -> None:
        blocks = max(0, blocks)
        self.class_usage[agent.klass] = self.class_usage.get(agent.klass, 0) + (
            blocks - agent.gpu_blocks
        )
        if agent.critical:
            self.class_crit_usage[agent.klass] = self.class_crit_usage.get(agent.klass, 0) + (
                blocks - agent.gpu_blocks
            )
        agent.gpu_blocks = blocks

    def waiting_blocks(self) -> int:
        return max(self.reported_waiting_blocks, self.own_waiting_blocks)

    def unread_share(self, klass: str, tool_kind: str) -> tuple[float, float]:
        """(share of past tool calls of this agent type and tool kind whose KV nobody read
        afterwards, decayed number of such outcomes)."""
        read, unread = self.reader_stats.get((klass, tool_kind), (0.0, 0.0))
        n = read + unread
        return (unread / n if n > 0 else 0.0), n

    def _reader_outcome(self, agent: AgentState, read: bool) -> None:
        key = agent.await_reader
        if key is None:
            return
        agent.await_reader = None
        agent.app.awaiting -= 1
        rec = self.reader_stats.setdefault(key, [0.0, 0.0])
        rec[0] *= READER_DECAY
        rec[1] *= READER_DECAY
        rec[0 if read else 1] += 1.0
        if not read and agent.call_offloaded > 0:
            self.offloads_unread += 1
            self.offload_unread_blocks += agent.call_offloaded

    def host_free(self) -> int:
        own = self.host_total - self.host_used
        if self.host_reported_free < 0:
            return own
        return min(own, self.host_reported_free - (self.host_used - self.host_used_at_report))

    def pressure_terms(self) -> dict[str, d.Term]:
        total = self.gpu_total
        usage = 1.0 - self.gpu_free / total if total > 0 else 0.0
        return {
            "gpu_total": total,
            "gpu_free": self.gpu_free,
            "gpu_usage": usage,
            "waiting_blocks": self.waiting_blocks(),
            "num_waiting": max(self.reported_waiting, len(self.waiting)),
            "host_free": self.host_free(),
        }

    def _push_timer(self, at_s: float, kind: int, agent: AgentState, token: int) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (at_s, self._seq, kind, agent, token))

    def _offload(
        self,
        agent: AgentState,
        blocks: int,
        moves: bool,
        rule: str,
        terms: dict[str, d.Term],
        out: list[d.Decision],
    ) -> None:
        agent.offloading += blocks
        agent.offload_moves = moves
        if agent.phase == TOOL:
            agent.call_offloaded += blocks
        self.host_used += blocks
        if agent.pinned_until != -math.inf:
            # The offload ends the pin (engines hand the pin's hold to the copy): the
            # blocks stay held, no Unpin is sent.
            agent.pinned_until = -math.inf
        else:
            self.gpu_free -= blocks  # idle blocks, counted free, are held while copied
        out.append(
            d.Offload(
                at_s=self.now,
                app_id=agent.key[0],
                agent_id=agent.key[1],
                blocks=blocks,
                free_gpu=moves,
                reason=d.Reason(rule, terms),
            )
        )

    def _drop(
        self,
        agent: AgentState,
        where: str,
        blocks: int,
        rule: str,
        terms: dict[str, d.Term],
        out: list[d.Decision],
    ) -> None:
        if blocks <= 0:
            return
        if where == "gpu":
            blocks = min(blocks, agent.gpu_blocks)
            self._set_gpu(agent, agent.gpu_blocks - blocks)  # idle: counted free already
        else:
            blocks = min(blocks, agent.host_blocks - agent.uploading)
            if blocks <= 0:
                return
            agent.host_blocks -= blocks
            self.host_used -= blocks
            agent.upload_left = min(agent.upload_left, agent.host_blocks + agent.offloading)
        out.append(
            d.Drop(
                at_s=self.now,
                app_id=agent.key[0],
                agent_id=agent.key[1],
                blocks=blocks,
                where=where,
                reason=d.Reason(rule, terms),
            )
        )

    def _keep(
        self, agent: AgentState, rule: str, terms: dict[str, d.Term], out: list[d.Decision]
    ) -> None:
        out.append(
            d.Keep(
                at_s=self.now,
                app_id=agent.key[0],
                agent_id=agent.key[1],
                blocks=agent.gpu_blocks,
                reason=d.Reason(rule, terms),
            )
        )

    def _pin(
        self,
        agent: AgentState,
        ttl_s: float,
        rule: str,
        terms: dict[str, d.Term],
        out: list[d.Decision],
    ) -> None:
        if agent.pinned_until == -math.inf and agent.phase != RUNNING:
            self.gpu_free -= agent.gpu_blocks  # held: a pinned block is no longer evictable
        agent.pinned_until = self.now + ttl_s
        self._push_timer(agent.pinned_until, T_UNPIN, agent, agent.tool_token)
        out.append(
            d.Pin(
                at_s=self.now,
                app_id=agent.key[0],
                agent_id=agent.key[1],
                blocks=agent.gpu_blocks,
                ttl_s=ttl_s,
                reason=d.Reason(rule, terms),
            )
        )

    def _unpin(self, agent: AgentState, rule: str, out: list[d.Decision]) -> None:
        if agent.pinned_until == -math.inf:
            return
        agent.pinned_until = -math.inf
        if agent.phase != RUNNING:
            self.gpu_free += agent.gpu_blocks  # idle cached blocks, evictable again
        out.append(
            d.Unpin(
                at_s=self.now,
                app_id=agent.key[0],
                agent_id=agent.key[1],
                blocks=agent.gpu_blocks,
                reason=d.Reason(rule, {}),
            )
        )

    def _reload(self, agent: AgentState, priority: int, rule: str, out: list[d.Decision]) -> None:
        """Bring back the agent's KV that is only on the host (or about to be)."""
        if self.keep_host_copy:
            missing = agent.kv_size - agent.gpu_blocks - agent.uploading - agent.upload_left
            avail = agent.host_blocks - agent.uploading - agent.upload_left
            blocks = min(missing, avail)
        else:
            blocks = agent.host_blocks + agent.offloading - agent.uploading - agent.upload_left
        if blocks > 0 or (agent.upload_left > 0 and priority < agent.upload_priority):
            self._start_upload(agent, max(blocks, 0), priority, rule, {}, out)

    def _start_upload(
        self,
        agent: AgentState,
        blocks: int,
        priority: int,
        rule: str,
        terms: dict[str, d.Term],
        out: list[d.Decision],
    ) -> None:
        """Queue ``blocks`` more for upload (or raise the priority of a queued upload)."""
        if agent.upload_left <= 0:
            agent.upload_piece = 0
            agent.upload_pieces = 0
        agent.upload_left += blocks
        agent.upload_pieces = agent.upload_piece + -(
            -agent.upload_left // self.config.upload_piece_blocks
        )
        agent.upload_priority = (
            min(priority, agent.upload_priority) if agent.upload_left > blocks else priority
        )
        agent.upload_reason = {"rule": rule, **terms}
        agent.upload_token += 1
        agent.upload_parked = False
        self._seq += 1
        heapq.heappush(self._uploads, (agent.upload_priority, self._seq, agent, agent.upload_token))
        self._upload_queued = True

    def _cancel_upload(self, agent: AgentState) -> int:
        left = agent.upload_left
        agent.upload_left = 0
        agent.upload_token += 1
        agent.upload_parked = False
        return left

    # ------------------------------------------------------------------ event handlers

    def _ev_app_registered(self, ev: AppRegistered, out: list[d.Decision]) -> None:
        if ev.app_id in self.apps:
            return
        cfg = self.config
        try:
            info = analyse(ev.dag, cfg.llm_s_default, cfg.default_tool_s)
        except DagError as exc:
            logger.warning("app %s: %s; scheduling it without its edges", ev.app_id, exc)
            seen: set[str] = set()
            nodes = []
            for node in ev.dag.nodes:
                if node.id not in seen:
                    seen.add(node.id)
                    nodes.append(node)
            info = analyse(AppDag(nodes=nodes), cfg.llm_s_default, cfg.default_tool_s)
        app = self.apps[ev.app_id] = AppState(ev.app_id, info, ev.now, ev.tenant)
        self._on_app_registered(app, out)

    def _add_waiting(self, agent: AgentState, blocks: int) -> None:
        if agent.key in self.waiting:
            return
        self.waiting[agent.key] = agent
        agent.wait_blocks = blocks
        agent.wait_since = self.now
        self.own_waiting_blocks += blocks
        if agent.critical:
            self.crit_waiting_blocks += blocks
            self.crit_waiting_by_class[agent.klass] = (
                self.crit_waiting_by_class.get(agent.klass, 0) + 1
            )
            self.crit_waiting_blocks_by_class[agent.klass] = (
                self.crit_waiting_blocks_by_class.get(agent.klass, 0) + blocks
            )
        self._set_phase(agent, WAITING)

    def _remove_waiting(self, agent: AgentState) -> None:
        if self.waiting.pop(agent.key, None) is None:
            return
        self.own_waiting_blocks -= agent.wait_blocks
        agent.wait_total_s += self.now - agent.wait_since
        if agent.critical:
            self.crit_waiting_blocks -= agent.wait_blocks
            left = self.crit_waiting_by_class[agent.klass] - 1
            if left:
                self.crit_waiting_by_class[agent.klass] = left
                self.crit_waiting_blocks_by_class[agent.klass] -= agent.wait_blocks
            else:
                del self.crit_waiting_by_class[agent.klass]
                del self.crit_waiting_blocks_by_class[agent.klass]
        agent.wait_blocks = 0

    def _ev_llm_start(self, ev: LlmCallStart, out: list[d.Decision]) -> None:
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
        agent.last_used_s = ev.now
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

    def _ev_llm_admitted(self, ev: LlmCallAdmitted, out: list[d.Decision]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id)
        if agent is None:
            return
        self._remove_waiting(agent)
        self._set_phase(agent, RUNNING)
        if ev.blocks > 0:
            # Every block the request holds leaves the free count, its own cached prefix
            # too: idle cached blocks were counted free.
            self._set_gpu(agent, ev.blocks)
            if not ev.reported:
                self.gpu_free -= ev.blocks
        agent.last_used_s = ev.now
        self._unpin(agent, "running", out)

    def _ev_llm_preempted(self, ev: LlmCallPreempted, out: list[d.Decision]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id, create=False)
        if agent is None:
            return
        freed = min(max(ev.blocks_freed, 0), agent.gpu_blocks)
        self._set_gpu(agent, agent.gpu_blocks - freed)
        self.gpu_free += freed
        agent.preemptions += 1
        self._add_waiting(agent, max(freed, 1))

    def _ev_llm_finish(self, ev: LlmCallFinish, out: list[d.Decision]) -> None:
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
        agent.last_used_s = ev.now
        self._on_llm_finish(agent, ev, out)

    def _ev_tool_start(self, ev: ToolCallStart, out: list[d.Decision]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id)
        if agent is None:
            return
        if agent.phase == TOOL:
            self._finish_tool(agent, out)
        self._remove_waiting(agent)
        self._set_phase(agent, TOOL)
        agent.tool_token += 1
        agent.tool_start = ev.now
        agent.tool_kind = ev.tool_kind
        agent.call_offloaded = 0
        agent.tool_hint = ev.predicted_s
        agent.overdue = False
        pred = self.predictor.predict(agent.klass, ev.tool_kind, ev.predicted_s)
        agent.prediction = pred
        agent.predicted_s = pred.median_s
        cfg = self.config
        horizon = cfg.deadline_factor * pred.quantile_s(Z_Q95)
        agent.deadline_s = ev.now + min(max(horizon, cfg.deadline_min_s), cfg.deadline_max_s)
        self._push_timer(agent.deadline_s, T_DEADLINE, agent, agent.tool_token)
        self._on_tool_start(agent, out)

    def _ev_tool_end(self, ev: ToolCallEnd, out: list[d.Decision]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id, create=False)
        if agent is None or agent.phase != TOOL:
            return
        self._finish_tool(agent, out)

    def _finish_tool(self, agent: AgentState, out: list[d.Decision]) -> None:
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

    def _ev_app_end(self, ev: AppEnd, out: list[d.Decision]) -> None:
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

    def _ev_engine_state(self, ev: EngineState, out: list[d.Decision]) -> None:
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

    def _ev_transfer_measured(self, ev: TransferMeasured, out: list[d.Decision]) -> None:
        self.cost.observe(ev.direction, ev.nbytes, ev.seconds)

    def _ev_transfer_done(self, ev: TransferDone, out: list[d.Decision]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id, create=False)
        if agent is None:
            return
        if ev.direction == "d2h":
            blocks = min(max(ev.blocks, 0), agent.offloading)
            agent.offloading -= blocks
            self.gpu_free += blocks  # the copy let go of them: empty, or idle cached again
            if not ev.ok:
                self.host_used -= blocks
                agent.upload_left = min(agent.upload_left, agent.host_blocks + agent.offloading)
            else:
                agent.host_blocks += blocks
                if agent.offload_moves:
                    moved = min(blocks, agent.gpu_blocks)
                    self._set_gpu(agent, agent.gpu_blocks - moved)
                if agent.drop_on_arrival or agent.phase == DONE:
                    self._drop(agent, "host", agent.host_blocks, "dropped_on_arrival", {}, out)
                elif agent.upload_parked and agent.upload_left > 0:
                    agent.upload_parked = False
                    self._seq += 1
                    heapq.heappush(
                        self._uploads, (agent.upload_priority, self._seq, agent, agent.upload_token)
                    )
                elif agent.phase != TOOL and agent.offload_moves:
                    self._reload(agent, d.URGENT, "returned_during_offload", out)
        else:
            blocks = min(max(ev.blocks, 0), agent.uploading)
            agent.uploading -= blocks
            self.h2d_in_flight -= blocks
            if ev.ok:
                self._set_gpu(agent, agent.gpu_blocks + blocks)
                if not self.keep_host_copy:
                    agent.host_blocks -= blocks
                    self.host_used -= blocks
                if agent.phase == DONE:
                    self._drop(agent, "host", agent.host_blocks, "app_end", {}, out)
            else:
                self.gpu_free += blocks
                agent.upload_failures += 1
                if agent.phase == DONE:
                    self._drop(agent, "host", agent.host_blocks, "app_end", {}, out)
                elif agent.upload_failures >= MAX_UPLOAD_FAILURES:
                    self._cancel_upload(agent)
                    self._drop(
                        agent,
                        "host",
                        agent.host_blocks,
                        "upload_failed",
                        {"failures": agent.upload_failures},
                        out,
                    )
                else:
                    self._start_upload(
                        agent,
                        blocks,
                        agent.upload_priority,
                        "retry_failed_piece",
                        {"failures": agent.upload_failures},
                        out,
                    )
        if agent.app.ended:
            self._forget_if_settled(agent.app)

    def _ev_kv_evicted(self, ev: KvEvicted, out: list[d.Decision]) -> None:
        agent = self._agent(ev.app_id, ev.agent_id, create=False)
        if agent is None:
            return
        if ev.where == "gpu":
            # Only idle blocks are evicted, and the engine counted them free already.
            freed = min(max(ev.blocks, 0), agent.gpu_blocks)
            self._set_gpu(agent, agent.gpu_blocks - freed)
        else:
            freed = min(max(ev.blocks, 0), agent.host_blocks - agent.uploading)
            agent.host_blocks -= freed
            self.host_used -= freed
            agent.upload_left = min(
                agent.upload_left, agent.host_blocks + agent.offloading - agent.uploading
            )

    def _ev_tick(self, ev: Tick, out: list[d.Decision]) -> None:
        self._on_engine_state(out)

    # ------------------------------------------------------------------ timers and uploads

    def _run_timers(self, out: list[d.Decision]) -> None:
        timers = self._timers
        now = self.now
        while timers and timers[0][0] <= now:
            _, _, kind, agent, token = heapq.heappop(timers)
            if token != agent.tool_token or agent.phase == DONE:
                continue
            if kind == T_DEADLINE:
                if agent.phase == TOOL:
                    agent.overdue = True
                    self._cancel_upload(agent)
                    self._unpin(agent, "safety_deadline", out)
                    self._on_deadline(agent, out)
                    self._push_timer(now + self.config.host_ttl_s, T_HOST_TTL, agent, token)
            elif kind == T_HOST_TTL:
                if agent.phase == TOOL:
                    agent.drop_on_arrival = agent.offloading > 0
                    self._drop(
                        agent,
                        "host",
                        agent.host_blocks,
                        "host_ttl_expired",
                        {"host_ttl_s": self.config.host_ttl_s},
                        out,
                    )
            elif kind == T_UNPIN:
                if agent.pinned_until <= now:
                    self._unpin(agent, "ttl_expired", out)
            else:
                self._on_timer(kind, agent, out)

    def _pump_uploads(self, out: list[d.Decision]) -> None:
        cfg = self.config
        heap = self._uploads
        issued = 0
        head = next(iter(self.waiting.values()), None)
        unknown_pool = self.gpu_total <= 0
        while heap and issued < cfg.upload_pieces_per_tick:
            prio, _, agent, token = heap[0]
            if token != agent.upload_token or agent.upload_left <= 0 or agent.phase == DONE:
                heapq.heappop(heap)
                continue
            avail = agent.host_blocks - agent.uploading
            if self.keep_host_copy:
                avail = min(avail, agent.upload_left)
            piece = min(cfg.upload_piece_blocks, agent.upload_left, avail)
            if piece <= 0:
                heapq.heappop(heap)
                if agent.offloading > 0:
                    agent.upload_parked = True
                else:
                    agent.upload_left = 0
                continue
            # The agent's own idle cached blocks count as free, but not for its own upload
            # (they hold the part of its KV already back, and nothing evicts them for it).
            own = (
                agent.gpu_blocks
                if agent.phase != RUNNING and agent.pinned_until == -math.inf
                else 0
            )
            if unknown_pool:
                budget = piece
            elif prio == d.URGENT:
                protect = head.wait_blocks if head is not None and head is not agent else 0
                budget = self.gpu_free - own - protect
            else:
                budget = self.gpu_free - own - self.waiting_blocks()
            if budget < piece:
                if prio != d.URGENT or budget <= 0:
                    break
                piece = budget
            agent.upload_piece += 1
            agent.upload_pieces = max(agent.upload_pieces, agent.upload_piece)
            agent.uploading += piece
            self.h2d_in_flight += piece
            agent.upload_left -= piece
            self.gpu_free -= piece
            issued += 1
            terms: dict[str, d.Term] = dict(agent.upload_reason)
            rule = str(terms.pop("rule", "upload"))
            terms["budget_blocks"] = budget
            terms["left_blocks"] = agent.upload_left
            out.append(
                d.Upload(
                    at_s=self.now,
                    app_id=agent.key[0],
                    agent_id=agent.key[1],
                    blocks=piece,
                    priority=prio,
                    piece=agent.upload_piece,
                    pieces=agent.upload_pieces,
                    reason=d.Reason(rule, terms),
                )
            )
            if agent.upload_left <= 0:
                heapq.heappop(heap)

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

    def priority(self, agent: AgentState, now: float) -> tuple[float, dict[str, d.Term]]:
        """Scheduling priority of an agent (higher first). Base: importance only."""
        return agent.node.importance, {"importance": agent.node.importance}

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
