"""Gradual uploads: host KV comes back to the GPU in pieces, never in one large grab.

``UploadingPolicy`` queues an agent's upload (``_start_upload``), keeps one heap of queued
uploads by priority (urgent, predictive, prefetch) and releases them as ``Upload`` pieces
(``_pump_uploads``) when the engine's pool has room: an urgent upload never takes the
blocks the head of the waiting queue needs, a predictive or prefetch upload never takes
blocks any waiting request needs.
"""

from __future__ import annotations

import heapq
import math

from tokencake import protocol as p
from tokencake.daemon.scheduler.accounting import AccountingPolicy
from tokencake.daemon.scheduler.agents import DONE, RUNNING, AgentState
from tokencake.daemon.scheduler.policy import PolicyConfig

MAX_UPLOAD_FAILURES = 3
"""After this many failed pieces the host copy is dropped and the next call recomputes."""


class UploadingPolicy(AccountingPolicy):
    """The world model plus the queue of uploads and its release in pieces."""

    keep_host_copy = False
    """True when an upload copies (the host keeps its copy, LMCache-style); False moves."""

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._uploads: list[tuple[int, int, AgentState, int]] = []
        self._upload_queued = False

    def _reload(
        self, agent: AgentState, priority: int, rule: str, out: list[p.DecisionRecord]
    ) -> None:
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
        terms: dict[str, p.Term],
        out: list[p.DecisionRecord],
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

    def _requeue_upload(self, agent: AgentState) -> None:
        """A parked upload (its KV was still on the way to the host) may go on."""
        agent.upload_parked = False
        self._seq += 1
        heapq.heappush(self._uploads, (agent.upload_priority, self._seq, agent, agent.upload_token))

    def _pump_uploads(self, out: list[p.DecisionRecord]) -> None:
        cfg = self.config
        heap = self._uploads
        issued = 0
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
            budget = self._upload_budget(agent, prio, piece)
            if budget < piece:
                if prio != p.URGENT or budget <= 0:
                    break
                piece = budget
            issued += 1
            self._release_piece(agent, piece, prio, budget, out)
            if agent.upload_left <= 0:
                heapq.heappop(heap)

    def _upload_budget(self, agent: AgentState, prio: int, piece: int) -> int:
        """GPU blocks an upload piece of ``agent`` may take now (``piece`` if the pool
        is unknown)."""
        if self.gpu_total <= 0:
            return piece
        # The agent's own idle cached blocks count as free, but not for its own upload
        # (they hold the part of its KV already back, and nothing evicts them for it).
        own = agent.gpu_blocks if agent.phase != RUNNING and agent.pinned_until == -math.inf else 0
        if prio == p.URGENT:
            head = next(iter(self.waiting.values()), None)  # the queue's first request
            protect = head.wait_blocks if head is not None and head is not agent else 0
            return self.gpu_free - own - protect
        return self.gpu_free - own - self.waiting_blocks()

    def _release_piece(
        self, agent: AgentState, piece: int, prio: int, budget: int, out: list[p.DecisionRecord]
    ) -> None:
        agent.upload_piece += 1
        agent.upload_pieces = max(agent.upload_pieces, agent.upload_piece)
        agent.uploading += piece
        self.h2d_in_flight += piece
        agent.upload_left -= piece
        self.gpu_free -= piece
        terms: dict[str, p.Term] = dict(agent.upload_reason)
        rule = str(terms.pop("rule", "upload"))
        terms["budget_blocks"] = budget
        terms["left_blocks"] = agent.upload_left
        out.append(
            p.UploadDecision(
                at_s=self.now,
                app_id=agent.key[0],
                agent_id=agent.key[1],
                blocks=piece,
                priority=prio,
                piece=agent.upload_piece,
                pieces=agent.upload_pieces,
                reason=p.DecisionReason(rule, terms),
            )
        )
