"""Copies over the simulated host link: offloads (GPU to host), uploads and loads (host to
GPU). One DMA engine per direction; queued copies start in priority order, so they contend
as they do on a real PCIe link. A finished copy tells the policy (``TransferMeasured``,
``TransferDone``) and wakes the requests that waited for it.
"""

from __future__ import annotations

import heapq
from typing import TYPE_CHECKING

from tokencake.daemon.scheduler import KvEvicted, TransferDone, TransferMeasured
from tokencake.sim.kvpool import AgentKv
from tokencake.sim.records import TRANSFER_DONE, Transfer

if TYPE_CHECKING:
    from tokencake.sim.engine import Simulator


def submit(sim: Simulator, tr: Transfer) -> None:
    tr.submit_s = sim.now
    tr.seq = sim._next_seq()
    if sim.copies is not None:
        a = tr.agent
        sim.copies.copy_submitted(tr.seq, tr.kind, a.app_id, a.agent_id, tr.keys)
    d = tr.direction
    if sim.link.active[d] is None:
        start(sim, tr)
    else:
        heapq.heappush(sim.link.queue[d], (tr.priority, tr.seq, tr))


def start(sim: Simulator, tr: Transfer) -> None:
    sim.link.active[tr.direction] = tr
    tr.start_s = sim.now
    sim._push(sim.now + sim.link.duration(tr), TRANSFER_DONE, tr)


def transfer_done(sim: Simulator, tr: Transfer) -> None:
    d = tr.direction
    sim.link.active[d] = None
    if sim.copies is not None:
        sim.copies.copy_done(tr.seq)
    if sim.link.queue[d]:
        _, _, nxt = heapq.heappop(sim.link.queue[d])
        start(sim, nxt)
    n = len(tr.keys)
    sim._emit(
        TransferMeasured(sim.now, d, tr.nbytes, sim.now - tr.start_s, n)  # type: ignore[arg-type]
    )
    a = tr.agent
    if d == "d2h":
        sim.c.offload_bytes += tr.nbytes
        sim.c.offload_blocks += n
        sim.host.commit(tr.keys, a)
        for b in tr.blocks:
            sim.pool.unlock(b, a, tr.free_gpu)
        sim._emit(TransferDone(sim.now, a.app_id, a.agent_id, "d2h", n))
        return
    sim.c.upload_bytes += tr.nbytes
    sim.c.upload_blocks += n
    for b, k in zip(tr.blocks, tr.keys, strict=True):
        sim.pending_keys.pop(k, None)
        sim.pending_epoch += 1
        sim.pool.register(b, k)
        sim.pool.release(b, a, sim.now)
    if tr.kind == "upload":
        sim._emit(TransferDone(sim.now, a.app_id, a.agent_id, "h2d", n))
    for req in tr.waiters:
        req.waiting_on -= 1
        if req.waiting_on == 0 and req in sim.loading:
            sim.loading.discard(req)
            wait = sim.now - req.admitted_s
            sim.c.time_load_s += wait
            sim.running.append(req)


def offload(sim: Simulator, agent: AgentKv, n_blocks: int, free_gpu: bool) -> None:
    pool = sim.pool
    on_gpu: list[tuple[int, int]] = []
    for k in agent.seq_keys:
        b = pool.by_key.get(k)
        if b is not None:
            on_gpu.append((b, k))
    if n_blocks > 0:
        on_gpu = on_gpu[-n_blocks:]
    copy = [(b, k) for b, k in on_gpu if not sim.host.has(k) and k not in sim.host.writing]
    room = sim.host.capacity - len(sim.host.writing)
    if len(copy) > room:
        copy = copy[len(copy) - room :] if room > 0 else []
    if not on_gpu:
        sim._emit(TransferDone(sim.now, agent.app_id, agent.agent_id, "d2h", 0, ok=False))
        return
    for b, _ in on_gpu:
        pool.lock(b)
    keys = [k for _, k in copy]
    evicted = sim.host.reserve(keys)
    for owner, k in evicted.items():
        sim.c.host_evicted_blocks += k
        sim._emit(KvEvicted(sim.now, owner.app_id, owner.agent_id, k, "host"))
    tr = Transfer(
        "d2h",
        "offload",
        agent,
        [b for b, _ in on_gpu],
        keys,
        len(keys) * sim.profile.block_bytes,
        1,
        free_gpu=free_gpu,
    )
    # Blocks already on the host are released with the copied ones, at the same time.
    tr.nbytes = len(keys) * sim.profile.block_bytes
    submit(sim, tr)


def upload(sim: Simulator, agent: AgentKv, n_blocks: int, priority: int) -> None:
    want: list[int] = []
    for k in agent.seq_keys:
        if k in sim.pool.by_key or k in sim.pending_keys:
            continue
        if not sim.host.has(k):
            break
        want.append(k)
        if n_blocks > 0 and len(want) >= n_blocks:
            break
    if not want:
        sim._emit(TransferDone(sim.now, agent.app_id, agent.agent_id, "h2d", 0, ok=False))
        return
    got = sim._allocate(len(want))
    if got is None:
        sim.c.failed_uploads += 1
        sim._emit(TransferDone(sim.now, agent.app_id, agent.agent_id, "h2d", 0, ok=False))
        return
    tr = Transfer("h2d", "upload", agent, got, want, len(want) * sim.profile.block_bytes, priority)
    for b, k in zip(got, want, strict=True):
        sim.pending_keys[k] = (b, tr)
        sim.host.touch(k)
    submit(sim, tr)
