"""Where the scheduler's decisions go: numbered, kept for ``tokencake-ctl decisions``, counted,
and pushed to the engine they concern when its connector acts on that kind.

An upload also asks the L2 tier to bring back what of the agent's KV went there, so the
engine finds it in the arena.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from tokencake import protocol as p
from tokencake.daemon.engines import EngineRegistry
from tokencake.daemon.metrics import DaemonMetrics


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
