"""The copy jobs: what the scheduler side ships to the worker each step and what comes back
(vLLM's metadata: ``CopyJob``, ``TokenCakeMetadata``, ``TokenCakeWorkerMetadata``), and the
scheduler side's book of them (``CopyJobs``): host slots reserved or pinned, copies queued
for the worker, and what the daemon is told when the worker reports them done.

The worker side imports only the three messages; the two sides meet nowhere else.

A save is two-phase: ``reserve`` (host slots), the worker's copy, then ``commit`` (or
``abort`` when the copy failed); a block is servable only once committed. A load pins its
slots (``load_begin``) until the copy into vLLM's blocks ended (``load_end``). Jobs belong to
the link's registration (``epoch``): a job of a previous daemon is never committed into, or
loaded from, a new one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorMetadata,
    KVConnectorWorkerMetadata,
)
from vllm.v1.core.kv_cache_utils import BlockHash, get_block_hash

from tokencake import protocol as p
from tokencake.agent_params import AgentParams
from tokencake.clients.client import DaemonLink
from tokencake.connectors.vllm.config import ConnectorConfig

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")


# What the scheduler side tells the worker each step, and what comes back.


@dataclass(slots=True)
class CopyJob:
    """Copy ``blocks[i]`` <-> ``slots[i]``. ``req_id`` is set when vLLM waits on the job
    (an async load, or a save that holds a finished request's blocks)."""

    job_id: int
    slots: list[int]
    blocks: list[int]
    req_id: str = ""
    fail: bool = False  # report the load as failed without copying (its daemon is gone)
    lend: bool = False
    """The daemon decided this copy (an offload, a predictive upload): on a GPU its blocks
    are lent to the daemon's copy worker when it takes them (``lending.py``)."""


@dataclass
class TokenCakeMetadata(KVConnectorMetadata):
    arena_name: str = ""
    arena_bytes: int = 0
    slot_bytes: int = 0
    epoch: int = 0
    """The scheduler's registration count: the worker maps the arena again when it changes
    (and shares its GPU KV again)."""
    engine_id: str = ""
    """The registration's engine id (the worker's daemon-driven copies name it)."""
    loads: list[CopyJob] = field(default_factory=list)
    stores: list[CopyJob] = field(default_factory=list)


@dataclass
class TokenCakeWorkerMetadata(KVConnectorWorkerMetadata):
    """Job ids the worker finished this step (``ok`` or ``failed``), and how long each
    measured copy took (seconds by job id; copies it could not time are absent)."""

    loaded: list[int] = field(default_factory=list)
    stored: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    seconds: dict[int, float] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, TokenCakeWorkerMetadata)
        return TokenCakeWorkerMetadata(
            loaded=self.loaded + other.loaded,
            stored=self.stored + other.stored,
            failed=self.failed + other.failed,
            seconds={**self.seconds, **other.seconds},
        )


# The scheduler side's book of jobs.


@dataclass(slots=True)
class ConnectorStats:
    """Counters a test, a benchmark or an operator reads from the scheduler-side connector."""

    # Loads and saves through the host store.
    lookups: int = 0
    """Requests whose uncomputed prompt blocks were looked up in the host store."""
    hit_tokens: int = 0
    """Prompt tokens the host store had (their loads scheduled)."""
    loaded_blocks: int = 0
    """Blocks copied from the host store into GPU blocks."""
    load_failures: int = 0
    """Loads that failed (vLLM recomputes those blocks)."""
    stored_blocks: int = 0
    """Blocks saved to the host store (committed)."""
    already_stored_blocks: int = 0
    """Blocks a save skipped: the host store held them already."""
    # The daemon's decisions and the agent events.
    gpu_blocks_freed: int = 0
    """Offloaded GPU blocks moved to the head of vLLM's free queue (evicted first)."""
    decisions_applied: int = 0
    """Pushed decisions applied to an agent this engine knows."""
    offloads_started: int = 0
    """Offload decisions that started a save of the agent's resident blocks."""
    uploads_staged: int = 0
    """Upload decisions staged (a preload, or the next lookup loads the KV)."""
    events_sent: int = 0
    """Agent events the daemon answered (accepted or not)."""
    events_refused: int = 0
    """Agent events the daemon answered as not accepted (they did not fit the agent's phase)."""
    preemptions_reported: int = 0
    """Preemptions of agent requests reported (``TokenCakeScheduler`` sees them)."""
    reconnects: int = 0
    """Times the daemon link came up again after being down."""
    preloaded_blocks: int = 0
    """GPU blocks a predictive upload copied in and registered in vLLM's prefix cache."""
    preloads_evicted: int = 0
    """Predictive uploads ended because blocks they had brought in were evicted since."""
    holds_released: int = 0
    """GPU blocks released because the daemon's link went down while they were pinned."""
    pins_yielded: int = 0
    """Pins released early for a waiting request that lacked free blocks
    (``TokenCakeScheduler``; the agent's KV is copied to the host first)."""
    lookups_reused: int = 0
    """Lookups of a waiting request not sent again: its earlier answer still stood."""


