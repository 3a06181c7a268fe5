"""Write-through: a host copy of KV whose reader is coming, made while the KV stays cached.

Under memory pressure, KV that will be read again (by the agent's own next call after a
tool call, or by a DAG successor, whose prompt starts with it) can be evicted from the GPU
before its reader is admitted. Without a host copy the reader recomputes it; with one it
reloads it (the engine loads host hits on admission: vLLM's connector lookup, the
simulator's prefix walk). ``WriteThroughPolicy`` copies it out (``Offload`` with
``free_gpu=False``: the GPU blocks stay cached) when all of these hold:

* a reader is predicted: a tool call whose KV is kept on the GPU and whose agent type and
  tool kind do not mostly leave unread KV, or a finished node with a successor still to run;
* the blocks not yet on the host are cheaper to reload than to recompute
  (``h2d`` time at the measured bandwidth and per-copy overhead, one copy per upload piece,
  against ``recompute_s_per_block``);
* eviction is plausible: a request waits for blocks or GPU usage is at least
  ``offload_usage_floor`` (without pressure nothing is evicted and the copy is waste);
* the host keeps room for a whole GPU's worth of tool-call offloads after the copy (moving
  idle KV off the GPU during a tool call frees memory; a copy only insures it).

A copy ends the agent's pin (engines hand a pin's hold to the copy). During a tool call
the pin comes back up to the call's predicted median, and on to its old end (the q95) when
the oldest waiting request cannot fit beside the agent's KV and that tail plus the LLM call
that reads the KV next is shorter than the request's LLM call (``_repin_after_copy``). The
host copy insures the KV, not its GPU room: a call that returns after the median to find
its room taken by such a request waits for its whole call. Kept, the room makes the waiting
request wait for the tail and then for the reader's call (the two do not fit together):
the shorter job goes first. A long tail (a bimodal tool's long mode) or a long reader (a
ReAct step, whose next step pins the room again) costs the taker more than it saves. When the
agent comes back only the blocks missing on the GPU are uploaded (``_reload_missing``):
written-through KV still cached needs no copy.
"""

from __future__ import annotations

from tokencake import protocol as p
from tokencake.daemon.scheduler.agents import IDLE, TOOL, AgentState
from tokencake.daemon.scheduler.policy import PolicyConfig
from tokencake.daemon.scheduler.tracking import TrackingPolicy

NO_READER = 1e12
"""``_reader_gap_s`` of KV that nobody is predicted to read."""


