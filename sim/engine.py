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
from dataclasses import dataclass, field
from typing import Any, Protocol

from tokencake.daemon.scheduler import (
    AppEnd,
    AppRegistered,
    CachedKv,
    EngineState,
    KvEvicted,
    LlmCallAdmitted,
    LlmCallFinish,
    LlmCallPreempted,
    LlmCallStart,
    Policy,
    ToolCallEnd,
    ToolCallStart,
    TransferDone,
    TransferMeasured,
    WaitingRequest,
)
from tokencake.daemon.scheduler.events import Event
from tokencake.protocol import (
    AppDag,
    DagNode,
    DecisionRecord,
    DropDecision,
    OffloadDecision,
    PinDecision,
    UnpinDecision,
    UploadDecision,
)
from tokencake.sim.kvpool import CACHED, GHOST, LOCKED, AgentKv, GpuPool, HostStore, chain_keys
from tokencake.sim.profiles import Profile
from tokencake.sim.workload import AppSpec, NodeSpec, Trace, prompt_tokens

logger = logging.getLogger(__name__)

KeyCache = dict[tuple[str, str], tuple[list[int], int]]


class SimulationError(RuntimeError):
    """The simulation could not finish (see ``SimulationStalled``)."""


class SimulationStalled(SimulationError):
    """Requests wait, nothing runs and nothing is scheduled to happen: a deadlock."""


@dataclass(slots=True, eq=False)
class AppRun:
    spec: AppSpec
    pending_preds: dict[str, int]
    successors: dict[str, list[str]]
    critical: set[str]
    nodes_left: int
    finish_s: float = -1.0
    critical_llm_s: float = 0.0
    queue_s: float = 0.0


@dataclass(slots=True, eq=False)
class Request:
    rid: str
    app: AppRun
    node: NodeSpec
    agent: AgentKv
    keys: list[int]
    prompt_tokens: int
    output_tokens: int
    view: WaitingRequest
    ready_s: float
    enqueued_s: float
    generated: int = 0
    computed: int = 0
    blocks: list[int] = field(default_factory=list)
    registered: int = 0
    waiting_on: int = 0
    recompute_left: int = 0
    admitted_s: float = -1.0
    walk_sig: tuple[int, ...] = ()
    walk: tuple[int, list[int], list[tuple[int, Transfer]], list[int]] | None = None

    @property
    def target(self) -> int:
        return self.prompt_tokens + self.generated


@dataclass(slots=True, eq=False)
class Transfer:
    direction: str
    kind: str  # "offload" | "upload" | "load"
    agent: AgentKv
    blocks: list[int]
    keys: list[int]
    nbytes: int
    priority: int
    free_gpu: bool = False
    waiters: list[Request] = field(default_factory=list)
    submit_s: float = 0.0
    start_s: float = 0.0
    seq: int = 0


@dataclass(slots=True)
class Counters:
    steps: int = 0
    heap_events: int = 0
    policy_events: int = 0
    ticks: int = 0
    prefill_tokens: int = 0
    recompute_tokens: int = 0
    gpu_hit_tokens: int = 0
    host_hit_tokens: int = 0
    preemptions: int = 0
    offload_bytes: int = 0
    upload_bytes: int = 0
    offload_blocks: int = 0
    upload_blocks: int = 0
    host_evicted_blocks: int = 0
    host_dropped_blocks: int = 0
    offload_unread_blocks: int = 0
    """Blocks an offload wrote to the host that nothing read (load or upload) before they
    left the host or the run ended: copies that were pure cost."""
    gpu_evicted_blocks: int = 0
    failed_uploads: int = 0
    unknown_agent_decisions: int = 0
    decisions: dict[str, int] = field(default_factory=dict)
    time_queue_s: float = 0.0
    time_load_s: float = 0.0
    time_prefill_new_s: float = 0.0
    time_prefill_re_s: float = 0.0
    time_decode_s: float = 0.0