@dataclass(slots=True)
class SchedulerSide:
    """What every part of the scheduler-side connector shares: its settings, its daemon link,
    its counters and vLLM's GPU block pool (bound after construction)."""

    cfg: ConnectorConfig
    link: DaemonLink
    stats: ConnectorStats
    block_size: int
    pool: BlockPool | None = None


@dataclass(slots=True)
class Hit:
    """Host slots pinned for a request between the lookup and vLLM's allocation."""

    epoch: int
    start_block: int
    slots: list[int]
    asked: int = 0
    """Blocks the lookup asked for (the request's uncomputed full blocks then)."""
    at: float = 0.0
    """When it was looked up (``time.monotonic()``)."""


@dataclass(slots=True)
class Job:
    """A copy in flight. ``prefix``/``hashes`` are the whole block prefix it concerns (some
    of it may be stored already); ``slots`` are the slots the worker writes or reads."""

    epoch: int
    is_load: bool
    slots: list[int]
    req_id: str = ""
    prefix: list[int] = field(default_factory=list)
    hashes: list[bytes] = field(default_factory=list)
    release_refs: bool = False  # the connector holds a reference on ``prefix``
    free_gpu: bool = False  # drop ``prefix`` from the GPU prefix cache once committed
    preload: tuple[str, str] | None = None  # a predictive upload of this agent's KV
    first: int = 0  # a preload's first block index in the agent's prefix


def _holds(block: KVCacheBlock, expected: bytes) -> bool:
    """True when vLLM's pool says ``block`` holds the KV of chain hash ``expected``."""
    key = block.block_hash
    return key is not None and not block.is_null and bytes(get_block_hash(key)) == expected


def resident(pool: BlockPool | None, blocks: list[int], hashes: list[bytes]) -> list[int]:
    """The engine blocks that hold ``hashes`` now: the longest prefix still in vLLM's prefix
    cache, one block id per hash.

    A recorded block id is only a hint. Once vLLM freed the request, the id may have been
    handed to another request (its KV is then another request's), or the agent's KV may have
    been recomputed into other blocks. Identity is the chain hash: a block is the agent's
    only while vLLM's block pool says that block holds that hash; otherwise the pool's hash
    index says where the hash lives now, if anywhere.
    """
    if pool is None:
        return []
    out: list[int] = []
    for i, expected in enumerate(hashes):
        block_id = blocks[i] if i < len(blocks) else -1
        if 0 <= block_id < len(pool.blocks) and _holds(pool.blocks[block_id], expected):
            out.append(block_id)
            continue
        found = pool.get_cached_block(BlockHash(expected), [0])
        if not found or not _holds(found[0], expected):
            break
        out.append(found[0].block_id)
    return out


