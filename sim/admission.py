"""Admission in the simulated engine: which waiting requests start this step, and with what
memory.

A request's prompt is matched block by block against the GPU prefix cache, copies in flight
to the GPU and the host store; host hits are loaded over the host link before prefill
starts. A request that cannot get memory blocks the queue behind it (vLLM's head-of-line
rule); one the policy refuses (``may_allocate``) is skipped. Preemption (by recompute) gives
a running request's blocks back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokencake.daemon.scheduler import LlmCallPreempted
from tokencake.protocol import LlmCallAdmitted
from tokencake.sim import transfers
from tokencake.sim.kvpool import CACHED, GHOST, LOCKED, AgentKv, GpuPool
from tokencake.sim.records import Request, Transfer

if TYPE_CHECKING:
    from tokencake.sim.engine import Simulator


def admit(sim: Simulator, budget: int, nseqs: int) -> tuple[list[tuple[Request, int]], int]:
    batch: list[tuple[Request, int]] = []
    if not sim.waiting or budget <= 0:
        return batch, budget
    order = sim.policy.admission_order([r.view for r in sim.waiting], sim.now)
    admitted: set[str] = set()
    for view in order:
        if budget <= 0 or nseqs >= sim.profile.max_num_seqs:
            break
        req = sim.by_rid.get(view.request_id)
        if req is None or (req.admitted_s >= 0 and req.blocks):
            continue
        ok = try_admit(sim, req)
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
            if sim.vllm_rules:
                register_computed(sim, req, req.computed + chunk)
    if admitted:
        sim.waiting = [r for r in sim.waiting if r.rid not in admitted]
    return batch, budget


def try_admit(sim: Simulator, req: Request) -> bool | None:
    """Admit ``req`` if memory allows: True, False (no memory: stop), None (policy says no)."""
    pool = sim.pool
    bt = sim.bt
    target = req.target
    max_hit = (target - 1) // bt
    by_key = pool.by_key
    # The prefix walk only changes when content is added or removed somewhere; a request
    # that keeps waiting (policy refusal, no memory) reuses its last walk.
    sig = (
        target,
        len(by_key),
        pool.epoch,
        len(sim.pending_keys),
        sim.pending_epoch,
        len(sim.host.lru),
        sim.host.epoch,
    )
    if req.walk is not None and req.walk_sig == sig:
        prefix, hits, attach, host_keys = req.walk
    else:
        prefix, hits, attach, host_keys = walk(sim, req, max_hit)
        req.walk = (prefix, hits, attach, host_keys)
        req.walk_sig = sig
    return admit_with(sim, req, prefix, hits, attach, host_keys)


def walk(
    sim: Simulator, req: Request, max_hit: int
) -> tuple[int, list[int], list[tuple[int, Transfer]], list[int]]:
    keys = req.keys
    by_key = sim.pool.by_key
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
    pending = sim.pending_keys
    host_lru = sim.host.lru
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


def admit_with(
    sim: Simulator,
    req: Request,
    prefix: int,
    hits: list[int],
    attach: list[tuple[int, Transfer]],
    host_keys: list[int],
) -> bool | None:
    """Admit ``req`` over its walked prefix: True, False (no memory), None (policy says no)."""
    bt = sim.bt
    need = len(host_keys) + -(-req.target // bt) - prefix
    if not sim.policy.may_allocate(req.view.app_id, req.view.agent_id, need, sim.now):
        return None
    got = _allocate_holding(sim, hits, need)
    if got is None:
        if sim.pin_yield and sim.pins:
            yield_pins(sim, req, hits, need)
        return False
    layout, loads_blocks, loads_keys = _lay_out(sim, req, prefix, hits, got)
    req.blocks = layout
    req.computed = prefix * bt
    req.registered = prefix
    sim.c.gpu_hit_tokens += (len(hits) + len(attach)) * bt
    sim.c.host_hit_tokens += len(loads_keys) * bt
    keys, before = req.keys, sim.ever_computed
    rec = sum(1 for j in range(prefix, min(len(keys), req.target // bt)) if keys[j] in before)
    req.recompute_left = rec * bt
    sim.c.recompute_tokens += rec * bt
    if sim.call_trace is not None:
        sim.call_trace.admitted(req, sim.now, len(hits) + len(attach), len(loads_keys))
    if loads_keys:
        _load(sim, req, loads_blocks, loads_keys)
    wait = sim.now - req.enqueued_s
    req.app.queue_s += wait
    sim.c.time_queue_s += wait
    req.admitted_s = sim.now
    if req.waiting_on:
        sim.loading.add(req)
    else:
        sim.running.append(req)
    sim._emit(LlmCallAdmitted(req.view.app_id, req.view.agent_id, req.rid, len(layout)))
    return True


def yield_pins(sim: Simulator, req: Request, hits: list[int], need: int) -> int:
    """``TokenCakeScheduler``'s rule (``Simulator(pin_yield=True)``, the engine replay of
    its setup): a request the policy lets through that the free blocks cannot hold makes
    the daemon's pins give way. Pins whose agents return last go first, until the idle
    blocks they alone hold cover the shortfall; the request's own agent's pin and blocks
    of its own prefix do not count. Each yielded agent's KV is copied to the host, kept on
    the GPU (held while the copy runs, free cached after), so it reloads rather than
    recomputes if evicted; when all pins together cannot cover the shortfall, none yields
    (``connectors/vllm/holds.py``, ``AgentHolds.yield_pins``). Returns the blocks freed
    once the copies end; the request is admitted on a later step."""
    pool, now = sim.pool, sim.now
    own = set(hits)
    mine = (req.view.app_id, req.view.agent_id)
    live = sorted(
        ((until, key) for key, until in sim.pins.items() if until > now and key != mine),
        reverse=True,
    )
    pinned = {key for key, until in sim.pins.items() if until > now}
    idle_own = 0  # the request's own idle prefix blocks: vLLM takes them off the free queue
    for b in hits:
        owner = pool.owner[b]
        if pool.where[b] == CACHED and (
            owner is None or (owner.app_id, owner.agent_id) not in pinned
        ):
            idle_own += 1
    short = need + idle_own - (pool.free + pool.n_cached - sim._pinned_cached())
    freed = 0
    plan: list[AgentKv] = []
    for _, key in live:
        if freed >= short:
            break
        agent = sim.agents.get(key)
        if agent is None:
            continue
        mine_only = [b for b in agent.cached if b not in own]
        if not mine_only:
            continue
        freed += len(mine_only)
        plan.append(agent)
    if short <= 0 or freed < short:
        return 0  # running requests hold the rest: the request waits for them anyway
    for agent in plan:
        sim.pins.pop((agent.app_id, agent.agent_id), None)
        sim.pins_yielded += 1
        transfers.offload(sim, agent, 0, False)
    return freed


def _allocate_holding(sim: Simulator, hits: list[int], need: int) -> list[int] | None:
    """``need`` new blocks, with the prefix hits held so that the allocation cannot evict
    them; None (and the hits as they were) when memory does not allow."""
    pool = sim.pool
    if not pool.unbounded and need > pool.free:
        # Upper bound without touching anything: every idle cached block but our own hits.
        where = pool.where
        own = sum(1 for b in hits if where[b] == CACHED)
        if need > pool.free + pool.n_cached - own:
            return None
    prev = [(b, pool.where[b], pool.owner[b]) for b in hits]
    for b in hits:
        pool.touch(b)
    got = sim._allocate(need)
    if got is None:
        for b, w, o in prev:
            _untouch(pool, b, w, o)
    return got


def _lay_out(
    sim: Simulator, req: Request, prefix: int, hits: list[int], got: list[int]
) -> tuple[list[int], list[int], list[int]]:
    """The request's blocks in position order (the walked prefix, then the new blocks), and
    the blocks and keys to load from the host."""
    pool = sim.pool
    by_key = pool.by_key
    keys = req.keys
    layout: list[int] = []
    hi = gi = 0
    loads_blocks: list[int] = []
    loads_keys: list[int] = []
    for j in range(prefix):
        k = keys[j]
        if hi < len(hits) and by_key.get(k) == hits[hi]:
            layout.append(hits[hi])
            hi += 1
        elif k in sim.pending_keys:
            b, tr = sim.pending_keys[k]
            pool.touch(b)
            layout.append(b)
            if req not in tr.waiters:
                tr.waiters.append(req)
                req.waiting_on += 1
        else:
            b = got[gi]
            gi += 1
            layout.append(b)
            loads_blocks.append(b)
            loads_keys.append(k)
            sim.host.touch(k)
    layout.extend(got[gi:])
    return layout, loads_blocks, loads_keys


def _load(sim: Simulator, req: Request, blocks: list[int], keys: list[int]) -> None:
    """Copy the request's host hits to the GPU; it waits for them before prefill."""
    tr = Transfer(
        "h2d",
        "load",
        req.agent,
        blocks,
        keys,
        len(keys) * sim.profile.block_bytes,
        0,
        waiters=[req],
    )
    req.waiting_on += 1
    for b, k in zip(blocks, keys, strict=True):
        sim.pool.touch(b)  # the copy holds its own reference, like an upload
        sim.pending_keys[k] = (b, tr)
    transfers.submit(sim, tr)


