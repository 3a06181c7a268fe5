"""``TokenCakeConnectorWorker``: the connector's worker side (data plane, no sockets), and
its copy paths.

Each step it runs the copy jobs the scheduler side shipped in ``TokenCakeMetadata``: plain
block copies between vLLM's KV tensors and the daemon's shared-memory arena, loads in
``start_load_kv`` and saves in ``wait_for_save`` (after the forward wrote the blocks). What
finished goes back as ``Finished`` (the facade sends it in vLLM's
``TokenCakeWorkerMetadata``), and the requests vLLM waits on in ``get_finished``. A failed
copy is reported, never raised: a failed load's blocks are recomputed by vLLM.

The copy path is one ``BlockMover`` per engine, chosen by where its KV lives
(``make_mover``):

- ``CpuBlockMover``: vLLM-CPU's per-layer tensors <-> the arena through
  ``ArenaMapping.write_layers``/``read_layers`` (kv_arena's copy kernel). Synchronous: the
  handle it returns is done already and carries the copy's time.
- ``DeviceBlockMover`` (``tokencake/gpu/block_mover.py``) with ``CudaDevice``: CUDA tensors <->
  the page-locked arena on a side stream, completion by event. UNTESTED ON HARDWARE.

A slot holds one engine block of every region, region after region (``regions.py``: how
vLLM's per-layer views are cut, whatever its ``KVCacheLayout``). Bytes are copied as they lie
in the engine's tensors, so the slot's byte order is the layout's; the connector names it
(``regions.slot_order``) in the registered ``KvLayout`` so blocks never cross between
layouts that order bytes differently.

With the KV caches on a GPU it also shares them with the daemon at every registration and
lends the blocks of the daemon's own decisions (offloads, predictive uploads) to its copy
worker (``lending.py``); its only socket is that one. On vLLM-CPU every copy stays here.

No vLLM import at load time (the messages' vLLM classes are the facade's and ``jobs.py``'s):
``scripts/gpu-check.sh`` imports and tests the copy path on a GPU machine without vLLM.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch

from tokencake.clients.kv_arena import ArenaMapping, copy_path
from tokencake.connectors.vllm.config import ConnectorConfig
from tokencake.connectors.vllm.lending import LentCopies
from tokencake.gpu.block_mover import DeviceBlockMover
from tokencake.gpu.device import Device
from tokencake.gpu.mover import BlockMover, Completed, CopyError, CopyHandle, timed
from tokencake.gpu.regions import block_regions, slot_order
from tokencake.layout import KvLayout

if TYPE_CHECKING:
    from tokencake.connectors.vllm.jobs import CopyJob, TokenCakeMetadata

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")

# ---------------------------------------------------------------------- copy paths

Mover = BlockMover[ArenaMapping]


class CpuBlockMover(BlockMover[ArenaMapping]):
    """vLLM-CPU's KV tensors <-> the arena through kv_arena's copy kernel (``native``, or the
    numpy fallback: ``kv_arena.copy_path``), loaded here at worker start-up so no forward
    step waits for it."""

    def __init__(self, kv_caches: Sequence[torch.Tensor], num_blocks: int | None = None) -> None:
        if any(kv.device.type != "cpu" for kv in kv_caches):
            raise CopyError("KV tensors are not CPU tensors")
        self.regions = block_regions(kv_caches, num_blocks)
        if not all(r.is_contiguous() for r in self.regions):
            # the arena's copy kernel walks whole rows; a block-outermost layout interleaves
            # layers, which vLLM-CPU's backend never does
            raise CopyError("CPU KV regions are not contiguous (a block-outermost layout)")
        self.num_blocks = int(self.regions[0].shape[0])
        self.bytes_per_block = sum(int(r.shape[1]) for r in self.regions)
        # numpy views of the same memory, made once rather than on every copy
        self._arrays = [r.numpy() for r in self.regions]
        self.path = copy_path()
        logger.debug("TokenCake CPU block copies use %s", self.path)

    def store(self, arena: ArenaMapping, blocks: Sequence[int], slots: Sequence[int]) -> CopyHandle:
        started = time.perf_counter()
        arena.write_layers(slots, self._arrays, blocks)
        return timed(started)

    def load(self, arena: ArenaMapping, slots: Sequence[int], blocks: Sequence[int]) -> CopyHandle:
        started = time.perf_counter()
        arena.read_layers(slots, self._arrays, blocks)
        return timed(started)


def make_mover(
    kv_caches: Sequence[torch.Tensor], num_blocks: int | None = None, device: Device | None = None
) -> Mover:
    """The device mover for CUDA KV tensors (or for tensors of ``device``: the FAKE device in
    tests), else the CPU one. A CUDA tensor without a usable CUDA runtime is an error, never
    a silent CPU copy of device memory. ``num_blocks`` lets K/V-first layers be told apart
    (see ``regions.block_regions``)."""
    from tokencake.gpu.block_mover import DeviceBlockMover

    if device is not None:
        return DeviceBlockMover(device, block_regions(kv_caches, num_blocks))
    if kv_caches and kv_caches[0].device.type == "cuda":
        from tokencake.gpu.device import CudaDevice

        device = CudaDevice(kv_caches[0].device.index or 0)
        return DeviceBlockMover(device, block_regions(kv_caches, num_blocks))
    return CpuBlockMover(kv_caches, num_blocks)


def open_arena(name: str, arena_bytes: int, slot_bytes: int) -> ArenaMapping:
    """Map the daemon's arena for copies. Pages fault in on first use rather than all at
    once: the worker opens the arena inside a forward step, where pre-faulting a large arena
    would stall the batch."""
    return ArenaMapping.open(name, slot_bytes, min_bytes=arena_bytes, populate=False)


def close_arena(arena: ArenaMapping, mover: Mover | None = None) -> None:
    """Unmap, after the mover let go of it (unpinned, no copy in flight)."""
    try:
        if mover is not None:
            mover.release(arena)
        arena.close()
    except Exception as exc:  # a view still exported: leave it mapped rather than fail a step
        logger.debug("arena %s left mapped: %s", arena.name, exc)


# ---------------------------------------------------------------------- the worker side


class Finished(NamedTuple):
    """Job ids the worker finished since it was last asked (``ok`` or ``failed``), and how
    long each measured copy took (seconds by job id): ``TokenCakeWorkerMetadata``'s fields."""

    loaded: list[int]
    stored: list[int]
    failed: list[int]
    seconds: dict[int, float]