class WriteThroughPolicy(TrackingPolicy):
    """Tracking plus write-through of KV whose reader is coming (see the module doc)."""

    write_through = True

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self._finished: dict[tuple[str, str], tuple[AgentState, int]] = {}
        """Agents whose call just finished (with their call count): when no tool call
        followed by the next engine report, their successors are the readers."""

    def _pressure(self) -> bool:
        """Would memory freed now be used: a request waits for blocks, or GPU usage is at
        least ``offload_usage_floor``."""
        usage = 1.0 - self.gpu_free / self.gpu_total if self.gpu_total > 0 else 0.0
        return self.waiting_blocks() > 0 or usage >= self.config.offload_usage_floor

    def _reader_gap_s(self, agent: AgentState) -> float:
        """Seconds until a finished agent's KV is read by someone else (``NO_READER``:
        nobody). The base knows of no readers; a DAG-aware policy overrides this."""
        return NO_READER

    def _note_finished(self, agent: AgentState) -> None:
        if self.write_through:
            self._finished[agent.key] = (agent, agent.llm_calls)

    def _write_through_finished(self, out: list[p.DecisionRecord]) -> None:
        """The calls that ended without a tool call: their successors read the KV."""
        if not self._finished:
            return
        done, self._finished = self._finished, {}
        for agent, calls in done.values():
            if agent.phase != IDLE or agent.llm_calls != calls or agent.app.ended:
                continue
            gap = self._reader_gap_s(agent)
            if gap < NO_READER:
                self._write_through(agent, gap, "successor_reads", out)

    def _on_llm_preempted(self, agent: AgentState, freed: int, out: list[p.DecisionRecord]) -> None:
        """A preempted request's blocks are released, cached, and the first a new request
        evicts; the request itself is their reader, and it waits. Copied out, they cost it
        a reload instead of a recompute (vLLM's swap preemption, as a copy)."""
        # All of them: the engine copies only what its host store lacks, and a block
        # missing there (the policy's count is of copies made, not of what stayed) would
        # end the request's prefix hit at it.
        self._write_through(agent, 0.0, "preempted", out, freed)

    def _on_upload_given_up(
        self, agent: AgentState, terms: dict[str, p.Term], out: list[p.DecisionRecord]
    ) -> None:
        """The GPU had no room for the upload pieces (or the host chain has a hole that a
        GPU copy may fill again): the copy stays on the host, where the returning call's
        admission loads it (a prefix hit) instead of recomputing it. The tool call's
        deadline still bounds how long the host holds it."""
        self._keep(agent, "keep:upload_failed_stays_on_host", terms, out)

    def _write_through(
        self,
        agent: AgentState,
        read_in_s: float,
        trigger: str,
        out: list[p.DecisionRecord],
        idle_blocks: int | None = None,
    ) -> bool:
        """Copy the agent's GPU KV not yet on the host if that pays (module doc); by default
        the blocks it holds, or ``idle_blocks`` that a preemption released. True when a copy
        was decided."""
        self._finished.pop(agent.key, None)
        if idle_blocks is None:
            new = min(agent.kv_size - agent.host_blocks - agent.offloading, agent.gpu_blocks)
        else:
            new = idle_blocks
        if not self.write_through or new <= 0 or agent.offloading > 0:
            return False
        cfg = self.config
        t_back = self.cost.seconds("h2d", new, -(-new // cfg.upload_piece_blocks))
        t_recompute = new * cfg.recompute_s_per_block
        room = self.host_free() - new - max(self.gpu_total, 0)
        terms: dict[str, p.Term] = {
            "trigger": trigger,
            "blocks": new,
            "read_in_s": read_in_s,
            "t_h2d_s": t_back,
            "t_recompute_s": t_recompute,
            "host_room_after_blocks": room,
        }
        if t_back >= t_recompute:
            self._keep(agent, "keep:reload_not_cheaper_than_recompute", terms, out)
            return False
        if not self._pressure():
            return False  # nothing is evicted without pressure: no copy, and nothing to say
        if room < 0:
            self._keep(agent, "keep:host_room_for_offloads", terms, out)
            return False
        pinned_until = agent.pinned_until
        terms.update(self.pressure_terms())
        self._offload(agent, new, False, "save:reader_coming", terms, out)
        self._repin_after_copy(agent, pinned_until, out)
        return True

    def _repin_after_copy(
        self, agent: AgentState, pinned_until: float, out: list[p.DecisionRecord]
    ) -> None:
        """The copy ended the pin; during a tool call it comes back up to the predicted
        median, or to its old end when the oldest waiting request cannot fit beside the
        agent's KV and the tail past the median plus the reader's LLM call is shorter than
        the waiting request's (module doc)."""
        pred = agent.prediction
        if agent.phase != TOOL or pred is None or pinned_until <= self.now:
            return
        median_end = agent.tool_start + pred.median_s
        taker_s, taker_blocks = self._taker()
        tail_s = pinned_until - max(median_end, self.now)
        reader_s = self._reader_llm_s(agent)
        apart = agent.gpu_blocks + taker_blocks > self.gpu_total
        through = apart and tail_s > 0.0 and tail_s + reader_s < taker_s
        until = pinned_until if through else min(pinned_until, median_end)
        if until <= self.now:
            return
        rule = "pin:through_short_tail" if through else "pin:until_median_with_host_copy"
        terms: dict[str, p.Term] = {
            "median_s": pred.median_s,
            "was_until_s": pinned_until,
            "tail_s": tail_s,
            "reader_llm_s": reader_s,
            "taker_llm_s": taker_s,
            "taker_blocks": taker_blocks,
        }
        self._pin(agent, until - self.now, rule, terms, out)
        self.gpu_free += agent.gpu_blocks  # the copy kept the pin's hold: not held twice

    def _reader_llm_s(self, agent: AgentState) -> float:
        """The expected LLM call that reads a tool-calling agent's KV when the tool returns:
        its DAG successors' longest (they start from its context), else its own next call
        (an agent outside the DAG calls again). A zero estimate counts as the default."""
        node = agent.node
        nodes = agent.app.info.nodes
        ests = [nodes[j].expected_llm_s for j in node.succ] or [node.expected_llm_s]
        return max(s if s > 0 else self.config.llm_s_default for s in ests)

    def _taker(self) -> tuple[float, int]:
        """The request that would take freed GPU room, the oldest waiting one: its expected
        LLM call (its DAG node's estimate, else the default) and the blocks it waits for."""
        oldest = next(iter(self.waiting.values()), None)
        if oldest is None:
            return self.config.llm_s_default, 0
        llm = oldest.node.expected_llm_s
        return (llm if llm > 0 else self.config.llm_s_default), oldest.wait_blocks

    def _reload_missing(
        self, agent: AgentState, priority: int, rule: str, out: list[p.DecisionRecord]
    ) -> None:
        """Upload the agent's host KV that is missing on the GPU (moved off, or evicted
        after a write-through); written-through KV still cached needs no copy."""
        moving = agent.offloading if agent.offload_moves else 0
        queued = agent.uploading + agent.upload_left
        on_host = agent.host_blocks + moving - queued
        missing = agent.kv_size - agent.gpu_blocks + moving - queued
        blocks = min(on_host, missing)
        if blocks > 0 or (agent.upload_left > 0 and priority < agent.upload_priority):
            self._start_upload(agent, max(blocks, 0), priority, rule, {}, out)
