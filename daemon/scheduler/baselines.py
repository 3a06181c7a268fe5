"""The peers a user could pick instead of TokenCake, on the same interface and engine.

They are faithful to each system's published KV behaviour, restated in our event model
(as the TokenCake paper, arXiv 2510.18586, describes them), not to its code. Where a peer
needs a duration estimate it gets the running-mean estimator of the TokenCake authors' vLLM
fork (github.com/pku-lemonade/TokenCake), not our predictor, so a comparison measures
the policies and not our predictor.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from tokencake import protocol as p
from tokencake.daemon.scheduler.agents import DONE, TOOL, WAITING, AgentState
from tokencake.daemon.scheduler.policy import CachedKv, PolicyConfig, WaitingRequest
from tokencake.daemon.scheduler.tracking import TrackingPolicy

INF_STEPS = 1 << 30


class VllmPolicy(TrackingPolicy):
    """vLLM with prefix caching: KV stays cached after a call, LRU eviction, recompute."""

    name = "vllm"

    def _on_llm_start(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        """No host tier: nothing to reload."""

    def _on_tool_end(self, agent: AgentState, actual_s: float, out: list[p.DecisionRecord]) -> None:
        """No host tier."""


class LruOffloadPolicy(TrackingPolicy):
    """LMCache / vLLM OffloadingConnector: save every finished call's KV to the host (the GPU
    copy stays cached), evict host copies LRU when full, reload on a prefix hit."""

    name = "lru-offload"
    keep_host_copy = True

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._host_lru: OrderedDict[tuple[str, str], AgentState] = OrderedDict()

    def _on_llm_finish(
        self, agent: AgentState, ev: p.LlmCallFinish, out: list[p.DecisionRecord]
    ) -> None:
        new = agent.kv_size - agent.host_blocks - agent.offloading
        if new <= 0:
            self._touch(agent)
            return
        self._make_host_room(new, agent, out)
        if self.host_free() < new:
            self._keep(agent, "keep:host_full", {"blocks": new, "host_free": self.host_free()}, out)
            return
        self._offload(agent, new, False, "save:request_end", {"blocks": new}, out)
        self._touch(agent)

    def _on_llm_start(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        self._touch(agent)
        self._reload(agent, p.URGENT, "reload:prefix_hit", out)

    def _on_tool_end(self, agent: AgentState, actual_s: float, out: list[p.DecisionRecord]) -> None:
        """Reload waits for the next request (on demand)."""

    def _touch(self, agent: AgentState) -> None:
        self._host_lru[agent.key] = agent
        self._host_lru.move_to_end(agent.key)

    def _make_host_room(self, need: int, keep: AgentState, out: list[p.DecisionRecord]) -> None:
        """Evict least recently used host copies until ``need`` blocks fit (bounded work:
        each evicted entry leaves the LRU, so this is amortised O(1) per saved call)."""
        lru = self._host_lru
        while self.host_free() < need and lru:
            key, victim = next(iter(lru.items()))
            if victim is keep:
                break
            del lru[key]
            if victim.uploading or victim.upload_left:
                continue
            self._drop(victim, "host", victim.host_blocks, "drop:host_lru", {"need": need}, out)


class InferCeptPolicy(TrackingPolicy):
    """InferCept: per interception pick preserve, discard (recompute) or swap, whichever
    wastes the least GPU memory x time, then swap back in when the call returns.

    Waste estimates (block-seconds), with T the estimated interception time:
    preserve = blocks x T; discard = recompute time x (blocks + other used blocks), the
    batch stalls while the context is recomputed; swap = (swap-out + swap-in time) x blocks,
    the blocks stay pinned while copied, plus the swap-in time x blocks stall on return.
    """

    name = "infercept"

    def _on_tool_start(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        blocks = agent.gpu_blocks
        if blocks <= 0:
            return
        t_int = self.mean_predictor.predict_s(agent.klass, agent.tool_kind, agent.tool_hint)
        used = max(self.gpu_total - self.gpu_free - blocks, 0)
        t_rec = blocks * self.config.recompute_s_per_block
        t_out = self.cost.seconds("d2h", blocks)
        t_in = self.cost.seconds("h2d", blocks)
        waste = {
            "preserve": blocks * t_int,
            "discard": t_rec * (blocks + used),
            "swap": (t_out + t_in) * blocks + t_in * blocks,
        }
        if self.host_free() < blocks:
            del waste["swap"]
        choice = min(waste, key=lambda k: (waste[k], k))
        terms: dict[str, p.Term] = {f"waste_{k}": round(v, 6) for k, v in waste.items()}
        terms.update({"interception_s": round(t_int, 6), "blocks": blocks})
        if choice == "preserve":
            self._pin(agent, agent.deadline_s - self.now, "preserve:least_waste", terms, out)
        elif choice == "discard":
            self._drop(agent, "gpu", blocks, "discard:least_waste", terms, out)
        else:
            self._offload(agent, blocks, True, "swap:least_waste", terms, out)


class ContinuumPolicy(TrackingPolicy):
    """Continuum: pin the agent's KV with a time-to-live across the tool call, so the
    returning call hits; the TTL is the predicted tool time, capped. Returning agents are
    admitted in their application's arrival order (program-level FCFS)."""

    name = "continuum"

    def _on_tool_start(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        if agent.gpu_blocks <= 0:
            return
        ttl = self.mean_predictor.predict_s(agent.klass, agent.tool_kind, agent.tool_hint)
        cap = self.config.continuum_ttl_max_s
        terms: dict[str, p.Term] = {"predicted_s": round(ttl, 6), "ttl_cap_s": cap}
        if ttl > cap:
            self._keep(agent, "keep:ttl_above_cap_unpinned", terms, out)
            return
        self._pin(agent, ttl, "pin:ttl_across_tool_call", terms, out)

    def _on_llm_start(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        """No host tier."""

    def _on_tool_end(self, agent: AgentState, actual_s: float, out: list[p.DecisionRecord]) -> None:
        """No host tier."""

    def admission_order(
        self, waiting: Sequence[WaitingRequest], now: float
    ) -> list[WaitingRequest]:
        def key(w: WaitingRequest) -> tuple[float, float, str]:
            app = self.apps.get(w.app_id)
            return (app.registered_s if app is not None else w.arrival_s, w.arrival_s, w.request_id)

        return sorted(waiting, key=key)


class KvFlowPolicy(LruOffloadPolicy):
    """KVFlow over a HiCache-like host tier: write-through at request end, eviction by
    steps-to-execution in the workflow (furthest first, LRU among ties), and prefetch of
    the KV the next agents will read: an agent returning from a tool, and the
    predecessors of a node whose inputs are all done."""

    name = "kvflow"

    def steps_to_execution(self, agent: AgentState | None) -> int:
        if agent is None or agent.phase == DONE or agent.app.ended:
            return INF_STEPS
        if agent.phase in (WAITING, TOOL):
            return 0 if agent.phase == WAITING else 1
        node = agent.node
        if not node.succ:
            return INF_STEPS
        app = agent.app
        best = INF_STEPS
        for j in node.succ:
            succ = app.info.nodes[j]
            started = app.agents.get(succ.node_id)
            if started is not None and started.llm_calls > 0:
                continue
            pending = sum(
                1
                for j in succ.pred
                if (a := app.agents.get(app.info.nodes[j].node_id)) is None or a.llm_calls == 0
            )
            best = min(best, 1 + pending)
        return best

    def eviction_order(self, candidates: Sequence[CachedKv], now: float) -> list[CachedKv]:
        keyed = []
        for c in candidates:
            agent = self._agent(c.app_id, c.agent_id, create=False)
            keyed.append((-self.steps_to_execution(agent), c.last_used_s, c))
        keyed.sort(key=lambda k: (k[0], k[1]))
        return [k[2] for k in keyed]

    def _on_tool_end(self, agent: AgentState, actual_s: float, out: list[p.DecisionRecord]) -> None:
        self._reload(agent, p.PREFETCH, "prefetch:next_to_execute", out)

    def _on_llm_finish(
        self, agent: AgentState, ev: p.LlmCallFinish, out: list[p.DecisionRecord]
    ) -> None:
        super()._on_llm_finish(agent, ev, out)
        app = agent.app
        for j in agent.node.succ:
            succ = app.info.nodes[j]
            preds = [app.agents.get(app.info.nodes[i].node_id) for i in succ.pred]
            if all(q is not None and q.llm_calls > 0 for q in preds):
                for q in preds:
                    if q is not None and q is not agent:
                        self._reload(q, p.PREFETCH, "prefetch:successor_ready", out)
