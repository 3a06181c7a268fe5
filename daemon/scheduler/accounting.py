"""The world model's bookkeeping: which agent holds which blocks where, and the pool.

``AccountingPolicy`` turns the policy's own decisions and the engine's reports into
counts: per-agent GPU/host blocks (``agents.AgentState``), the engine's free pool, the
waiting queue and host usage. Everything a hook needs is reachable in O(1) or through a
heap, so one event costs O(log n) in the number of agents: no hook scans all agents.


Accounting model (what "blocks" mean to the policy):

* ``gpu_blocks``: the agent's KV on the GPU, used by a running request or cached;
* ``host_blocks``: complete copies on the host; ``offloading`` / ``uploading``: copies in
  flight; ``upload_left``: blocks of an accepted upload not yet released as pieces;
* ``host_used`` counts the arena's share of host blocks (``host_blocks`` less those in
  the L2 tier, ``l2_blocks``) plus offloads in flight, and never exceeds the host capacity:
  an offload is only decided when it fits. Blocks that left the arena for L2 free its room;
  blocks a host copy loses leave the arena first (what stays is what L2 holds);
* ``gpu_free`` is the engine's last report, minus upload pieces released and blocks
  admitted since, plus the blocks the policy knows were freed since. Like vLLM's free block
  queue, it counts idle cached blocks as free: a finished call's blocks return to it, an
  offload holds its blocks until the copy ends, and evicting or dropping idle blocks does
  not change it. Uploads never take blocks the head of the
  waiting queue needs (urgent) or that any waiting request needs (predictive, prefetch):
  this is what keeps the head of the queue from starving behind asynchronous reloads.
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict

from msgspec import msgpack

from tokencake import protocol as p
from tokencake.daemon.scheduler.agents import TOOL, WAITING, AgentState, AppState
from tokencake.daemon.scheduler.costmodel import TransferCostModel
from tokencake.daemon.scheduler.dag import DagInfo, analyse
from tokencake.daemon.scheduler.learned import add_count, learned
from tokencake.daemon.scheduler.policy import Policy, PolicyConfig
from tokencake.daemon.scheduler.predictor import RunningMeanPredictor, ToolDurationPredictor
from tokencake.protocol import AppDag

READER_DECAY = 0.9
"""Weight of the past in the per-(agent type, tool kind) record of whether a tool call's KV
was read afterwards (each new outcome counts 1)."""


class AccountingPolicy(Policy):
    """Per-agent and pool block counts, kept in step with events and decisions."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        cfg = self.config
        self.now = -math.inf
        self.predictor = ToolDurationPredictor(cfg.default_tool_s)
        self.mean_predictor = RunningMeanPredictor(cfg.default_tool_s)
        self.cost = TransferCostModel(
            cfg.bytes_per_block,
            cfg.d2h_bytes_per_s,
            cfg.h2d_bytes_per_s,
            cfg.copy_overhead_s,
            cfg.l2_bytes_per_s,
            cfg.l2_overhead_s,
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
        self._seq = 0
        """Tie-breaker of the timer and upload heaps (FIFO among equals)."""
        self._dags: weakref.WeakValueDictionary[tuple[bytes, float, float], DagInfo] = (
            weakref.WeakValueDictionary()
        )
        """The analyses of the DAGs live apps registered, by content (``_analysed``)."""

    def __del__(self) -> None:
        """A dropped policy (its engine left, a policy switch) goes when its last reference
        does; its live apps and their agents refer to each other, so the cycles are cut
        here and they go with it, not at the next full collection."""
        for app in getattr(self, "apps", {}).values():
            app.agents.clear()

    def _analysed(self, dag: AppDag) -> DagInfo:
        """``analyse(dag)``, shared by the live apps that registered the same DAG (one
        workflow run many times): the analysis is read-only, and one copy of the nodes
        stays in the CPU caches where a copy per app would not (every event reads its
        agent's node). Raises ``DagError`` as ``analyse`` does."""
        cfg = self.config
        key = (msgpack.encode(dag), cfg.llm_s_default, cfg.default_tool_s)
        info = self._dags.get(key)
        if info is None:
            info = self._dags[key] = analyse(dag, cfg.llm_s_default, cfg.default_tool_s)
        return info

    def _agent(self, app_id: str, agent_id: str, create: bool = True) -> AgentState | None:
        app = self.apps.get(app_id)
        if app is None:
            if not create:
                return None
            app = self.apps[app_id] = AppState(app_id, self._analysed(AppDag(nodes=[])), self.now)
        agent = app.agents.get(agent_id)
        if agent is None:
            if not create or app.ended:
                return None
            node = app.node(agent_id)
            # Keyed by the node's own id (the same string): shared with every app of the
            # same DAG, so the lookups compare against one string, not one per app.
            agent = app.agents[node.node_id] = AgentState(app, node, self.now)
        return agent

    def _set_phase(self, agent: AgentState, phase: str) -> None:
        if agent.phase != phase:
            agent.phase = phase
            agent.phase_since = self.now
        if not agent.critical:
            return  # only critical agents are ever guarded
        if phase in (WAITING, TOOL):
            self.guarded[agent.key] = agent
        else:
            self.guarded.pop(agent.key, None)

    def _set_gpu(self, agent: AgentState, blocks: int) -> None:
        blocks = max(0, blocks)
        delta = blocks - agent.gpu_blocks
        if not delta:
            return
        add_count(self.class_usage, agent.klass, delta)
        if agent.critical:
            add_count(self.class_crit_usage, agent.klass, delta)
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
        rec = learned(self.reader_stats, key, lambda: [0.0, 0.0])
        rec[0] *= READER_DECAY
        rec[1] *= READER_DECAY
        rec[0 if read else 1] += 1.0
        if not read and agent.call_offloaded > 0:
            self.offloads_unread += 1
            self.offload_unread_blocks += agent.call_offloaded

    def host_free(self) -> int:
        """Free host blocks: the engine's last report, less the copies booked since. The
        policy's own book (``host_total - host_used``) is used only before any report: it
        counts a block once per agent whose copy settled it, so a prefix several agents
        share (a fan-out's planner context, a node and its successor) is counted several
        times while the engine stores it once."""
        if self.host_reported_free < 0:
            return self.host_total - self.host_used
        since = self.host_used - self.host_used_at_report
        return min(self.host_total, self.host_reported_free - since)

    def pressure_terms(self) -> dict[str, p.Term]:
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

    def _offload(
        self,
        agent: AgentState,
        blocks: int,
        moves: bool,
        rule: str,
        terms: dict[str, p.Term],
        out: list[p.DecisionRecord],
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
            p.OffloadDecision(
                at_s=self.now,
                app_id=agent.key[0],
                agent_id=agent.key[1],
                blocks=blocks,
                free_gpu=moves,
                reason=p.DecisionReason(rule, terms),
            )
        )

    def _drop(
        self,
        agent: AgentState,
        where: p.KvTier,
        blocks: int,
        rule: str,
        terms: dict[str, p.Term],
        out: list[p.DecisionRecord],
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
            self._release_host(agent, blocks)
            agent.upload_left = min(agent.upload_left, agent.host_blocks + agent.offloading)
        out.append(
            p.DropDecision(
                at_s=self.now,
                app_id=agent.key[0],
                agent_id=agent.key[1],
                blocks=blocks,
                where=where,
                reason=p.DecisionReason(rule, terms),
            )
        )

    def _release_host(self, agent: AgentState, blocks: int) -> None:
        """``blocks`` of the agent's host copy are gone (dropped, evicted, or moved to the
        GPU). The arena's blocks go first; only those free arena room in ``host_used``."""
        in_arena = agent.host_blocks - agent.l2_blocks
        agent.host_blocks -= blocks
        agent.l2_blocks = min(agent.l2_blocks, agent.host_blocks)
        self.host_used -= min(blocks, in_arena)

    def _keep(
        self, agent: AgentState, rule: str, terms: dict[str, p.Term], out: list[p.DecisionRecord]
    ) -> None:
        out.append(
            p.KeepDecision(
                at_s=self.now,
                app_id=agent.key[0],
                agent_id=agent.key[1],
                blocks=agent.gpu_blocks,
                reason=p.DecisionReason(rule, terms),
            )
        )

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
        # Only a WAITING agent is queued: ``_add_waiting`` sets the phase, and every other
        # phase change removes the agent first (most calls find it not waiting: no lookup).
        if agent.phase != WAITING or self.waiting.pop(agent.key, None) is None:
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
