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
        TransferMeasured(d, tr.nbytes, sim.now - tr.start_s, n)  # type: ignore[arg-type]
    )
    a = tr.agent
    if d == "d2h":
        sim.c.offload_bytes += tr.nbytes
        sim.c.offload_blocks += n
        sim.host.commit(tr.keys, a)
        for b in tr.blocks:
            sim.pool.unlock(b, a, tr.free_gpu)
        sim._emit(TransferDone(a.app_id, a.agent_id, "d2h", tr.settles))
        return
    sim.c.upload_bytes += tr.nbytes
    sim.c.upload_blocks += n
    for b, k in zip(tr.blocks, tr.keys, strict=True):
        sim.pending_keys.pop(k, None)
        sim.pending_epoch += 1
        sim.pool.register(b, k)
        sim.pool.release(b, a, sim.now)
    if tr.kind == "upload":
        sim._emit(TransferDone(a.app_id, a.agent_id, "h2d", tr.settles))
    for req in tr.waiters:
        req.waiting_on -= 1
        if req.waiting_on == 0 and req in sim.loading:
            sim.loading.discard(req)
            wait = sim.now - req.admitted_s
            sim.c.time_load_s += wait
            sim.running.append(req)


def offload(sim: Simulator, agent: AgentKv, n_blocks: int, free_gpu: bool) -> None:
    """Copy (``free_gpu``: move) the agent's last ``n_blocks`` GPU blocks to the host.

    The policy counted ``n_blocks``; every one of them is settled by a ``TransferDone``:
    blocks on the host when the copy ends (copied now, or already there: a shared prefix
    another agent saved) with ``ok``; blocks no longer on the GPU, or left out for want of
    host room, with ``ok=False`` at once. A report short of the decision would leave the
    policy waiting for a copy that never comes (the daemon settles such blocks the same
    way when it reserves host slots).
    """
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
    left_out = max(len(copy) - max(room, 0), 0)
    copy = copy[left_out:]
    settled = len(on_gpu) - left_out
    short = max(n_blocks, len(on_gpu)) - settled
    if short > 0:
        sim._emit(TransferDone(agent.app_id, agent.agent_id, "d2h", short, ok=False))
    if not on_gpu:
        return
    for b, _ in on_gpu:
        pool.lock(b)
    keys = [k for _, k in copy]
    evicted = sim.host.reserve(keys)
    for owner, k in evicted.items():
        sim.c.host_evicted_blocks += k
        sim._emit(KvEvicted(owner.app_id, owner.agent_id, k, "host"))
    # Blocks already on the host are released with the copied ones, at the same time.
    tr = Transfer(
        "d2h",
        "offload",
        agent,
        [b for b, _ in on_gpu],
        keys,
        len(keys) * sim.profile.block_bytes,
        1,
        free_gpu=free_gpu,
        settles=settled,
    )
    submit(sim, tr)


def upload(sim: Simulator, agent: AgentKv, n_blocks: int, priority: int) -> None:
    """Copy up to ``n_blocks`` of the agent's host KV that is missing on the GPU back.

    Settles the decision's blocks as ``offload`` does: the copied ones when the copy ends;
    the rest at once, ``ok`` when the whole context is on the GPU (or being loaded)
    already, ``ok=False`` when its host chain is broken or the GPU has no room.
    """
    want: list[int] = []
    complete = True
    for k in agent.seq_keys:
        if k in sim.pool.by_key or k in sim.pending_keys:
            continue
        if not sim.host.has(k):
            complete = False
            break
        want.append(k)
        if n_blocks > 0 and len(want) >= n_blocks:
            break
    got = sim._allocate(len(want)) if want else None
    if want and got is None:
        sim.c.failed_uploads += 1
        want = []
        complete = False
    short = n_blocks - len(want)
    if short > 0:
        sim._emit(TransferDone(agent.app_id, agent.agent_id, "h2d", short, ok=complete))
    if not want or got is None:
        return
    tr = Transfer("h2d", "upload", agent, got, want, len(want) * sim.profile.block_bytes, priority)
    tr.settles = len(want)
    for b, k in zip(got, want, strict=True):
        sim.pending_keys[k] = (b, tr)
        sim.host.touch(k)
    submit(sim, tr)