class CopyJobs:
    """The copies the scheduler side queued for the worker, and those still in flight."""

    def __init__(self, side: SchedulerSide) -> None:
        self.side = side
        self.hits: dict[str, Hit] = {}
        self.jobs: dict[int, Job] = {}
        self.loads: list[CopyJob] = []
        self.stores: list[CopyJob] = []
        self.to_free: list[tuple[list[int], list[bytes]]] = []
        """Committed prefixes to drop from vLLM's prefix cache on the next step."""
        self.progress_at = 0.0
        """When a copy job was last created or finished."""
        self.on_preload_done: Callable[[int, Job, bool], None] | None = None
        self._job_ids = 0

    def next_job(self) -> int:
        self._job_ids += 1
        self.progress_at = time.monotonic()
        return self._job_ids

    def queued(self) -> bool:
        return bool(self.loads or self.stores or self.to_free)

    def take(self) -> tuple[list[CopyJob], list[CopyJob]]:
        """This step's loads and stores, for the worker."""
        loads, stores = self.loads, self.stores
        self.loads, self.stores = [], []
        return loads, stores

    def fail_queued(self) -> None:
        """A new registration: queued jobs name slots of the previous daemon's arena, so they
        go out as failed no-ops, and everything waiting on them ends (vLLM's request: a
        load's blocks are recomputed, a save's blocks are freed; an offload's references)."""
        self.hits.clear()
        for job in self.loads + self.stores:
            job.slots, job.fail = [], True

    # ------------------------------------------------------------------ loads

    def release_hit(self, req_id: str) -> None:
        hit = self.hits.pop(req_id, None)
        link = self.side.link
        if hit is not None and link.up and hit.epoch == link.epoch:
            link.call(p.LoadEnd(link.engine_id, hit.slots))

    def load_hit(self, req_id: str, block_ids: list[int], n: int) -> int:
        """Turn a request's pinned hit into a load of ``n`` blocks into ``block_ids`` (vLLM's
        allocation from the hit's first block); the tokens it loads."""
        hit = self.hits.pop(req_id, None)
        link = self.side.link
        if hit is None:
            return 0
        use, rest = hit.slots[:n], hit.slots[n:]
        if not use:
            if rest and link.up and hit.epoch == link.epoch:
                link.call(p.LoadEnd(link.engine_id, rest))
            return 0
        blocks = block_ids[hit.start_block : hit.start_block + n]
        job_id = self.next_job()
        if not link.up or hit.epoch != link.epoch:
            # The daemon went down (or restarted) since the hit: its pins are gone, so the
            # slots may hold anything now. vLLM waits for this load all the same; it is
            # reported failed and vLLM recomputes the blocks.
            self.jobs[job_id] = Job(hit.epoch, True, [], req_id=req_id)
            self.loads.append(CopyJob(job_id, [], blocks, req_id, fail=True))
            return 0
        if rest:
            link.call(p.LoadEnd(link.engine_id, rest))
        self.jobs[job_id] = Job(link.epoch, True, use, req_id=req_id)
        self.loads.append(CopyJob(job_id, use, blocks, req_id))
        tokens = n * self.side.block_size
        self.side.stats.hit_tokens += tokens
        return tokens

    # ------------------------------------------------------------------ saves

    def reserve(
        self,
        blocks: list[int],
        hashes: list[bytes],
        params: AgentParams | None,
        *,
        req_id: str = "",
        free_gpu: bool = False,
        lend: bool = False,
    ) -> Job | None:
        """Reserve host slots for the blocks not stored yet and queue their copy (``lend``:
        the daemon decided it; on a GPU its copy worker may run it, ``CopyJob.lend``).

        Returns the job, or None when nothing needs copying (then ``free_gpu`` is applied
        at once to the blocks already stored).
        """
        side, link = self.side, self.side.link
        if not link.up:
            return None
        req = p.Reserve(
            link.engine_id,
            hashes,
            side.cfg.salt,
            app_id=params.app_id if params else "",
            agent_id=params.agent_id if params else "",
        )
        reply = link.call(req)
        if reply is None:
            return None
        pairs = [(s, b) for s, b in zip(reply.slots, blocks, strict=False) if s >= 0]
        stored = len(reply.slots)
        side.stats.already_stored_blocks += stored - len(pairs)
        if not pairs:
            if free_gpu:
                self.to_free.append((blocks[:stored], hashes[:stored]))
            return None
        job_id = self.next_job()
        job = Job(
            link.epoch,
            False,
            [s for s, _ in pairs],
            req_id=req_id,
            prefix=blocks[:stored],
            hashes=hashes[:stored],
            free_gpu=free_gpu,
        )
        self.jobs[job_id] = job
        self.stores.append(CopyJob(job_id, job.slots, [b for _, b in pairs], req_id, lend=lend))
        return job

    def saving(self, hashes: list[bytes]) -> Job | None:
        """A save in flight whose prefix starts with ``hashes``, if any."""
        for job in self.jobs.values():
            if not job.is_load and job.hashes[: len(hashes)] == hashes:
                return job
        return None

    # ------------------------------------------------------------------ the worker's report

    def finished(self, meta: TokenCakeWorkerMetadata) -> None:
        """The worker finished these jobs: end the loads, commit or abort the saves."""
        self.progress_at = time.monotonic()
        for job_id in meta.loaded:
            job = self.jobs.pop(job_id, None)
            if job is not None:
                self._loaded(job_id, job, meta.seconds.get(job_id, -1.0))
        for job_id in meta.stored:
            job = self.jobs.pop(job_id, None)
            if job is not None:
                self._stored(job, meta.seconds.get(job_id, -1.0))
        for job_id in meta.failed:
            job = self.jobs.pop(job_id, None)
            if job is not None:
                self._failed(job_id, job)

    def _loaded(self, job_id: int, job: Job, copy_s: float) -> None:
        side, link = self.side, self.side.link
        if job.preload is not None and self.on_preload_done is not None:
            self.on_preload_done(job_id, job, True)
        side.stats.loaded_blocks += len(job.slots)
        if link.up and job.epoch == link.epoch:
            link.call(p.LoadEnd(link.engine_id, job.slots, copy_s))

    def _stored(self, job: Job, copy_s: float) -> None:
        link = self.side.link
        committed = None
        if link.up and job.epoch == link.epoch:
            committed = link.call(p.Commit(link.engine_id, job.slots, copy_s))
        if committed is not None:
            self.side.stats.stored_blocks += committed.committed
        self._finish_store(job, ok=committed is not None)

    def _failed(self, job_id: int, job: Job) -> None:
        link = self.side.link
        logger.warning("TokenCake copy job %d failed; the engine recomputes", job_id)
        self.side.stats.load_failures += int(job.is_load)
        if job.preload is not None and self.on_preload_done is not None:
            self.on_preload_done(job_id, job, False)
        if link.up and job.epoch == link.epoch:
            if job.is_load:
                link.call(p.LoadEnd(link.engine_id, job.slots))
            else:
                link.call(p.Abort(link.engine_id, job.slots))
        if not job.is_load:
            self._finish_store(job, ok=False)

    def _finish_store(self, job: Job, *, ok: bool) -> None:
        pool = self.side.pool
        if job.release_refs and pool is not None:
            pool.free_blocks(pool.blocks[b] for b in reversed(job.prefix))
        if ok and job.free_gpu:
            self.to_free.append((job.prefix, job.hashes))

    def free_pending(self) -> None:
        """Drop committed blocks from vLLM's prefix cache and queue them for reuse first.

        Only blocks nobody references (``ref_cnt == 0``) that hold the expected hash now are
        touched: a block another request shares, or one already reused, stays as is.
        """
        pool = self.side.pool
        if pool is None or not self.to_free:
            self.to_free.clear()
            return
        for blocks, hashes in self.to_free:
            for block_id in resident(pool, blocks, hashes):
                block = pool.blocks[block_id]
                if block.ref_cnt != 0:
                    continue
                pool.evict_blocks({block_id})
                pool.free_block_queue.remove(block)
                pool.free_block_queue.prepend_n([block])
                self.side.stats.gpu_blocks_freed += 1
        self.to_free.clear()