@dataclass(slots=True)
class EngineResult:
    """Raw outcome of one run; ``metrics.summarise`` turns it into the reported record."""

    app_latency_s: list[float]
    critical_llm_s: list[float]
    app_queue_s: list[float]
    makespan_s: float
    app_plain: list[bool]
    """Per finished app (same order as ``app_latency_s``): plain traffic or an agent app."""
    util_integral: float
    util_window_s: float
    timeline: list[tuple[float, float]]
    counters: Counters
    gpu_blocks: int
    peak_used_blocks: int
    block_bytes: int


class CopyObserver(Protocol):
    """Sees every host-link copy as the engine submits and completes it (live mode reports
    them to a real daemon as host-slot ops). ``kind`` is ``offload``, ``upload`` or ``load``;
    ``keys`` are the chain keys of the blocks copied."""

    def copy_submitted(
        self, seq: int, kind: str, app_id: str, agent_id: str, keys: list[int]
    ) -> None: ...

    def copy_done(self, seq: int) -> None: ...


class HostLink:
    """One DMA engine per direction; queued copies start in priority order (contention)."""

    def __init__(self, profile: Profile) -> None:
        self.profile = profile
        self.active: dict[str, Transfer | None] = {"d2h": None, "h2d": None}
        self.queue: dict[str, list[tuple[int, int, Transfer]]] = {"d2h": [], "h2d": []}

    def duration(self, tr: Transfer) -> float:
        return self.profile.transfer_s(tr.nbytes)


