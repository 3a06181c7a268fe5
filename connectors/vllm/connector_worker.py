"""``TokenCakeConnectorWorker``: the connector's worker side (data plane, no sockets).

Each step it runs the copy jobs the scheduler side shipped in ``TokenCakeMetadata``: plain
block copies between vLLM's KV tensors and the daemon's shared-memory arena
(``movers.make_mover``), loads in ``start_load_kv`` and saves in ``wait_for_save`` (after
the forward wrote the blocks). What finished goes back in ``TokenCakeWorkerMetadata``, and
the requests vLLM waits on in ``get_finished``. A failed copy is reported, never raised:
a failed load's blocks are recomputed by vLLM.

With the KV caches on a GPU it also shares them with the daemon at every registration and
lends the blocks of the daemon's own decisions (offloads, predictive uploads) to its copy
worker (``lending.py``); its only socket is that one. On vLLM-CPU every copy stays here.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from tokencake.connectors.vllm.config import ConnectorConfig
from tokencake.connectors.vllm.jobs import CopyJob, TokenCakeMetadata, TokenCakeWorkerMetadata
from tokencake.connectors.vllm.lending import LentCopies
from tokencake.connectors.vllm.movers import Mover, close_arena, make_mover, open_arena
from tokencake.gpu.block_mover import DeviceBlockMover
from tokencake.gpu.mover import Completed, CopyHandle
from tokencake.gpu.regions import slot_order
from tokencake.layout import KvLayout

if TYPE_CHECKING:
    from tokencake.clients.kv_arena import ArenaMapping
    from tokencake.gpu.device import Device

# Under vLLM's "vllm" logger, so these lines appear in vLLM's output, in its format.
logger = logging.getLogger(f"vllm.{__name__}")


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

    def build_worker_meta(self) -> TokenCakeWorkerMetadata | None:
        if not (self._done_loads or self._done_stores or self._failed):
            return None
        meta = TokenCakeWorkerMetadata(
            self._done_loads, self._done_stores, self._failed, self._copy_seconds
        )
        self._done_loads, self._done_stores, self._failed = [], [], []
        self._copy_seconds = {}
        return meta

    def shutdown(self) -> None:
        if self._arena is not None:  # the mover waits for its DMAs before it unpins
            close_arena(self._arena, self._copier)
            self._arena = None
        if self._copier is not None:
            self._copier.close()
        if self._lending is not None:
            self._lending.close()
        self._inflight = []
