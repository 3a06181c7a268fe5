"""TokenCake's policy: temporal offload/predictive upload and DAG-aware spatial scheduling.

Temporal (``temporal=True``)
    At tool start, offload the agent's GPU KV only when it pays: a low quantile of the
    predicted stall (q20, q10 on the critical path: the risk of a wrong offload is paid in
    app latency there) must exceed the out-and-back transfer time (online-measured
    bandwidth and per-copy overhead, one copy per upload piece) by ``min_margin_s``; some
    waiting request must want the blocks, or GPU usage be above ``offload_usage_floor``;
    the host must have room. The upload is planned to land by the same low quantile of the
    return time, so the slack (median - quantile) grows and shrinks with the spread of
    past errors. KV kept on the GPU (the stall does not pay, no pressure, or the host is
    full) is pinned until the call's q95, at most ``tool_pin_max_s``, so the return finds
    it there; KV kept for want of pressure is examined again, once, when waiting demand or
    pressure appears, with what is left of the stall (an offload ends the pin). An early
    return raises the upload to urgent; a call past its q95 keeps any KV still on the host
    there until it returns (late return), and its GPU-resident KV is re-examined with the
    elapsed time as the remaining-stall estimate (a tool that has run long tends to run
    long). KV that stays on the GPU and that a reader will come back for (the returning
    call, or a DAG successor) is written through to the host under pressure when a reload
    beats a recompute (``writethrough``), so an eviction costs a reload, not a recompute.
    Deadlines: see ``timers``.

Spatial (``spatial=True``)
    Priority = importance x (1 + sum of dimensionless terms): criticality (1 - slack /
    critical length), remaining share (tail / critical length), fan-out (normalised by the
    app's widest node), join lag (share of the join group's siblings already through),
    waiting (ln(1 + wait / the node's own expected LLM time)), preemptions (ln(1 + n)) and
    app progress. No term has a tuned weight; each contribution is reported.
    Admission: applications in registration order (program-level FCFS, ``app_rank``),
    each advanced by half its expected critical path (the tail guard,
    ``guard.app_lead_s``), the node priority within an application: interleaving
    applications under memory contention makes every app's context compete for the pool
    (evicted, recomputed, and every app finishing near the end). Partition: each class
    (agent type) gets a reservation that follows its critical agents' demand (blocks held
    + blocks waited for), smoothed, and capped at ``max_reserve_fraction`` of the pool,
    reported as ``partition`` decisions for operators. ``may_allocate`` is the critical-inversion
    guard (``guard``, shared with vLLM's ``TokenCakeScheduler``): a non-critical request
    is admitted only while the blocks protected for critical agents that rank ahead of it
    (its own app or one ranked ahead; waiting, or in a tool call with KV on the GPU or an
    upload due) stay free: no critical inversion, and no memory held idle for a newer
    app's agent while an app ranked ahead waits. Critical agents are never refused. Eviction: KV
    nobody will read first (ended apps, agents whose DAG successors all ran), then the KV
    of applications ranked later (the admission order reads the others' KV first),
    then the KV whose next use is furthest away (remaining predicted tool time; its
    successors' start: a waiting successor reads the predecessor's KV, contexts being
    append-only), divided by priority.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from tokencake import guard
from tokencake import protocol as p
from tokencake.daemon.scheduler.agents import (
    DONE,
    IDLE,
    RUNNING,
    TOOL,
    WAITING,
    AgentState,
    AppState,
)
from tokencake.daemon.scheduler.costmodel import upload_lead_s
from tokencake.daemon.scheduler.policy import CachedKv, PolicyConfig, WaitingRequest
from tokencake.daemon.scheduler.predictor import Z_Q10, Z_Q20, Z_Q95
from tokencake.daemon.scheduler.timers import T_LATE, T_UPLOAD
from tokencake.daemon.scheduler.writethrough import NO_READER, WriteThroughPolicy

PARTITION_SMOOTHING = 0.5
"""Weight of the newest demand sample in the per-class reservation."""
NEVER = NO_READER
UNREAD_MIN_OUTCOMES = 3.0
"""Past tool calls of an agent type and tool kind needed before their record decides."""
UNREAD_SHARE = 0.8
"""When at least this share of them left KV nobody read afterwards, a new call's KV is not
offloaded (a copy out and back for nobody). It is still pinned: a wrong verdict on a pin
would cost a recompute, a wrong verdict on an offload only the copy saved."""


class TokenCakePolicy(WriteThroughPolicy):
    name = "tokencake"
    temporal = True
    spatial = True
    ranks_running = True

    def __init__(self, config: PolicyConfig | None = None) -> None:
        super().__init__(config)
        self.reservations: dict[str, int] = {}
        self._reserve_ema: dict[str, float] = {}
        self._last_partition_s = -math.inf
        self._kept_idle: dict[tuple[str, str], tuple[AgentState, int]] = {}
        """Agents in a tool call whose GPU KV was kept for want of pressure (with the
        call's token): re-examined once when waiting demand or pressure appears."""

    # ------------------------------------------------------------------ temporal

    def _on_tool_start(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        if not self.temporal:
            return
        pred = agent.prediction
        assert pred is not None
        late_at = agent.tool_start + pred.quantile_s(Z_Q95)
        unread = self._likely_unread(agent)
        if unread:
            share, n = self.unread_share(agent.klass, agent.tool_kind)
            terms: dict[str, p.Term] = {"unread_share": round(share, 4), "outcomes": round(n, 3)}
            self._keep(agent, "keep:not_read_after_tool", terms, out)
            offloaded = False
        else:
            offloaded = self._offload_for_call(agent, "tool_start", out)
        if not offloaded and agent.gpu_blocks > 0:
            # Kept on the GPU: the returning call should find it there. Pin it until the
            # call's q95 (as Continuum pins across tool calls), unless that is too long to
            # hold memory idle; the eviction order decides after that.
            ttl = late_at - self.now
            terms = {
                "ttl_s": ttl,
                "tool_pin_max_s": self.config.tool_pin_max_s,
                "kept_because": out[-1].reason.rule if out else "",
            }
            if ttl <= self.config.tool_pin_max_s:
                self._pin(agent, ttl, "pin:kept_through_tool_call", terms, out)
            if not unread:
                # The returning call reads it: a host copy insures it against eviction.
                self._write_through(agent, pred.median_s, "tool_kept", out)
        self._push_timer(late_at, T_LATE, agent, agent.tool_token)

    def _on_llm_finish(
        self, agent: AgentState, ev: p.LlmCallFinish, out: list[p.DecisionRecord]
    ) -> None:
        if self.temporal:
            self._note_finished(agent)

    def _on_llm_start(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        self._reload_missing(agent, p.URGENT, "reload_on_llm_start", out)

    def _reader_gap_s(self, agent: AgentState) -> float:
        return self._consumer_gap_s(agent)

    def _likely_unread(self, agent: AgentState) -> bool:
        """Past calls of this agent type and tool kind mostly left KV nobody read after."""
        share, n = self.unread_share(agent.klass, agent.tool_kind)
        return n >= UNREAD_MIN_OUTCOMES and share >= UNREAD_SHARE

    def _offload_for_call(
        self, agent: AgentState, trigger: str, out: list[p.DecisionRecord]
    ) -> bool:
        """Offload an agent's idle KV for the rest of its tool call if that pays, and plan
        the upload to land by the low quantile of the return time. True when offloaded."""
        pred = agent.prediction
        assert pred is not None
        z, back_by = self._back_by(agent)
        planned = self._consider_offload(agent, back_by - self.now, trigger, out, z)
        if planned:
            upload_at = self._plan_upload(agent, back_by)
            terms = out[-1].reason.terms  # the Offload just decided: say when it comes back
            terms["upload_at_s"] = upload_at
            terms["upload_slack_s"] = pred.median_s - pred.quantile_s(z)
        elif out and out[-1].reason.rule == "keep:no_pressure":
            self._kept_idle[agent.key] = (agent, agent.tool_token)
        return planned

    def _back_by(self, agent: AgentState) -> tuple[float, float]:
        """``(z, time)``: the low quantile of the tool call's return that an offloaded
        agent's KV must be back on the GPU by (past it: what is left, given it ran this
        long)."""
        pred = agent.prediction
        assert pred is not None
        z = Z_Q10 if agent.critical else Z_Q20
        back_by = agent.tool_start + pred.quantile_s(z)
        if back_by <= self.now:
            back_by = self.now + pred.remaining_quantile_s(self.now - agent.tool_start, z)
        return z, back_by

    def _plan_upload(self, agent: AgentState, back_by: float) -> float:
        """Set the predictive upload's timer: ``back_by`` less the time to bring the KV back
        (from L2 to the arena for the blocks that left it, then to the GPU, behind the
        uploads already issued). Returns when it starts."""
        blocks = agent.offloading + agent.host_blocks
        lead = upload_lead_s(self.cost, blocks, agent.l2_blocks, self.config.upload_piece_blocks)
        lead += self._h2d_queue_s(back_by - lead - self.now)
        upload_at = max(back_by - lead, self.now)
        self._push_timer(upload_at, T_UPLOAD, agent, agent.tool_token)
        return upload_at

    def _on_kv_in_l2(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        """Offloaded KV left the arena for L2 during the tool call: the upload starts
        earlier by the L2 fetch (the later timer then finds the upload under way)."""
        if (
            self.temporal
            and agent.phase == TOOL
            and agent.call_offloaded > 0
            and agent.upload_left == 0
            and agent.uploading == 0
        ):
            self._plan_upload(agent, self._back_by(agent)[1])

    def _h2d_queue_s(self, start_in_s: float) -> float:
        """How long an upload starting in ``start_in_s`` would wait behind the uploads
        already issued (copy queueing, which a bandwidth figure misses): the link's time
        for them, less what drains before the upload starts."""
        n = self.h2d_in_flight
        busy = self.cost.seconds("h2d", n, -(-n // self.config.upload_piece_blocks))
        return max(0.0, busy - max(start_in_s, 0.0))

    def _reexamine_kept(self, out: list[p.DecisionRecord]) -> None:
        """Waiting demand or pressure appeared: the KV kept for want of it is examined again,
        once, with what is left of each stall (the tool-start rule, not a new one)."""
        if not self._pressure():
            return
        kept, self._kept_idle = self._kept_idle, {}
        for agent, token in kept.values():
            if agent.phase != TOOL or agent.tool_token != token or agent.offloading:
                continue
            # An offload ends a pin (the copy takes the blocks over); kept, it stands.
            self._offload_for_call(agent, "waiting_demand", out)

    def _consider_offload(
        self, agent: AgentState, stall_s: float, trigger: str, out: list[p.DecisionRecord], z: float
    ) -> bool:
        """Offload the agent's idle GPU KV if it pays; otherwise record why not."""
        cfg = self.config
        if agent.offloading and not agent.offload_moves:
            return False  # a write-through copy is in flight; the next examination decides
        blocks = agent.gpu_blocks - agent.offloading
        if blocks <= 0:
            return False
        pieces = -(-blocks // cfg.upload_piece_blocks)
        t_out = self.cost.seconds("d2h", blocks, 1)
        t_back = self.cost.seconds("h2d", blocks, pieces)
        t_queue = self._h2d_queue_s(stall_s - t_back)
        margin = stall_s - (t_out + t_back + t_queue)
        terms: dict[str, p.Term] = {
            "trigger": trigger,
            "blocks": blocks,
            "stall_quantile_s": stall_s,
            "quantile_z": z,
            "t_d2h_s": t_out,
            "t_h2d_s": t_back,
            "h2d_queue_s": t_queue,
            "margin_s": margin,
            "min_margin_s": cfg.min_margin_s,
            "d2h_gbps": self.cost.bandwidth("d2h") / 1e9,
            "h2d_gbps": self.cost.bandwidth("h2d") / 1e9,
            "on_critical_path": agent.critical,
            **(agent.prediction.terms() if agent.prediction is not None else {}),
            **self.pressure_terms(),
        }
        if margin < cfg.min_margin_s:
            rule = "keep:margin_below_min"
        elif not self._pressure():
            rule = "keep:no_pressure"
        elif self.host_free() < blocks:
            rule = "keep:host_full"
        else:
            self._offload(agent, blocks, True, "offload:stall_exceeds_round_trip", terms, out)
            return True
        self._keep(agent, rule, terms, out)
        return False

    def _on_timer(self, kind: int, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        if agent.phase != TOOL:
            return
        pred = agent.prediction
        if kind == T_UPLOAD:
            if agent.host_blocks + agent.offloading > 0 and agent.upload_left == 0:
                terms: dict[str, p.Term] = {
                    "elapsed_s": round(self.now - agent.tool_start, 6),
                    "predicted_median_s": round(pred.median_s, 6) if pred else None,
                    "l2_blocks": agent.l2_blocks,
                }
                blocks = agent.host_blocks + agent.offloading - agent.uploading
                self._start_upload(agent, blocks, p.PREDICTIVE, "predictive_upload", terms, out)
        elif kind == T_LATE:
            elapsed = self.now - agent.tool_start
            if agent.upload_left > 0 and agent.upload_priority != p.URGENT:
                kept = self._cancel_upload(agent)
                self._keep(
                    agent,
                    "keep:late_return_stays_on_host",
                    {"elapsed_s": round(elapsed, 6), "kept_on_host_blocks": kept},
                    out,
                )
            if agent.gpu_blocks > 0 and agent.offloading == 0 and not self._likely_unread(agent):
                self._consider_offload(agent, elapsed, "overrun", out, 0.0)

    def _on_tool_end(self, agent: AgentState, actual_s: float, out: list[p.DecisionRecord]) -> None:
        self._kept_idle.pop(agent.key, None)
        pending = agent.host_blocks + agent.offloading
        if pending <= 0:
            return
        pred = agent.prediction
        early = pred is not None and actual_s < pred.quantile_s(Z_Q10 if agent.critical else Z_Q20)
        self._reload_missing(
            agent, p.URGENT, "urgent_upload:early_return" if early else "urgent_upload:return", out
        )
        agent.upload_reason["actual_s"] = round(actual_s, 6)
        if pred is not None:
            agent.upload_reason["predicted_median_s"] = round(pred.median_s, 6)

    def _on_deadline(self, agent: AgentState, out: list[p.DecisionRecord]) -> None:
        if agent.gpu_blocks <= 0:
            return
        terms: dict[str, p.Term] = {"deadline_s": round(agent.deadline_s, 6)}
        if self.temporal and self.host_free() >= agent.gpu_blocks and agent.offloading == 0:
            self._offload(agent, agent.gpu_blocks, True, "offload:safety_deadline", terms, out)
        else:
            self._drop(agent, "gpu", agent.gpu_blocks, "drop:safety_deadline", terms, out)

    # ------------------------------------------------------------------ spatial

    def priority(self, agent: AgentState, now: float) -> tuple[float, dict[str, p.Term]]:
        if not self.spatial:
            return super().priority(agent, now)
        node = agent.node
        app = agent.app
        length = app.info.critical_length_s
        crit = 1.0 - node.slack_s / length if length > 0 else 1.0
        remaining = node.tail_s / length if length > 0 else 0.0
        max_out = app.info.max_fan_out
        fanout = math.log1p(node.fan_out) / math.log1p(max_out) if max_out > 0 else 0.0
        join = 0.0
        if node.join_group:
            size = app.info.join_sizes.get(node.join_group, 1)
            done = app.join_done.get(node.join_group, 0)
            mine = 1 if agent.llm_calls > 0 else 0
            join = (done - mine) / max(size - 1, 1) if size > 1 else 0.0
        wait_s = now - agent.wait_since if agent.phase == WAITING else 0.0
        wait = math.log1p(max(wait_s, 0.0) / max(node.expected_llm_s, 1e-3))
        preempt = math.log1p(agent.preemptions)
        n_nodes = len(app.info.nodes)
        progress = app.done_nodes / n_nodes if n_nodes else 0.0
        terms: dict[str, p.Term] = {
            "crit": round(crit, 4),
            "remaining": round(remaining, 4),
            "fanout": round(fanout, 4),
            "join": round(join, 4),
            "wait": round(wait, 4),
            "preempt": round(preempt, 4),
            "progress": round(min(progress, 1.0), 4),
        }
        total = crit + remaining + fanout + join + wait + preempt + min(progress, 1.0)
        score = node.importance * (1.0 + total)
        terms["importance"] = node.importance
        return score, terms

    def app_lead_s(self, app: AppState) -> float:
        return guard.app_lead_s(app.info.critical_length_s) if self.spatial else 0.0

    def app_rank(self, agent: AgentState) -> tuple[float, str]:
        """Order of applications: registration order (program-level FCFS), each app
        advanced by half its expected critical path (the tail guard, ``guard.app_lead_s``).

        Under memory contention, interleaving applications multiplies the working set that
        must be resident at once (every app keeps its context warm), so every app's KV is
        evicted and recomputed and every app finishes near the end. Serving the oldest app's
        ready nodes first bounds the working set to the apps in progress and is what
        minimises mean app latency among equal-sized jobs. The lead lets a long app that
        arrived just after shorter ones start first, so its sequential remainder is not
        what is left running alone at the end (the p95); it is bounded (half the app's
        critical length), so an app never overtakes one older than that and nobody is
        starved. Within an application, the node priority decides.
        """
        app = agent.app
        return app.registered_s - self.app_lead_s(app), app.app_id

    def admission_order(
        self, waiting: Sequence[WaitingRequest], now: float
    ) -> list[WaitingRequest]:
        if not self.spatial:
            return super().admission_order(waiting, now)
        keyed = []
        for w in waiting:
            agent = self._agent(w.app_id, w.agent_id, create=False)
            if agent is not None:
                rank = self.app_rank(agent)
                score = self.priority(agent, now)[0]
            elif w.app_id in self.apps:
                rank, score = (w.arrival_s, w.app_id), 1.0
            else:
                # Plain traffic (an application the policy never heard of): ranked as an app
                # registered PLAIN_HEAD_START_S before the request arrived.
                rank, score = (guard.plain_rank(w.arrival_s), w.app_id), 1.0
            keyed.append((rank, -score, w.arrival_s, w.request_id, w))
        keyed.sort(key=lambda k: (k[0], k[1], k[2], k[3]))
        return [k[4] for k in keyed]

    def next_use_s(self, agent: AgentState | None, now: float) -> float:
        """Expected seconds until this agent's KV is read again (for eviction)."""
        if agent is None or agent.phase == DONE or agent.app.ended:
            return NEVER
        if agent.phase == TOOL:
            predicted = agent.predicted_s or 0.0
            remaining = agent.tool_start + predicted - now
            if remaining <= 0:  # overrun: the elapsed time is the best guess of what is left
                remaining = now - agent.tool_start
            return remaining
        if agent.phase == IDLE:
            return self._consumer_gap_s(agent)
        return 0.0

    def _consumer_gap_s(self, agent: AgentState) -> float:
        """Seconds until an idle agent's KV is read by its consumers, the DAG successors.

        Contexts are append-only along edges: a successor's prompt starts with this
        agent's prompt and output, so the successor is who reads this KV next (after a
        tool call too). A successor already waiting reads it now; once every successor has
        run, what is left under this agent's name is read by nobody.
        """
        node = agent.node
        if not node.succ:
            return NEVER
        app = agent.app
        pending = False
        for j in node.succ:
            succ = app.agents.get(app.info.nodes[j].node_id)
            if succ is None or succ.llm_calls == 0:
                if succ is not None and succ.phase in (WAITING, RUNNING):
                    return 0.0
                pending = True
        return node.next_gap_s if pending else NEVER

    def eviction_order(self, candidates: Sequence[CachedKv], now: float) -> list[CachedKv]:
        if not self.spatial:
            return super().eviction_order(candidates, now)
        keyed = []
        for c in candidates:
            agent = self._agent(c.app_id, c.agent_id, create=False)
            if agent is not None and agent.pinned_until > now:
                continue
            nxt = self.next_use_s(agent, now)
            if agent is None or nxt >= NEVER:
                keyed.append((0, 0.0, 0.0, c.last_used_s, c))  # read by nobody: first
                continue
            # Admission serves apps in rank order, so a later-ranked app's KV is read later.
            reg = self.app_rank(agent)[0]
            score = self.priority(agent, now)[0]
            keyed.append((1, -reg, -nxt / max(score, 1e-9), c.last_used_s, c))
        keyed.sort(key=lambda k: k[:4])
        return [k[4] for k in keyed]

    def protected_blocks(self, agent: AgentState) -> int:
        if not self.spatial:
            return 0
        return guard.protected_blocks(
            critical=agent.critical,
            phase=agent.phase,
            wait_blocks=agent.wait_blocks,
            gpu_blocks=agent.gpu_blocks,
            returning_blocks=agent.upload_left,
            pinned=agent.pinned_until > self.now,
        )

    def allocation_verdict(
        self, app_id: str, agent_id: str, n_blocks: int, now: float
    ) -> tuple[bool, p.DecisionReason]:
        """``may_allocate`` with its reason (for logs and ``tokencake-ctl``): the shared
        critical-inversion guard (``guard``), which vLLM's ``TokenCakeScheduler`` applies
        with the same figures."""
        if not self.spatial or self.gpu_total <= 0:
            return True, p.DecisionReason("allow:unconstrained", {})
        agent = self._agent(app_id, agent_id, create=False)
        if agent is not None and agent.critical:
            return True, p.DecisionReason("allow:critical", {})
        # Only critical agents that rank ahead of this one (an app ranked ahead, or its own
        # app) are protected: memory kept for a critical agent of an app ranked later would
        # idle while the app the admission order serves first waits for it. A request
        # of an unknown agent of a known app ranks behind every application; a plain
        # request (unknown app) as an app registered PLAIN_HEAD_START_S before now (its
        # arrival is not asked here; vLLM's TokenCakeScheduler uses its clock the same way).
        if agent is not None:
            rank = self.app_rank(agent)
        elif app_id in self.apps:
            rank = (math.inf, app_id)
        else:
            rank = (guard.plain_rank(now), app_id)
        ahead = (
            self.protected_blocks(other)
            for other in self.guarded.values()
            if other is not agent and self.app_rank(other) <= rank
        )
        cap = guard.protect_cap(self.gpu_total, self.config.max_reserve_fraction)
        protect = guard.total_protected(ahead, cap)
        v = guard.verdict(critical=False, need=n_blocks, free=self.gpu_free, protect=protect)
        terms: dict[str, p.Term] = {
            "n_blocks": n_blocks,
            "gpu_free": self.gpu_free,
            "protected_for_critical": protect,
            "protect_cap": cap,
        }
        return v.allowed, p.DecisionReason(v.rule, terms)

    def may_allocate(self, app_id: str, agent_id: str, n_blocks: int, now: float) -> bool:
        return self.allocation_verdict(app_id, agent_id, n_blocks, now)[0]

    def _on_engine_state(self, out: list[p.DecisionRecord]) -> None:
        if self.temporal:
            self._write_through_finished(out)
        if self.temporal and self._kept_idle:
            self._reexamine_kept(out)
        if not self.spatial or self.gpu_total <= 0:
            return
        if self.now - self._last_partition_s < self.config.partition_interval_s:
            return
        self._last_partition_s = self.now
        self._repartition(out)

    def _repartition(self, out: list[p.DecisionRecord]) -> None:
        """Per-class reservations from critical demand; O(number of classes)."""
        demand: dict[str, int] = {}
        for c, used in self.class_crit_usage.items():
            if used > 0:
                demand[c] = used
        for c, waiting in self.crit_waiting_blocks_by_class.items():
            demand[c] = demand.get(c, 0) + waiting
        ema = self._reserve_ema
        for c in list(ema):
            if c not in demand:
                ema[c] *= 1.0 - PARTITION_SMOOTHING
                if ema[c] < 1.0:
                    del ema[c]
        for c, blocks in demand.items():
            ema[c] = ema.get(c, float(blocks)) + PARTITION_SMOOTHING * (blocks - ema.get(c, blocks))
        cap = int(self.config.max_reserve_fraction * self.gpu_total)
        want = sum(ema.values())
        scale = min(1.0, cap / want) if want > 0 else 0.0
        new = {c: int(v * scale) for c, v in sorted(ema.items()) if int(v * scale) > 0}
        step = self.config.upload_piece_blocks
        changed = new.keys() != self.reservations.keys() or any(
            abs(new[c] - self.reservations[c]) >= step for c in new
        )
        if not changed:
            return
        self.reservations = new
        reserved = sum(new.values())
        terms: dict[str, p.Term] = {
            "cap_blocks": cap,
            "critical_demand_blocks": want,
            "scale": round(scale, 4),
            "gpu_total": self.gpu_total,
        }
        out.append(
            p.PartitionDecision(
                at_s=self.now,
                blocks=reserved,
                reservations=dict(new),
                shared_blocks=self.gpu_total - reserved,
                reason=p.DecisionReason("partition:critical_demand", terms),
            )
        )


class TokenCakeTemporalPolicy(TokenCakePolicy):
    """Ablation: offload and predictive upload only."""

    name = "tokencake-temporal"
    spatial = False
    ranks_running = False


class TokenCakeSpatialPolicy(TokenCakePolicy):
    """Ablation: priority, partition and inversion guard only; KV never leaves the GPU."""

    name = "tokencake-spatial"
    temporal = False
    write_through = False