class Simulator:
    """Replays one trace against one policy. Construct, then ``run()`` once."""

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
    ) -> None:
        self.trace = trace
        self.policy = policy
        self.profile = profile
        self.bt = profile.block_tokens
        self.pool = GpuPool(None if unbounded_gpu else profile.gpu_blocks)
        self.nominal_blocks = profile.gpu_blocks
        self.host = HostStore(profile.host_blocks)
        self.link = HostLink(profile)
        self.key_cache: KeyCache = key_cache if key_cache is not None else {}
        self.tick_s = tick_s
        self.check_invariants = check_invariants
        self.timeline_every_s = timeline_every_s
        self.stall_s = stall_s
        """Idle time with requests waiting and nothing scheduled, after which we give up."""
        self.copies = copies

        self.now = 0.0
        self.heap: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.pending_events: deque[Event] = deque()
        self.plain_apps: set[str] = {a.app_id for a in trace.apps if a.plain}
        self.lru_eviction = lru_eviction
        """Evict least recently used first, as vLLM does, instead of asking the policy's
        ``eviction_order`` (pins are still honoured, as the connector's references are)."""
        self.pins: dict[tuple[str, str], float] = {}
        """Live pins the policy decided: agent -> until (simulated time)."""
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
        self._pending_epoch = 0
        self._next_tick = 0.0

    # ------------------------------------------------------------------ plumbing

    def _push(self, t: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, kind, payload))

    def _emit(self, ev: Event) -> None:
        if self.plain_apps and getattr(ev, "app_id", None) in self.plain_apps:
            return  # plain traffic carries no agent metadata: the daemon never hears of it
        self.pending_events.append(ev)

    def _flush(self) -> None:
        """Deliver queued events in order and carry out the decisions they cause."""
        while self.pending_events:
            ev = self.pending_events.popleft()
            self.c.policy_events += 1
            self._apply(self.policy.on_event(ev))

    def _apply(self, decisions: list[DecisionRecord]) -> None:
        for d in decisions:
            self.c.decisions[d.kind] = self.c.decisions.get(d.kind, 0) + 1
            agent = self.agents.get((d.app_id, d.agent_id))
            if isinstance(d, OffloadDecision):
                self.pins.pop((d.app_id, d.agent_id), None)  # an offload ends a pin
                if agent is None:
                    self.c.unknown_agent_decisions += 1
                else:
                    self._offload(agent, d.blocks, d.free_gpu)
            elif isinstance(d, UploadDecision):
                if agent is None:
                    self.c.unknown_agent_decisions += 1
                elif d.start_in_s > 0:
                    self._push(d.at_s + d.start_in_s, _UPLOAD_DUE, (agent, d.blocks, d.priority))
                else:
                    self._upload(agent, d.blocks, d.priority)
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
            self._emit(KvEvicted(self.now, a.app_id, a.agent_id, k, "gpu"))
        return blocks

    # ------------------------------------------------------------------ applications

    def _arrive(self, spec: AppSpec) -> None:
        succ: dict[str, list[str]] = {n.id: [] for n in spec.nodes}
        for n in spec.nodes:
            for p in n.predecessors:
                succ[p].append(n.id)
        run = AppRun(
            spec=spec,
            pending_preds={n.id: len(n.predecessors) for n in spec.nodes},
            successors=succ,
            critical=_critical_path(spec, self.profile),
            nodes_left=len(spec.nodes),
        )
        self.apps_in_flight += 1
        self._emit(AppRegistered(self.now, spec.app_id, _dag(spec, self.profile)))
        for n in spec.nodes:
            if not n.predecessors:
                self._ready(run, n)

    def _ready(self, run: AppRun, node: NodeSpec) -> None:
        if node.kind == "local":
            self._node_done(run, node)
            return
        spec = run.spec
        ck = (spec.app_id, node.id)
        cached = self.key_cache.get(ck)
        if cached is None:
            prompt = spec.prompts[node.id]
            seq = (*prompt, spec.outputs[node.id])
            cached = (chain_keys(seq, self.bt), prompt_tokens(prompt))
            self.key_cache[ck] = cached
        keys, ptoks = cached
        if not self.pool.unbounded:
            largest = -(-(ptoks + node.output_tokens) // self.bt)
            if largest > self.pool.total:
                raise SimulationError(
                    f"{spec.app_id}/{node.id} needs {largest} blocks; the pool has "
                    f"{self.pool.total}: it can never run"
                )
        self._rid += 1
        rid = f"r{self._rid}"
        agent = self._agent(spec.app_id, node.id)
        need = -(-ptoks // self.bt)
        view = WaitingRequest(rid, spec.app_id, node.id, need, self.now)
        req = Request(
            rid=rid,
            app=run,
            node=node,
            agent=agent,
            keys=keys,
            prompt_tokens=ptoks,
            output_tokens=node.output_tokens,
            view=view,
            ready_s=self.now,
            enqueued_s=self.now,
        )
        self.by_rid[rid] = req
        self.waiting.append(req)
        self._emit(LlmCallStart(self.now, spec.app_id, node.id, rid, ptoks, need))

    def _node_done(self, run: AppRun, node: NodeSpec) -> None:
        run.nodes_left -= 1
        last = run.nodes_left == 0
        for s in run.successors[node.id]:
            run.pending_preds[s] -= 1
            if run.pending_preds[s] == 0:
                self._ready(run, run.spec.node(s))
        if last:
            run.finish_s = self.now
            self.apps_in_flight -= 1
            self.results_latency.append(self.now - run.spec.arrival_s)
            self.results_critical.append(run.critical_llm_s)
            self.results_queue.append(run.queue_s)
            self.results_plain.append(run.spec.plain)
            self._emit(AppEnd(self.now, run.spec.app_id))

    def _tool_end(self, req: Request) -> None:
        spec = req.app.spec
        self._emit(ToolCallEnd(self.now, spec.app_id, req.node.id, req.rid))
        self._node_done(req.app, req.node)

    # ------------------------------------------------------------------ admission

    def _admit(self, budget: int, nseqs: int) -> tuple[list[tuple[Request, int]], int]:
        batch: list[tuple[Request, int]] = []
        if not self.waiting or budget <= 0:
            return batch, budget
        order = self.policy.admission_order([r.view for r in self.waiting], self.now)
        admitted: set[str] = set()
        for view in order:
            if budget <= 0 or nseqs >= self.profile.max_num_seqs:
                break
            req = self.by_rid.get(view.request_id)
            if req is None or (req.admitted_s >= 0 and req.blocks):
                continue
            ok = self._try_admit(req)
            if ok is None:
                continue
            if not ok:
                break
            admitted.add(req.rid)
            nseqs += 1
            if req.waiting_on == 0:
                chunk = min(req.target - req.computed, budget)
                batch.append((req, chunk))
                budget -= chunk
        if admitted:
            self.waiting = [r for r in self.waiting if r.rid not in admitted]
        return batch, budget

    def _try_admit(self, req: Request) -> bool | None:
        """Admit ``req`` if memory allows: True, False (no memory: stop), None (policy says no)."""
        pool = self.pool
        bt = self.bt
        target = req.target
        max_hit = (target - 1) // bt
        by_key = pool.by_key
        # The prefix walk only changes when content is added or removed somewhere; a request
        # that keeps waiting (policy refusal, no memory) reuses its last walk.
        sig = (
            target,
            len(by_key),
            pool.epoch,
            len(self.pending_keys),
            self._pending_epoch,
            len(self.host.lru),
            self.host.epoch,
        )
        if req.walk is not None and req.walk_sig == sig:
            prefix, hits, attach, host_keys = req.walk
        else:
            prefix, hits, attach, host_keys = self._walk(req, max_hit)
            req.walk = (prefix, hits, attach, host_keys)
            req.walk_sig = sig
        return self._admit_with(req, prefix, hits, attach, host_keys)

    def _walk(
        self, req: Request, max_hit: int
    ) -> tuple[int, list[int], list[tuple[int, Transfer]], list[int]]:
        keys = req.keys
        by_key = self.pool.by_key
        hits: list[int] = []
        attach: list[tuple[int, Transfer]] = []
        host_keys: list[int] = []
        limit = min(max_hit, len(keys))
        # Hot path: a run of GPU hits first, then the general walk (GPU, in-flight, host).
        get = by_key.get
        i = 0
        while i < limit:
            b = get(keys[i])
            if b is None:
                break
            hits.append(b)
            i += 1
        pending = self.pending_keys
        host_lru = self.host.lru
        while i < limit:
            k = keys[i]
            b = get(k)
            if b is not None:
                hits.append(b)
            elif k in pending:
                attach.append(pending[k])
            elif k in host_lru:
                host_keys.append(k)
            else:
                break
            i += 1
        return i, hits, attach, host_keys

    def _admit_with(
        self,
        req: Request,
        prefix: int,
        hits: list[int],
        attach: list[tuple[int, Transfer]],
        host_keys: list[int],
    ) -> bool | None:
        pool = self.pool
        bt = self.bt
        target = req.target
        keys = req.keys
        by_key = pool.by_key
        total_blocks = -(-target // bt)
        new_blocks = total_blocks - prefix
        need = len(host_keys) + new_blocks
        if not self.policy.may_allocate(req.view.app_id, req.view.agent_id, need, self.now):
            return None
        if not pool.unbounded and need > pool.free:
            # Upper bound without touching anything: every idle cached block but our own hits.
            where = pool.where
            own = sum(1 for b in hits if where[b] == CACHED)
            if need > pool.free + pool.n_cached - own:
                return False
        # Hold the prefix so that our own allocation cannot evict it, then allocate.
        prev = [(b, pool.where[b], pool.owner[b]) for b in hits]
        for b in hits:
            pool.touch(b)
        got = self._allocate(need)
        if got is None:
            for b, w, o in prev:
                _untouch(pool, b, w, o)
            return False
        # Lay out blocks in position order: the walked prefix, then the new blocks.
        layout: list[int] = []
        hi = ai = gi = 0
        loads_blocks: list[int] = []
        loads_keys: list[int] = []
        for j in range(prefix):
            k = keys[j]
            if hi < len(hits) and by_key.get(k) == hits[hi]:
                layout.append(hits[hi])
                hi += 1
            elif k in self.pending_keys:
                b, tr = self.pending_keys[k]
                pool.touch(b)
                layout.append(b)
                if req not in tr.waiters:
                    tr.waiters.append(req)
                    req.waiting_on += 1
                ai += 1
            else:
                b = got[gi]
                gi += 1
                layout.append(b)
                loads_blocks.append(b)
                loads_keys.append(k)
                self.host.touch(k)
        layout.extend(got[gi:])
        req.blocks = layout
        req.computed = prefix * bt
        req.registered = prefix
        self.c.gpu_hit_tokens += (len(hits) + len(attach)) * bt
        self.c.host_hit_tokens += len(loads_keys) * bt
        rec = 0
        for j in range(prefix, min(len(keys), target // bt)):
            if keys[j] in self.ever_computed:
                rec += 1
        req.recompute_left = rec * bt
        self.c.recompute_tokens += rec * bt
        if loads_keys:
            tr = Transfer(
                "h2d",
                "load",
                req.agent,
                loads_blocks,
                loads_keys,
                len(loads_keys) * self.profile.block_bytes,
                0,
                waiters=[req],
            )
            req.waiting_on += 1
            for b, k in zip(loads_blocks, loads_keys, strict=True):
                self.pool.touch(b)  # the copy holds its own reference, like an upload
                self.pending_keys[k] = (b, tr)
            self._submit(tr)
        wait = self.now - req.enqueued_s
        req.app.queue_s += wait
        self.c.time_queue_s += wait
        req.admitted_s = self.now
        if req.waiting_on:
            self.loading.add(req)
        else:
            self.running.append(req)
        self._emit(
            LlmCallAdmitted(self.now, req.view.app_id, req.view.agent_id, req.rid, len(layout))
        )
        return True

    def _preempt(self, req: Request) -> None:
        self._register_computed(req)
        freed = len(req.blocks)
        for b in req.blocks:
            self.pool.release(b, req.agent, self.now)
        req.blocks = []
        req.computed = 0
        req.registered = 0
        req.admitted_s = -1.0
        req.enqueued_s = self.now
        req.view.blocks = -(-req.target // self.bt)
        self.running.remove(req)
        self.waiting.insert(0, req)
        self.c.preemptions += 1
        self._emit(LlmCallPreempted(self.now, req.view.app_id, req.view.agent_id, req.rid, freed))

    def _register_computed(self, req: Request) -> None:
        full = min(req.computed // self.bt, len(req.keys), len(req.blocks))
        for i in range(req.registered, full):
            k = req.keys[i]
            self.pool.register(req.blocks[i], k)
            self.ever_computed.add(k)
        if full > req.registered:
            req.registered = full

    # ------------------------------------------------------------------ transfers

    def _submit(self, tr: Transfer) -> None:
        tr.submit_s = self.now
        self._seq += 1
        tr.seq = self._seq
        if self.copies is not None:
            a = tr.agent
            self.copies.copy_submitted(tr.seq, tr.kind, a.app_id, a.agent_id, tr.keys)
        d = tr.direction
        if self.link.active[d] is None:
            self._start(tr)
        else:
            heapq.heappush(self.link.queue[d], (tr.priority, tr.seq, tr))

    def _start(self, tr: Transfer) -> None:
        self.link.active[tr.direction] = tr
        tr.start_s = self.now
        self._push(self.now + self.link.duration(tr), _TRANSFER_DONE, tr)

    def _transfer_done(self, tr: Transfer) -> None:
        d = tr.direction
        self.link.active[d] = None
        if self.copies is not None:
            self.copies.copy_done(tr.seq)
        if self.link.queue[d]:
            _, _, nxt = heapq.heappop(self.link.queue[d])
            self._start(nxt)
        n = len(tr.keys)
        self._emit(
            TransferMeasured(self.now, d, tr.nbytes, self.now - tr.start_s, n)  # type: ignore[arg-type]
        )
        a = tr.agent
        if d == "d2h":
            self.c.offload_bytes += tr.nbytes
            self.c.offload_blocks += n
            self.host.commit(tr.keys, a)
            for b in tr.blocks:
                self.pool.unlock(b, a, tr.free_gpu)
            self._emit(TransferDone(self.now, a.app_id, a.agent_id, "d2h", n))
            return
        self.c.upload_bytes += tr.nbytes
        self.c.upload_blocks += n
        for b, k in zip(tr.blocks, tr.keys, strict=True):
            self.pending_keys.pop(k, None)
            self._pending_epoch += 1
            self.pool.register(b, k)
            self.pool.release(b, a, self.now)
        if tr.kind == "upload":
            self._emit(TransferDone(self.now, a.app_id, a.agent_id, "h2d", n))
        for req in tr.waiters:
            req.waiting_on -= 1
            if req.waiting_on == 0 and req in self.loading:
                self.loading.discard(req)
                wait = self.now - req.admitted_s
                self.c.time_load_s += wait
                self.running.append(req)

    def _offload(self, agent: AgentKv, n_blocks: int, free_gpu: bool) -> None:
        pool = self.pool
        on_gpu: list[tuple[int, int]] = []
        for k in agent.seq_keys:
            b = pool.by_key.get(k)
            if b is not None:
                on_gpu.append((b, k))
        if n_blocks > 0:
            on_gpu = on_gpu[-n_blocks:]
        copy = [(b, k) for b, k in on_gpu if not self.host.has(k) and k not in self.host.writing]
        room = self.host.capacity - len(self.host.writing)
        if len(copy) > room:
            copy = copy[len(copy) - room :] if room > 0 else []
        if not on_gpu:
            self._emit(TransferDone(self.now, agent.app_id, agent.agent_id, "d2h", 0, ok=False))
            return
        for b, _ in on_gpu:
            pool.lock(b)
        keys = [k for _, k in copy]
        evicted = self.host.reserve(keys)
        for owner, k in evicted.items():
            self.c.host_evicted_blocks += k
            self._emit(KvEvicted(self.now, owner.app_id, owner.agent_id, k, "host"))
        tr = Transfer(
            "d2h",
            "offload",
            agent,
            [b for b, _ in on_gpu],
            keys,
            len(keys) * self.profile.block_bytes,
            1,
            free_gpu=free_gpu,
        )
        # Blocks already on the host are released with the copied ones, at the same time.
        tr.nbytes = len(keys) * self.profile.block_bytes
        self._submit(tr)

    def _upload(self, agent: AgentKv, n_blocks: int, priority: int) -> None:
        want: list[int] = []
        for k in agent.seq_keys:
            if k in self.pool.by_key or k in self.pending_keys:
                continue
            if not self.host.has(k):
                break
            want.append(k)
            if n_blocks > 0 and len(want) >= n_blocks:
                break
        if not want:
            self._emit(TransferDone(self.now, agent.app_id, agent.agent_id, "h2d", 0, ok=False))
            return
        got = self._allocate(len(want))
        if got is None:
            self.c.failed_uploads += 1
            self._emit(TransferDone(self.now, agent.app_id, agent.agent_id, "h2d", 0, ok=False))
            return
        tr = Transfer(
            "h2d", "upload", agent, got, want, len(want) * self.profile.block_bytes, priority
        )
        for b, k in zip(got, want, strict=True):
            self.pending_keys[k] = (b, tr)
            self.host.touch(k)
        self._submit(tr)

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
                self._preempt(victim)
                if victim is req:
                    preempted_self = True
                    break
            if preempted_self:
                break
            batch.append((req, chunk))
            budget -= chunk
            i += 1
        more, budget = self._admit(budget, len(self.running) + len(self.loading))
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
            self._register_computed(req)
        for req in done:
            self._finish_request(req)

    def _finish_request(self, req: Request) -> None:
        self.running.remove(req)
        self._register_computed(req)
        agent = req.agent
        agent.seq_keys = req.keys[: req.registered]
        kv_blocks = len(req.blocks)
        for b in req.blocks:
            self.pool.release(b, agent, self.now)
        req.blocks = []
        spec = req.app.spec
        if req.node.id in req.app.critical:
            req.app.critical_llm_s += self.now - req.ready_s
        self._emit(
            LlmCallFinish(self.now, spec.app_id, req.node.id, req.rid, req.generated, kv_blocks)
        )
        del self.by_rid[req.rid]
        tool = req.node.tool
        if tool is None:
            self._node_done(req.app, req.node)
            return
        self._emit(
            ToolCallStart(self.now, spec.app_id, req.node.id, tool.kind, tool.predicted_s, req.rid)
        )
        self._push(self.now + tool.duration_s, _TOOL_END, req)

    # ------------------------------------------------------------------ main loop

    def _handle(self, kind: int, payload: Any) -> None:
        self.c.heap_events += 1
        if kind == _ARRIVAL:
            self._arrive(payload)
        elif kind == _TOOL_END:
            self._tool_end(payload)
        elif kind == _TRANSFER_DONE:
            self._transfer_done(payload)
        elif kind == _UPLOAD_DUE:
            agent, n, prio = payload
            self._upload(agent, n, prio)

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
                self.now,
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
            self._push(app.arrival_s, _ARRIVAL, app)
        self._next_tick = 0.0
        first = self.trace.apps[0].arrival_s if self.trace.apps else 0.0
        self.now = first
        self.util_integral = 0.0
        stalled_since = -1.0
        while True:
            self._advance_to(self.now)
            self._engine_state()
            self._flush()
            batch = self._schedule_step()
            self._flush()
            if batch:
                dt = self._step_time(batch)
                self.c.steps += 1
                self._advance_to(self.now + dt)
                self._finish_step(batch, dt)
                self._flush()
                if self.check_invariants:
                    self._check(full=self.c.steps % 25 == 0)
                continue
            if not self.heap and not self.loading and self.waiting:
                # Only policy ticks can still change anything (a pin running out, say).
                if stalled_since < 0:
                    stalled_since = self.now
                elif self.now - stalled_since > self.stall_s:
                    break
            else:
                stalled_since = -1.0
            if self.heap or (self.apps_in_flight and (self.waiting or self.loading)):
                t_next = self.heap[0][0] if self.heap else math.inf
                if self.apps_in_flight:
                    t_next = min(t_next, max(self._next_tick, self.now))
                if t_next == math.inf:
                    break
                self._advance_to(max(t_next, self.now))
                continue
            break
        if self.waiting or self.running or self.loading or self.apps_in_flight:
            raise SimulationStalled(
                f"{len(self.waiting)} waiting, {len(self.running)} running, "
                f"{len(self.loading)} loading, {self.apps_in_flight} apps unfinished at "
                f"t={self.now:.3f}s; nothing else is scheduled"
            )
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


_ARRIVAL, _TOOL_END, _TRANSFER_DONE, _UPLOAD_DUE = range(4)


def _untouch(pool: GpuPool, b: int, where: int, owner: AgentKv | None) -> None:
    """Undo ``pool.touch`` for a block whose admission failed, restoring its old state."""
    pool.ref[b] -= 1
    if pool.ref[b]:
        return
    pool.used -= 1
    if where == CACHED and owner is not None:
        pool._cache(b, owner)
    elif where == GHOST:
        pool.where[b] = GHOST
        pool.owner[b] = None
        pool.ghost[b] = None
    elif where == LOCKED:
        pool.where[b] = LOCKED
    else:  # pragma: no cover - hits are CACHED, GHOST or already USED
        raise AssertionError(f"unexpected prior state {where} for block {b}")


def _expected_llm_s(node: NodeSpec, profile: Profile) -> float:
    """What a gateway could estimate for one call: decode at a small-batch step time."""
    return node.output_tokens * profile.step_s(1, 4096, 4096)


def _dag(spec: AppSpec, profile: Profile) -> AppDag:
    nodes = [
        DagNode(
            id=n.id,
            agent_type=n.agent_type,
            importance=n.importance,
            expected_llm_s=_expected_llm_s(n, profile) if n.kind == "llm" else 0.0,
            expected_tool_s=(n.tool.predicted_s or 0.0) if n.tool is not None else 0.0,
            tool_kind=n.tool.kind if n.tool is not None else "",
        )
        for n in spec.nodes
    ]
    return AppDag(nodes=nodes, edges=spec.edges)


def _critical_path(spec: AppSpec, profile: Profile) -> set[str]:
    """Nodes on the longest path by expected LLM + tool time (ties: first declared)."""
    from tokencake.sim.workload import topological_order

    order = topological_order(spec.nodes)
    best: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for n in order:
        own = 0.0
        if n.kind == "llm":
            own += _expected_llm_s(n, profile)
        if n.tool is not None:
            own += n.tool.predicted_s or 0.0
        prev = max(n.predecessors, key=lambda p: best[p], default=None)
        best[n.id] = own + (best[prev] if prev is not None else 0.0)
        via[n.id] = prev
    if not best:
        return set()
    cur: str | None = max(best, key=lambda k: best[k])
    out: set[str] = set()
    while cur is not None:
        out.add(cur)
        cur = via[cur]
    return out