def preempt(sim: Simulator, req: Request) -> None:
    register_computed(sim, req)
    # The released blocks stay cached under their keys: the agent's KV now, as after a
    # finished call (an offload decided on the preemption copies them).
    req.agent.seq_keys = req.keys[: req.registered]
    freed = len(req.blocks)
    for b in req.blocks:
        sim.pool.release(b, req.agent, sim.now)
    req.blocks = []
    req.computed = 0
    req.registered = 0
    req.admitted_s = -1.0
    req.enqueued_s = sim.now
    req.view.blocks = -(-req.target // sim.bt)
    sim.running.remove(req)
    sim.waiting.insert(0, req)
    sim.c.preemptions += 1
    if sim.call_trace is not None:
        sim.call_trace.preempted(req)
    sim._emit(LlmCallPreempted(req.view.app_id, req.view.agent_id, req.rid, freed))


def register_computed(sim: Simulator, req: Request, upto: int = -1) -> None:
    """Enter the request's full blocks in the prefix cache: those computed, or with
    ``upto``, those up to token ``upto`` (scheduled this step, under ``vllm_rules``)."""
    upto = req.computed if upto < 0 else upto
    full = min(upto // sim.bt, len(req.keys), len(req.blocks))
    for i in range(req.registered, full):
        k = req.keys[i]
        sim.pool.register(req.blocks[i], k)
        sim.ever_computed.add(k)
    if full > req.registered:
        req.registered = full


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
