"""The daemon's handlers for ``share_gpu_kv``, ``gpu_copy`` and ``gpu_copy_status``.

They check the engine and bind the copy service (``service.py``) to the daemon's pool: the
formatted arena and the store that says which slots an engine holds. A copy's deadline is
half the lease, so a copy ends (or its worker is gone) before its slots' lease can expire.
"""

from __future__ import annotations

from collections.abc import Callable

from tokencake import protocol as p
from tokencake.daemon.config import DaemonConfig
from tokencake.daemon.engines import EngineRecord, EngineRegistry
from tokencake.daemon.gpu.service import GpuCopyService
from tokencake.daemon.kv_service import KvService


class GpuCopyHandlers:
    def __init__(
        self,
        *,
        config: Callable[[], DaemonConfig],
        clock: Callable[[], float],
        engines: EngineRegistry,
        kv: KvService,
    ) -> None:
        self._clock = clock
        self._engines = engines
        self._kv = kv
        cfg = config()
        self.service = GpuCopyService(
            arena=self._arena, mode=cfg.gpu_copies, deadline_s=cfg.lease_s / 2
        )

    def share(self, _identity: bytes, req: p.ShareGpuKv) -> p.ShareGpuKvReply:
        return self.service.share(self._engine(req.engine_id).engine_id, req)

    def copy(self, _identity: bytes, req: p.GpuCopy) -> p.GpuCopyReply:
        engine = self._engine(req.engine_id)
        assert self._kv.store is not None  # formatted by the engine's registration
        return self.service.copy(engine.engine_id, engine.owner, self._kv.store, req)

    def status(self, _identity: bytes, req: p.GpuCopyStatus) -> p.GpuCopyStatusReply:
        return self.service.status(self._engine(req.engine_id).engine_id, req)

    def engine_gone(self, engine_id: str) -> None:
        """Before the daemon frees a leaving engine's slots (see ``service.engine_gone``)."""
        self.service.engine_gone(engine_id)

    def poll(self) -> None:
        """Housekeeping: take the workers' reports, reap a dead or overrunning worker."""
        self.service.poll()

    def close(self) -> None:
        self.service.close()

    def _engine(self, engine_id: str) -> EngineRecord:
        return self._engines.live(engine_id, self._clock())

    def _arena(self) -> tuple[str, int, int]:
        arena, store = self._kv.arena, self._kv.store
        assert arena is not None and store is not None
        return arena.name, arena.size, store.slot_bytes