class TokenCakeConnectorWorker:
    """The connector's state and hooks in each vLLM worker process."""

    def __init__(
        self,
        layout: KvLayout,
        layer_names: list[str],
        cfg: ConnectorConfig | None = None,
        *,
        num_blocks: int | None = None,
        order: str = "",
        device: Device | None = None,
    ) -> None:
        """``num_blocks``: vLLM's block count; ``order``: the slot byte order the registered
        layout names (``connector.slot_order``), checked against the tensors; ``device``:
        where the KV tensors live when it is not CUDA (the FAKE device in tests)."""
        self.layout = layout
        self._layer_names = layer_names
        self._cfg = cfg or ConnectorConfig()
        self._num_blocks = num_blocks
        self._order = order
        self._device = device
        self._copier: Mover | None = None
        self._lending: LentCopies | None = None
        self._arena: ArenaMapping | None = None
        self._arena_epoch = 0  # the link epoch (registration) the mapping belongs to
        self._done_loads: list[int] = []
        self._done_stores: list[int] = []
        self._failed: list[int] = []
        self._copy_seconds: dict[int, float] = {}
        self._recving: set[str] = set()
        self._sending: set[str] = set()
        self._bad_blocks: set[int] = set()
        # Device copies in flight (here or lent): (handle, job, is_load); polled in get_finished.
        self._inflight: list[tuple[CopyHandle, CopyJob, bool]] = []

    @property
    def copier(self) -> Mover | None:
        return self._copier

    @property
    def arena(self) -> ArenaMapping | None:
        return self._arena

    @property
    def lending(self) -> LentCopies | None:
        """The daemon-driven copies (None: the KV caches are not on a device)."""
        return self._lending

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        layers = [kv_caches[n] for n in self._layer_names if n in kv_caches]
        self._copier = make_mover(layers, self._num_blocks, self._device)
        if self._copier.bytes_per_block != self.layout.bytes_per_block:
            raise ValueError(
                f"KV tensors hold {self._copier.bytes_per_block} B per block, "
                f"the registered layout says {self.layout.bytes_per_block} B"
            )
        order = slot_order(layers, self._num_blocks)
        if self._order and order.lower() != self._order.lower():
            raise ValueError(f"KV tensors order a slot {order}; the layout says {self._order}")
        if isinstance(self._copier, DeviceBlockMover):
            timeout_s = self._cfg.timeout_ms / 1000.0
            self._lending = LentCopies(
                self._copier, self._cfg.endpoint, timeout_s, retry_s=self._cfg.reconnect_s
            )

    def _arena_for(self, meta: TokenCakeMetadata) -> ArenaMapping | None:
        if not meta.arena_name:
            return None
        # Mapped afresh on every registration: a restarted daemon can create its segment
        # under the old name (same instance and pid, as in a container), and the old
        # mapping would then read and write the unlinked segment, not the daemon's.
        stale = self._arena_epoch != meta.epoch
        if self._arena is None or self._arena.name != meta.arena_name or stale:
            if self._arena is not None:
                close_arena(self._arena, self._copier)
            self._arena = open_arena(meta.arena_name, meta.arena_bytes, meta.slot_bytes)
            self._arena_epoch = meta.epoch
        return self._arena

    def start_load_kv(self, meta: TokenCakeMetadata) -> None:
        if self._lending is not None:
            self._lending.attach(meta.engine_id, meta.epoch)
        for job in meta.loads:
            self._copy(meta, job, is_load=True)

    def wait_for_save(self, meta: TokenCakeMetadata) -> None:
        if self._lending is not None:
            self._lending.attach(meta.engine_id, meta.epoch)
        for job in meta.stores:
            self._copy(meta, job, is_load=False)

    def _copy(self, meta: TokenCakeMetadata, job: CopyJob, *, is_load: bool) -> None:
        """Run (CPU) or start (CUDA) one job; a failure is reported, never raised."""
        try:
            if job.fail:
                raise ConnectionError("the daemon that held these blocks is gone")
            done: CopyHandle = Completed(0.0)
            if job.slots:
                arena = self._arena_for(meta)
                if arena is None:  # the link went down after the job was queued
                    raise ConnectionError("no arena: the daemon's link is down")
                done = self._start(arena, job, is_load)
                if isinstance(done, Completed):  # a synchronous copy: this was all of it
                    self._copy_seconds[job.job_id] = done.copy_s or 0.0
        except Exception as exc:
            logger.warning("TokenCake copy job %d failed (%s)", job.job_id, exc)
            self._copy_done(job, is_load, ok=False)
            return
        if isinstance(done, Completed):
            self._copy_done(job, is_load, ok=True)
        else:
            self._inflight.append((done, job, is_load))

    def _start(self, arena: ArenaMapping, job: CopyJob, is_load: bool) -> CopyHandle:
        if self._lending is not None:
            return self._lending.start(arena, job.blocks, job.slots, upload=is_load, lend=job.lend)
        assert self._copier is not None
        if is_load:
            return self._copier.load(arena, job.slots, job.blocks)
        return self._copier.store(arena, job.blocks, job.slots)

    def _copy_done(self, job: CopyJob, is_load: bool, *, ok: bool) -> None:
        if ok:
            (self._done_loads if is_load else self._done_stores).append(job.job_id)
        else:
            self._failed.append(job.job_id)
            if is_load:
                self._bad_blocks.update(job.blocks)  # vLLM recomputes them
        if job.req_id:
            (self._recving if is_load else self._sending).add(job.req_id)

    def _poll_inflight(self) -> None:
        if self._lending is not None:
            self._lending.poll()
        pending = []
        for done, job, is_load in self._inflight:
            try:
                finished = done.poll()
            except Exception as exc:
                logger.warning("TokenCake copy job %d failed on the device (%s)", job.job_id, exc)
                self._copy_done(job, is_load, ok=False)
                continue
            if finished:
                self._copy_done(job, is_load, ok=True)
            else:
                pending.append((done, job, is_load))
        self._inflight = pending

    def get_finished(self) -> tuple[set[str] | None, set[str] | None]:
        if self._inflight:
            self._poll_inflight()
        sending, recving = self._sending, self._recving
        self._sending, self._recving = set(), set()
        return (sending or None), (recving or None)

    def get_block_ids_with_load_errors(self) -> set[int]:
        bad, self._bad_blocks = self._bad_blocks, set()
        return bad

    def take_finished(self) -> Finished | None:
        """What finished since the last call, for the scheduler side; None: nothing."""
        if not (self._done_loads or self._done_stores or self._failed):
            return None
        done = Finished(self._done_loads, self._done_stores, self._failed, self._copy_seconds)
        self._done_loads, self._done_stores, self._failed = [], [], []
        self._copy_seconds = {}
        return done

    def shutdown(self) -> None:
        if self._arena is not None:  # the mover waits for its DMAs before it unpins
            close_arena(self._arena, self._copier)
            self._arena = None
        if self._copier is not None:
            self._copier.close()
        if self._lending is not None:
            self._lending.close()
        self._inflight = []
