"""Engines joining, reporting and leaving: what each does to the store and the scheduler.

The first engine to register formats the arena (its block size becomes the slot size);
every engine gets a policy of its own in the scheduler. An engine that leaves, times out or
registers again under its name loses its leases.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tokencake import protocol as p
from tokencake.daemon.arena import SLOT_BASE_OFFSET
from tokencake.daemon.engines import EngineRecord
from tokencake.daemon.kv_service import KvService
from tokencake.daemon.parts import DaemonParts
from tokencake.layout import LayoutError
from tokencake.protocol import ErrorCode, ProtocolError

logger = logging.getLogger(__name__)


class EngineService:
    def __init__(
        self,
        parts: DaemonParts,
        kv: KvService,
        on_leave: Callable[[str], None] = lambda _engine_id: None,
    ) -> None:
        """``on_leave(engine_id)`` runs before a leaving engine's slots are freed."""
        self._parts = parts
        self._kv = kv
        self._on_leave = on_leave

    def register(self, identity: bytes, req: p.RegisterEngine) -> p.RegisterEngineReply:
        try:
            req.layout.validate()
        except LayoutError as exc:
            raise ProtocolError(ErrorCode.LAYOUT_REJECTED, str(exc)) from None
        store = self._kv.store
        if store is None:
            store = self._kv.format(req.layout.bytes_per_block)
        fingerprint = req.layout.fingerprint()
        layout_id = store.register_layout(fingerprint, req.layout.bytes_per_block)
        previous = self._parts.engines.by_name.get(req.name)
        if previous is not None:
            logger.info(
                "engine re-registered; releasing its old leases", extra={"engine_name": req.name}
            )
            self.drop(previous)
        owner = self._parts.engines.new_owner()
        engine_id = f"{req.name}#{owner}"
        self._parts.engines.add(
            EngineRecord(
                engine_id=engine_id,
                owner=owner,
                name=req.name,
                identity=identity,
                layout=req.layout,
                fingerprint=fingerprint,
                layout_id=layout_id,
                num_gpu_blocks=req.num_gpu_blocks,
                last_seen=self._parts.clock(),
            )
        )
        self._parts.scheduler.engine_registered(
            engine_id,
            req.num_gpu_blocks,
            req.layout.bytes_per_block,
            store.num_slots,
            self._parts.config().l2_fetch_bytes_per_s,
        )
        self._parts.metrics.engines.set(len(self._parts.engines))
        logger.info(
            "engine registered",
            extra={
                "engine_id": engine_id,
                "fingerprint": fingerprint,
                "model": req.layout.model_id,
            },
        )
        return self._registered_reply(engine_id, fingerprint)

    def _registered_reply(self, engine_id: str, fingerprint: str) -> p.RegisterEngineReply:
        """Where the engine finds the arena and its slots, and how often to report."""
        arena, store, cfg = self._kv.arena, self._kv.store, self._parts.config()
        assert arena is not None and store is not None
        return p.RegisterEngineReply(
            engine_id=engine_id,
            fingerprint=fingerprint,
            arena_name=arena.name,
            arena_bytes=arena.size,
            slot_bytes=store.slot_bytes,
            slot_offset=SLOT_BASE_OFFSET,
            num_slots=store.num_slots,
            lease_s=cfg.lease_s,
            heartbeat_s=min(cfg.lease_s, cfg.engine_timeout_s) / 3,
        )

    def heartbeat(self, _identity: bytes, req: p.EngineHeartbeat) -> p.EngineHeartbeatReply:
        engine = self._parts.engines.live(req.engine_id, self._parts.clock())
        engine.num_gpu_blocks_free = req.num_gpu_blocks_free
        engine.num_waiting = req.num_waiting
        engine.num_running = req.num_running
        store = self._kv.store
        assert store is not None
        renewed = store.renew_leases(engine.owner)
        self._parts.apply(
            self._parts.scheduler.engine_state(
                engine.engine_id,
                engine.num_gpu_blocks,
                req.num_gpu_blocks_free,
                req.num_waiting,
                req.num_running,
                store.num_slots,
                self._kv.host_room(),
                req.waiting_blocks,
            )
        )
        return p.EngineHeartbeatReply(leases_renewed=renewed)

    def unregister(self, _identity: bytes, req: p.UnregisterEngine) -> p.UnregisterEngineReply:
        engine = self._parts.engines.live(req.engine_id, self._parts.clock())
        return p.UnregisterEngineReply(released_slots=self.drop(engine))

    def drop(self, engine: EngineRecord) -> int:
        """Forget the engine; its leases are released. Returns how many."""
        self._on_leave(engine.engine_id)  # no copy may still write the slots freed below
        store = self._kv.store
        released = store.release_owner(engine.owner) if store is not None else 0
        self._parts.engines.remove(engine)
        self._parts.scheduler.engine_gone(engine.engine_id)
        self._parts.metrics.engines.set(len(self._parts.engines))
        return released

    def expire_silent(self, now: float) -> None:
        """Unregister the engines silent for longer than ``engine_timeout_s``."""
        for engine in self._parts.engines.silent(now, self._parts.config().engine_timeout_s):
            logger.warning(
                "engine timed out",
                extra={"engine_id": engine.engine_id, "engine_name": engine.name},
            )
            self.drop(engine)
