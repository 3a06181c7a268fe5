"""Timers: what the policy decides because time passed, not because an event came.

``TimedPolicy`` keeps one heap of (due time, kind, agent, token) entries. A timer is stale
when the agent's ``tool_token`` moved on (its tool call ended, or a new one began). The
kinds every policy shares: a tool call's safety deadline (``T_DEADLINE``), the host copy's
time to live after it (``T_HOST_TTL``), a pin's expiry (``T_UNPIN``) and an ended app's
copies still unreported ``host_ttl_s`` after its end (``T_SETTLE``). Policies add their own
(``T_UPLOAD``, ``T_LATE``) and handle them in ``_on_timer``.
"""

from __future__ import annotations

import heapq
import math

from tokencake import protocol as p
from tokencake.daemon.scheduler.agents import DONE, RUNNING, TOOL, AgentState
from tokencake.daemon.scheduler.policy import PolicyConfig
from tokencake.daemon.scheduler.uploads import UploadingPolicy

T_UPLOAD = 0
T_LATE = 1
T_DEADLINE = 2
T_HOST_TTL = 3
T_UNPIN = 4
T_SETTLE = 5
COMPACT_MIN = 1024
"""Below this many timers the heap is never compacted."""


def _stale(kind: int, agent: AgentState, token: int) -> bool:
    """A timer can no longer fire: its tool call ended (the token moved on) or its app did;
    a ``T_SETTLE`` timer, once the agent has no copy in flight."""
    if kind == T_SETTLE:
        return not (agent.offloading or agent.uploading)
    return token != agent.tool_token or agent.phase == DONE


class TimedPolicy(UploadingPolicy):
    """The world model and uploads, plus timers: deadlines, host TTL and pins."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._timers: list[tuple[float, int, int, AgentState, int]] = []
        self._compact_at = COMPACT_MIN

    def _on_timer(self, kind: int, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        """Policy-specific timers (T_UPLOAD, T_LATE)."""

    def _write_off_copies(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        """An ended app's copy never reported (``T_SETTLE``): see ``TrackingPolicy``."""

    def _on_deadline(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        """The tool call overran its safety deadline: release its GPU KV."""
        if agent.gpu_blocks > 0:
            self._drop(agent, "gpu", agent.gpu_blocks, "safety_deadline", {}, out)

    def _push_timer(self, at_s: float, kind: int, agent: AgentState, token: int) -> None:
        self._seq += 1
        heapq.heappush(self._timers, (at_s, self._seq, kind, agent, token))
        if len(self._timers) >= self._compact_at:
            self._compact_timers()

    def _compact_timers(self) -> None:
        """Drop the timers that can no longer fire (their tool call ended, or their app).

        ``_run_timers`` skips them when due, but until then (``host_ttl_s``, 10 minutes)
        each keeps its agent, and so its ended app, in memory. Compacting when the heap has
        doubled since the last time costs O(1) per timer, amortised, and keeps the heap
        within twice the live timers. Stale is for good: tokens only grow, DONE is final.
        """
        live = [t for t in self._timers if not _stale(t[2], t[3], t[4])]
        heapq.heapify(live)
        self._timers = live
        self._compact_at = max(COMPACT_MIN, 2 * len(live))

    def _pin(
        self,
        agent: AgentState,
        ttl_s: float,
        rule: str,
        terms: dict[str, p.Term],
        out: list[p.DecisionRecord],
    ) -> None:
        if agent.pinned_until == -math.inf and agent.phase != RUNNING:
            self.gpu_free -= agent.gpu_blocks  # held: a pinned block is no longer evictable
        agent.pinned_until = self.now + ttl_s
        self._push_timer(agent.pinned_until, T_UNPIN, agent, agent.tool_token)
        out.append(
            p.PinDecision(
                at_s=self.now,
                app_id=agent.key[0],
                agent_id=agent.key[1],
                blocks=agent.gpu_blocks,
                ttl_s=ttl_s,
                reason=p.DecisionReason(rule, terms),
            )
        )

    def _unpin(self, agent: AgentState, rule: str, out: list[p.DecisionRecord]) -> None:
        if agent.pinned_until == -math.inf:
            return
        agent.pinned_until = -math.inf
        if agent.phase != RUNNING:
            self.gpu_free += agent.gpu_blocks  # idle cached blocks, evictable again
        out.append(
            p.UnpinDecision(
                at_s=self.now,
                app_id=agent.key[0],
                agent_id=agent.key[1],
                blocks=agent.gpu_blocks,
                reason=p.DecisionReason(rule, {}),
            )
        )

    def _run_timers(self, out: list[p.DecisionRecord]) -> None:
        now = self.now
        # self._timers each time round: a timer pushed here may compact it into a new list.
        while self._timers and self._timers[0][0] <= now:
            _, _, kind, agent, token = heapq.heappop(self._timers)
            if _stale(kind, agent, token):
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
            elif kind == T_SETTLE:
                self._write_off_copies(agent, out)
            else:
                self._on_timer(kind, agent, out)
