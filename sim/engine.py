"""A discrete-event model of a continuous-batching engine with paged KV, driven by a policy.

The engine plays the role vLLM (plus the TokenCake connector) plays in production: it runs
requests and reports what happened as scheduler events; the *real* policy object from
``tokencake.daemon.scheduler`` answers with decisions and per-step queries, through exactly
the calls the daemon makes (``on_event``, ``tick``, ``admission_order``, ``may_allocate``,
``eviction_order``). Nothing here decides what a policy should do.

Per step (vLLM v1's scheduler, simplified): running requests first (prefill chunks, then one
decode token each; a decode that finds no free block preempts the last running request by
recompute: the most recently admitted, or, for a policy with ``ranks_running``, the lowest in
its admission order, as TokenCakeScheduler does in vLLM), then waiting requests in the
policy's admission order under the token budget. A request's prompt is matched block by
block against the GPU prefix cache, in-flight uploads and the host store; host hits are
loaded over the host link before prefill starts.
A request that cannot get memory blocks the queue behind it (vLLM's head-of-line rule); one
the policy refuses (``may_allocate``) is skipped.

Time: one step lasts ``Profile.step_s`` of its batch. Tool ends, arrivals, transfer
completions and policy ticks happen between steps at their own times; the policy sees a
non-decreasing clock.
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from collections.abc import Sequence
from typing import Any

from tokencake.daemon.scheduler import (
    CachedKv,
    EngineState,
    KvEvicted,
    Policy,
)
from tokencake.daemon.scheduler.events import Event
from tokencake.protocol import (
    DecisionRecord,
    DropDecision,
    LlmCallFinish,
    OffloadDecision,
    PinDecision,
    UnpinDecision,
    UploadDecision,
)
from tokencake.sim import admission, apps, transfers
from tokencake.sim.calltrace import CallTrace
from tokencake.sim.kvpool import AgentKv, GpuPool, SimHostStore
from tokencake.sim.profiles import Profile
from tokencake.sim.records import (
    ARRIVAL,
    TOOL_END,
    TRANSFER_DONE,
    UPLOAD_DUE,
    CopyObserver,
    Counters,
    EngineResult,
    HostLink,
    KeyCache,
    Request,
    SimulationError,
    SimulationStalled,
    Transfer,
)
from tokencake.sim.workload import Trace

__all__ = [
    "CopyObserver",
    "Counters",
    "EngineResult",
    "KeyCache",
    "SimulationError",
    "SimulationStalled",
    "Simulator",
]

logger = logging.getLogger(__name__)


class Simulator:
    """Replays one trace against one policy. Construct, then ``run()`` once.

    ``stall_s``: idle time with requests waiting and nothing scheduled, after which the run
    gives up. ``lru_eviction``: evict least recently used first, as vLLM does, instead of
    asking the policy's ``eviction_order`` (pins are still honoured, as the connector's
    references are). ``call_trace``: a per-call record of the run (``bench/bench_engine.py
    --sim-from`` diffs it). ``vllm_rules``: two rules of vLLM v1's scheduler the default
    model leaves out (the engine replay, ``bench/bench_engine.py --sim-from``, turns them
    on): a block is a prefix-cache hit from the step that schedules its tokens on (vLLM
    hashes a block when it allocates it, so a sibling admitted in the same step shares it),
    and a step that preempted a request admits no waiting one. ``pin_yield``: pins give way
    to a request the policy admits and the free blocks cannot hold, as
    ``TokenCakeScheduler`` has them do (``admission.yield_pins``; counted in
    ``pins_yielded``).

    ``pins``: the live pins the policy decided, agent -> until (simulated time).
    """

    def __init__(
        self,
        trace: Trace,
        policy: Policy,
        profile: Profile,
        *,
        unbounded_gpu: bool = False,
        key_cache: KeyCache | None = None,
        tick_s: float = 0.01,
        check_invariants: bool = False,
        timeline_every_s: float = 0.5,
        stall_s: float = 600.0,
        copies: CopyObserver | None = None,
        lru_eviction: bool = False,
        call_trace: CallTrace | None = None,
        vllm_rules: bool = False,
        pin_yield: bool = False,
    ) -> None:
        self.trace = trace
        self.policy = policy
        self.profile = profile
        self.bt = profile.block_tokens
        self.pool = GpuPool(None if unbounded_gpu else profile.gpu_blocks)
        self.nominal_blocks = profile.gpu_blocks
        self.host = SimHostStore(profile.host_blocks)
        self.link = HostLink(profile)
        self.key_cache: KeyCache = key_cache if key_cache is not None else {}
        self.tick_s = tick_s
        self.check_invariants = check_invariants
        self.timeline_every_s = timeline_every_s
        self.stall_s = stall_s
        self.copies = copies
        self.now = 0.0
        self.heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.pending_events: deque[tuple[float, Event]] = deque()
        self.plain_apps: set[str] = {a.app_id for a in trace.apps if a.plain}
        self.lru_eviction = lru_eviction
        self.call_trace = call_trace
        self.vllm_rules = vllm_rules
        self.pin_yield = pin_yield
        self.pins_yielded = 0
        self.pins: dict[tuple[str, str], float] = {}
        self.agents: dict[tuple[str, str], AgentKv] = {}
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.loading: set[Request] = set()
        self.by_rid: dict[str, Request] = {}
        self.pending_keys: dict[int, tuple[int, Transfer]] = {}
        self.ever_computed: set[int] = set()
        self.apps_in_flight = 0
        self.c = Counters()
        self.results_latency: list[float] = []
        self.results_critical: list[float] = []
        self.results_queue: list[float] = []
        self.results_plain: list[bool] = []
        self.util_integral = 0.0
        self.timeline: list[tuple[float, float]] = []
        self._last_sample = -1e9
        self.peak_used = 0
        self._rid = 0
        self.pending_epoch = 0
        self._next_tick = 0.0

    # ------------------------------------------------------------------ plumbing

    def _next_seq(self) -> int:
        """One counter orders timed events and copies alike (ties break by it)."""
        self._seq += 1
        return self._seq

    def _push(self, t: float, kind: int, payload: Any) -> None:
        heapq.heappush(self.heap, (t, self._next_seq(), kind, payload))

    def _emit(self, ev: Event) -> None:
        if self.plain_apps and getattr(ev, "app_id", None) in self.plain_apps:
            return  # plain traffic carries no agent metadata: the daemon never hears of it
        self.pending_events.append((self.now, ev))

    def _flush(self) -> None:
        """Deliver queued events in order and carry out the decisions they cause."""
        while self.pending_events:
            at, ev = self.pending_events.popleft()
            self.c.policy_events += 1
            self._apply(self.policy.on_event(ev, at))

    def _apply(self, decisions: list[DecisionRecord]) -> None:
        for d in decisions:
            self.c.decisions[d.kind] = self.c.decisions.get(d.kind, 0) + 1
            agent = self.agents.get((d.app_id, d.agent_id))
            if isinstance(d, OffloadDecision):
                self.pins.pop((d.app_id, d.agent_id), None)  # an offload ends a pin
                if agent is None:
                    self.c.unknown_agent_decisions += 1
                else:
                    transfers.offload(self, agent, d.blocks, d.free_gpu)
            elif isinstance(d, UploadDecision):
                if agent is None:
                    self.c.unknown_agent_decisions += 1
                elif d.start_in_s > 0:
                    self._push(d.at_s + d.start_in_s, UPLOAD_DUE, (agent, d.blocks, d.priority))
                else:
                    transfers.upload(self, agent, d.blocks, d.priority)
            elif isinstance(d, DropDecision):
                if agent is None:
                    self.c.unknown_agent_decisions += 1
                elif d.where == "host":
                    dropped = self.host.drop_agent(agent.seq_keys, d.blocks)
                    self.c.host_dropped_blocks += dropped
                else:
                    self.pool.discard(agent, d.blocks)
            elif isinstance(d, PinDecision):
                if agent is not None:
                    self.pins[(d.app_id, d.agent_id)] = d.at_s + d.ttl_s
            elif isinstance(d, UnpinDecision):
                self.pins.pop((d.app_id, d.agent_id), None)
            # Pins act through eviction_order and the free count; partitions and keeps
            # change nothing the engine owns.

    def _agent(self, app_id: str, agent_id: str) -> AgentKv:
        key = (app_id, agent_id)
        a = self.agents.get(key)
        if a is None:
            a = AgentKv(app_id, agent_id)
            self.agents[key] = a
        return a

    def _victims(self) -> list[AgentKv]:
        cands = [
            CachedKv(a.app_id, a.agent_id, len(a.cached), a.last_used_s)
            for a in self.pool.agents_with_cache
        ]
        if self.lru_eviction:
            order = self.lru_order(cands)
        else:
            order = self.policy.eviction_order(cands, self.now)
        out = []
        for c in order:
            a = self.agents.get((c.app_id, c.agent_id))
            if a is not None and a.cached:
                out.append(a)
        return out

    def _allocate(self, n: int) -> list[int] | None:
        res = self.pool.allocate(n, self._victims)
        if res is None:
            return None
        blocks, evicted = res
        for a, k in evicted.items():
            self.c.gpu_evicted_blocks += k
            self._emit(KvEvicted(a.app_id, a.agent_id, k, "gpu"))
        return blocks

    # ------------------------------------------------------------------ admission

    # ------------------------------------------------------------------ stepping

    def _schedule_step(self) -> list[tuple[Request, int]]:
        budget = self.profile.max_batched_tokens
        batch: list[tuple[Request, int]] = []
        if self.policy.ranks_running and len(self.running) > 1:
            # As TokenCakeScheduler does in vLLM: running requests in the admission order,
            # so that a preemption (of the last one) takes the lowest-ranked request.
            by_view = {id(r.view): r for r in self.running}
            ranked = self.policy.admission_order([r.view for r in self.running], self.now)
            self.running = [by_view[id(v)] for v in ranked]
        i = 0
        preempted = False
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            chunk = min(req.target - req.computed, budget)
            need_blocks = -(-(req.computed + chunk) // self.bt)
            preempted_self = False
            while need_blocks > len(req.blocks):
                got = self._allocate(need_blocks - len(req.blocks))
                if got is not None:
                    req.blocks.extend(got)
                    break
                victim = self.running[-1]
                admission.preempt(self, victim)
                preempted = True
                if victim is req:
                    preempted_self = True
                    break
            if preempted_self:
                break
            batch.append((req, chunk))
            if self.vllm_rules:
                admission.register_computed(self, req, req.computed + chunk)
            budget -= chunk
            i += 1
        if preempted and self.vllm_rules:
            return batch
        more, budget = admission.admit(self, budget, len(self.running) + len(self.loading))
        batch.extend(more)
        return batch

    def _step_time(self, batch: list[tuple[Request, int]]) -> float:
        tokens = 0
        pairs = 0.0
        kv = 0.0
        for req, c in batch:
            s = req.computed
            tokens += c
            pairs += c * s + c * (c + 1) / 2
            kv += s + c
        return self.profile.step_s(tokens, pairs, kv)

    def _finish_step(self, batch: list[tuple[Request, int]], dt: float) -> None:
        done: list[Request] = []
        c = self.c
        for req, chunk in batch:
            if req.admitted_s < 0:  # preempted by a later request in the same step
                continue
            if chunk > 1 or req.generated == 0:
                rec = min(chunk, req.recompute_left)
                req.recompute_left -= rec
                c.prefill_tokens += chunk
                c.time_prefill_re_s += dt * rec / chunk
                c.time_prefill_new_s += dt * (chunk - rec) / chunk
            else:
                c.time_decode_s += dt
            req.computed += chunk
            if req.computed >= req.target:
                req.generated += 1
                if req.generated >= req.output_tokens:
                    done.append(req)
            admission.register_computed(self, req)
        for req in done:
            self._finish_request(req)

    def _finish_request(self, req: Request) -> None:
        self.running.remove(req)
        admission.register_computed(self, req)
        agent = req.agent
        agent.seq_keys = req.keys[: req.registered]
        kv_blocks = len(req.blocks)
        for b in req.blocks:
            self.pool.release(b, agent, self.now)
        req.blocks = []
        if self.call_trace is not None:
            self.call_trace.finished(req, self.now)
        spec = req.app.spec
        if req.node.id in req.app.critical:
            req.app.critical_llm_s += self.now - req.ready_s
        self._emit(LlmCallFinish(spec.app_id, req.node.id, req.rid, req.generated, kv_blocks))
        del self.by_rid[req.rid]
        apps.call_finished(self, req)

    # ------------------------------------------------------------------ main loop

    def _handle(self, kind: int, payload: Any) -> None:
        self.c.heap_events += 1
        if kind == ARRIVAL:
            apps.arrive(self, payload)
        elif kind == TOOL_END:
            apps.tool_end(self, payload)
        elif kind == TRANSFER_DONE:
            transfers.transfer_done(self, payload)
        elif kind == UPLOAD_DUE:
            agent, n, prio = payload
            transfers.upload(self, agent, n, prio)

    def _advance_to(self, t_end: float) -> None:
        """Process heap events and policy ticks with time <= t_end, in time order."""
        heap = self.heap
        while True:
            t_ev = heap[0][0] if heap else math.inf
            t_tick = max(self._next_tick, self.now) if self.apps_in_flight else math.inf
            t = min(t_ev, t_tick)
            if t > t_end:
                break
            self._account(t)
            if t_ev <= t_tick:
                _, _, kind, payload = heapq.heappop(heap)
                self._handle(kind, payload)
            else:
                self.c.ticks += 1
                self._apply(self.policy.tick(t))
                self._next_tick = t + self.tick_s
            self._flush()
        self._account(t_end)

    def _account(self, t: float) -> None:
        """Integrate GPU KV utilisation up to ``t`` and advance the clock."""
        if t < self.now:
            return
        used = self.pool.used
        self.util_integral += used * (t - self.now)
        if used > self.peak_used:
            self.peak_used = used
        self.now = t
        if t - self._last_sample >= self.timeline_every_s:
            self._last_sample = t
            self.timeline.append((t, used / self.nominal_blocks))

    def lru_order(self, candidates: Sequence[CachedKv]) -> list[CachedKv]:
        """vLLM's eviction order: least recently used first, pinned agents held."""
        now, pins = self.now, self.pins
        live = [c for c in candidates if pins.get((c.app_id, c.agent_id), -1.0) <= now]
        return sorted(live, key=lambda c: c.last_used_s)

    def free_blocks(self) -> int:
        """Free blocks as vLLM counts them: empty and idle cached ones, pinned ones not."""
        return self.pool.free + self.pool.n_cached - self._pinned_cached()

    def _pinned_cached(self) -> int:
        """Idle cached blocks under a live pin: held, so not free (as in vLLM, where the
        connector holds a pinned agent's blocks)."""
        if not self.pins:
            return 0
        held = 0
        for key, until in list(self.pins.items()):
            if until <= self.now:
                del self.pins[key]
                continue
            a = self.agents.get(key)
            if a is not None:
                held += len(a.cached)
        return held

    def _engine_state(self) -> None:
        waiting_blocks = sum(r.view.blocks for r in self.waiting)
        self._emit(
            EngineState(
                self.nominal_blocks if not self.pool.unbounded else self.pool.total + 1,
                # vLLM's figure: free blocks plus idle cached ones (a new request may take them)
                self.free_blocks() if not self.pool.unbounded else self.pool.total + 1,
                len(self.waiting),
                len(self.running) + len(self.loading),
                waiting_blocks,
                self.host.capacity,
                self.host.free,
            )
        )

    def run(self) -> EngineResult:
        for app in self.trace.apps:
            self._push(app.arrival_s, ARRIVAL, app)
        self._next_tick = 0.0
        first = self.trace.apps[0].arrival_s if self.trace.apps else 0.0
        self.now = first
        self.util_integral = 0.0
        stalled_since = -1.0
        while True:
            if self._step():
                continue
            if not self.heap and not self.loading and self.waiting:
                # Only policy ticks can still change anything (a pin running out, say).
                if stalled_since < 0:
                    stalled_since = self.now
                elif self.now - stalled_since > self.stall_s:
                    break
            else:
                stalled_since = -1.0
            if not self._advance_idle():
                break
        if self.waiting or self.running or self.loading or self.apps_in_flight:
            raise SimulationStalled(
                f"{len(self.waiting)} waiting, {len(self.running)} running, "
                f"{len(self.loading)} loading, {self.apps_in_flight} apps unfinished at "
                f"t={self.now:.3f}s; nothing else is scheduled"
            )
        return self._result(first)

    def _step(self) -> bool:
        """Catch up with due events, then run one engine step if anything can run."""
        self._advance_to(self.now)
        self._engine_state()
        self._flush()
        batch = self._schedule_step()
        self._flush()
        if not batch:
            return False
        dt = self._step_time(batch)
        self.c.steps += 1
        self._advance_to(self.now + dt)
        self._finish_step(batch, dt)
        self._flush()
        if self.check_invariants:
            self._check(full=self.c.steps % 25 == 0)
        return True

    def _advance_idle(self) -> bool:
        """Nothing ran: move the clock to the next event or tick; False when none is due."""
        if not (self.heap or (self.apps_in_flight and (self.waiting or self.loading))):
            return False
        t_next = self.heap[0][0] if self.heap else math.inf
        if self.apps_in_flight:
            t_next = min(t_next, max(self._next_tick, self.now))
        if t_next == math.inf:
            return False
        self._advance_to(max(t_next, self.now))
        return True

    def _result(self, first: float) -> EngineResult:
        window = max(self.now - first, 1e-9)
        self.c.offload_unread_blocks = self.host.dropped_unread + len(self.host.unread)
        return EngineResult(
            app_latency_s=self.results_latency,
            critical_llm_s=self.results_critical,
            app_queue_s=self.results_queue,
            makespan_s=window,
            app_plain=self.results_plain,
            util_integral=self.util_integral,
            util_window_s=window,
            timeline=self.timeline,
            counters=self.c,
            gpu_blocks=self.nominal_blocks,
            peak_used_blocks=self.peak_used,
            block_bytes=self.profile.block_bytes,
        )

    def _check(self, full: bool) -> None:
        """Budget checks every step; the full recount of the pool every ``full`` step."""
        if full:
            self.pool.check()
        if not self.pool.unbounded and self.pool.used > self.pool.total:
            raise AssertionError("more blocks in use than the pool holds")
        if len(self.host.lru) + len(self.host.writing) > self.host.capacity:
            raise AssertionError("host store over capacity")
