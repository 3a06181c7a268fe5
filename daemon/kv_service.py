"""The KV service: the arena, the host store in it, the L2 tier under it, and the KV ops.

Engines copy KV bytes through the shared-memory arena themselves; these ops only move slots
through their states (reserve -> commit, begin_load -> end_load), and account each finished
copy: bytes moved, the copy's duration for the scheduler's cost model, and whose KV it was,
so that the scheduler learns when an agent's offload or upload is complete.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Literal

from tokencake import protocol as p
from tokencake.daemon.arena import Arena, slot_count
from tokencake.daemon.engines import EngineRecord, PendingCopies
from tokencake.daemon.host_store import HostStore
from tokencake.daemon.l2.waits import LookupWaits
from tokencake.daemon.parts import DaemonParts
from tokencake.daemon.timers import Timers
from tokencake.daemon.transport import DEFERRED, Deferred, PendingReply
from tokencake.protocol import ErrorCode, ProtocolError

if TYPE_CHECKING:
    from tokencake.daemon.l2.bridge import L2Bridge

logger = logging.getLogger(__name__)

L2_POLL_S = 0.002  # how often finished L2 prefetches are looked for while any is in flight


class KvService:
    def __init__(self, parts: DaemonParts, timers: Timers) -> None:
        self._parts = parts
        self._timers = timers
        self.arena: Arena | None = None
        self.store: HostStore | None = None
        self.l2: L2Bridge | None = None
        self._l2_polling = False
        self._waits = LookupWaits(timers)
        self.defer: Callable[[], PendingReply] | None = None
        """The dispatcher's ``defer``: set by the daemon; without it lookups never wait."""
        self.bytes_offloaded = 0
        self.bytes_uploaded = 0

    # ------------------------------------------------------------------ the pool

    def format(self, slot_bytes: int) -> HostStore:
        """Cut the arena into ``slot_bytes`` slots and build the store over them."""
        assert self.arena is not None
        num_slots = slot_count(self.arena.size, slot_bytes)
        if num_slots < 1:
            raise ProtocolError(ErrorCode.LAYOUT_REJECTED, "a block is larger than the arena")
        self.store = HostStore(
            num_slots,
            slot_bytes,
            clock=self._parts.clock,
            lease_s=self._parts.config().lease_s,
            eviction=self._parts.scheduler.eviction_policy(),
            on_evict=self.l2.on_evict if self.l2 is not None else None,
        )
        if self.l2 is not None:
            self.l2.attach(self.store, self.arena.slots(slot_bytes))
        logger.info("arena formatted", extra={"slot_bytes": slot_bytes, "num_slots": num_slots})
        return self.store

    def pool_stats(self) -> p.PoolStats:
        assert self.arena is not None
        if self.store is None:
            return p.PoolStats(self.arena.name, self.arena.size, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        counts = asdict(self.store.stats())
        return p.PoolStats(arena_name=self.arena.name, arena_bytes=self.arena.size, **counts)

    def host_room(self) -> int:
        """Slots an offload can take now (the scheduler's ``host_free``): the free ones, and
        with an L2 tier the ready ones too, since evicting one writes it to L2 and tells the
        scheduler whose it was. Without L2 an eviction loses the block, so only free count."""
        assert self.store is not None
        s = self.store.stats()
        return s.free + (s.ready if self.l2 is not None else 0)

    def close(self) -> None:
        self._waits.answer_all()
        if self.l2 is not None:
            # Blocks only the arena holds go to L2 first (bounded), then the workers stop.
            self.l2.flush_arena(self._parts.config().l2_flush_on_stop_s)
            self.l2.close()  # drops its arena view first
            self.l2 = None
        if self.arena is not None:
            self.arena.close()
            self.arena = None

    # ------------------------------------------------------------------ KV ops

    def _store_for(self, engine_id: str) -> tuple[EngineRecord, HostStore]:
        engine = self._parts.engines.live(engine_id, self._parts.clock())
        assert self.store is not None  # formatted by the first registration
        return engine, self.store

    def lookup(self, _identity: bytes, req: p.Lookup) -> p.LookupReply | Deferred:
        if self.l2 is not None and self._l2_wait(req):
            return DEFERRED
        return self._lookup_now(req)

    def _lookup_now(self, req: p.Lookup) -> p.LookupReply:
        engine, store = self._store_for(req.engine_id)
        slots = store.lookup(engine.layout_id, req.salt, req.hashes)
        if self.l2 is not None and len(slots) < len(req.hashes):
            self._l2_missed(engine.layout_id, req.salt, req.hashes[len(slots) :])
        self._parts.metrics.lookups.labels("hit").inc(len(slots))
        self._parts.metrics.lookups.labels("miss").inc(len(req.hashes) - len(slots))
        return p.LookupReply(hit_blocks=len(slots), slots=slots)

    def reserve(self, _identity: bytes, req: p.Reserve) -> p.ReserveReply:
        engine, store = self._store_for(req.engine_id)
        hashes = req.hashes
        app_id, agent_id = self._attribution(req.app_id, req.agent_id)
        # The agent's tag is taken only once the store accepted the request: a refused
        # request (duplicate hashes, no tenant left) changes nothing.
        tag = self._parts.scheduler.peek_tag(app_id, agent_id)
        slots = store.reserve(engine.owner, engine.layout_id, req.salt, hashes, tag)
        self._parts.scheduler.agent_tag(app_id, agent_id)
        if self.l2 is not None:
            if app_id and slots:
                self.l2.remember(app_id, agent_id, engine.layout_id, req.salt, hashes[: len(slots)])
            self._l2_report()  # the reserve may have evicted agents' blocks to L2
        started = (self._parts.clock(), app_id, agent_id)
        for slot in slots:
            if slot >= 0:
                engine.stores[slot] = started
        present = sum(1 for slot in slots if slot < 0)
        if app_id and present:
            # Already on the host (an earlier save): for this agent's offload those blocks
            # arrived at once. Without this the scheduler would wait for them forever.
            self._parts.apply(
                self._parts.scheduler.transfer_done(
                    engine.engine_id, app_id, agent_id, "d2h", present
                )
            )
        return p.ReserveReply(slots=slots)

    def commit(self, _identity: bytes, req: p.Commit) -> p.CommitReply:
        engine, store = self._store_for(req.engine_id)
        committed = store.commit(engine.owner, req.slots)
        if self.l2 is not None:
            self.l2.committed(list(req.slots))
        self._transfer_finished(engine, engine.stores, req.slots, committed, "d2h", req.copy_s)
        return p.CommitReply(committed=committed)

    def abort(self, _identity: bytes, req: p.Abort) -> p.AbortReply:
        engine, store = self._store_for(req.engine_id)
        aborted = store.abort(engine.owner, req.slots)
        for slot in req.slots:
            engine.stores.pop(slot, None)
        return p.AbortReply(aborted=aborted)

    def load_begin(self, _identity: bytes, req: p.LoadBegin) -> p.LoadBeginReply:
        engine, store = self._store_for(req.engine_id)
        app_id, agent_id = self._attribution(req.app_id, req.agent_id)
        hashes = req.hashes
        slots = store.begin_load(engine.owner, engine.layout_id, req.salt, hashes)
        if self.l2 is not None and len(slots) < len(hashes):
            self._l2_missed(engine.layout_id, req.salt, hashes[len(slots) :])
        started = (self._parts.clock(), app_id, agent_id)
        for slot in slots:
            engine.loads.setdefault(slot, started)
        return p.LoadBeginReply(slots=slots)

    def load_end(self, _identity: bytes, req: p.LoadEnd) -> p.LoadEndReply:
        engine, store = self._store_for(req.engine_id)
        released = store.end_load(engine.owner, req.slots)
        self._transfer_finished(engine, engine.loads, req.slots, released, "h2d", req.copy_s)
        return p.LoadEndReply(released=released)

    def drop(self, _identity: bytes, req: p.Drop) -> p.DropReply:
        engine, store = self._store_for(req.engine_id)
        return p.DropReply(dropped=store.drop(engine.layout_id, req.salt, req.hashes))

    def _attribution(self, app_id: str, agent_id: str) -> tuple[str, str]:
        """The agent a KV op names, if it is live. Attribution is optional: blocks of an app
        that just ended are still stored, only not accounted to an agent."""
        if not app_id:
            return "", ""
        try:
            self._parts.apps.agent(app_id, agent_id)
        except ProtocolError:
            return "", ""
        return app_id, agent_id

    # ------------------------------------------------------------------ copy accounting

    def _transfer_finished(
        self,
        engine: EngineRecord,
        pending: PendingCopies,
        slots: list[int],
        done: int,
        direction: Literal["d2h", "h2d"],
        copy_s: float = -1.0,
    ) -> None:
        """Account bytes, measure the copy, and tell the scheduler whose KV moved.

        The cost model learns from ``copy_s``, the engine's own measure of the copy, when it
        sent one (finite and positive); otherwise from the time since the reservation, an
        upper bound that includes the engine's wait for its next step.
        """
        now = self._parts.clock()
        nbytes = done * engine.layout.bytes_per_block
        label = "offload" if direction == "d2h" else "upload"
        if direction == "d2h":
            self.bytes_offloaded += nbytes
        else:
            self.bytes_uploaded += nbytes
        self._parts.metrics.bytes_moved.labels(label).inc(nbytes)
        per_agent: dict[tuple[str, str], int] = {}
        first = now
        for slot in slots:
            started_at, app_id, agent_id = pending.pop(slot, (now, "", ""))
            first = min(first, started_at)
            if app_id:
                per_agent[(app_id, agent_id)] = per_agent.get((app_id, agent_id), 0) + 1
        if not slots:
            return
        elapsed = now - first
        if math.isfinite(copy_s) and copy_s > 0:
            elapsed = min(copy_s, elapsed) if elapsed > 0 else copy_s
        self._parts.metrics.transfer_seconds.labels(label).observe(elapsed)
        self._parts.apply(
            self._parts.scheduler.transfer_measured(
                engine.engine_id, direction, nbytes, elapsed, len(slots)
            )
        )
        for (app_id, agent_id), blocks in per_agent.items():
            self._parts.apply(
                self._parts.scheduler.transfer_done(
                    engine.engine_id, app_id, agent_id, direction, blocks
                )
            )

    # ------------------------------------------------------------------ L2 prefetches

    def _l2_missed(self, layout: int, salt: str, hashes: list[bytes]) -> None:
        """Ask L2 for the blocks the host lacks."""
        assert self.l2 is not None
        self._l2_watch(self.l2.missed(layout, salt, hashes))

    def _l2_wait(self, req: p.Lookup) -> bool:
        """Hold the reply while L2 fetches the rest of the chain, up to
        ``l2_lookup_wait_ms``; True when the reply was deferred."""
        wait_s = self._parts.config().l2_lookup_wait_ms / 1000.0
        if wait_s <= 0 or self.defer is None or self._waits.full:
            return False
        assert self.l2 is not None
        engine, store = self._store_for(req.engine_id)
        layout, salt, hashes = engine.layout_id, req.salt, req.hashes
        on_host = store.resident_prefix(layout, salt, hashes)
        if on_host == len(hashes):
            return False
        start = (layout, salt, hashes[on_host])
        self._l2_watch(self.l2.missed(layout, salt, hashes[on_host:]))
        if not self.l2.in_flight(start):
            return False  # L2 not asked (down, or its queue full): answer now
        pending = self.defer()
        self._waits.add(start, wait_s, lambda: self._answer_late(pending, req))
        return True

    def _answer_late(self, pending: PendingReply, req: p.Lookup) -> None:
        try:
            pending.send(self._lookup_now(req))
        except ProtocolError as exc:  # the engine left meanwhile
            pending.fail(exc)

    def l2_upload(self, app_id: str, agent_id: str) -> None:
        """An upload needs the agent's KV in the arena: bring back what went to L2."""
        if self.l2 is not None:
            self._l2_watch(self.l2.upload(app_id, agent_id))

    def _l2_watch(self, queued: bool) -> None:
        """Poll for finished prefetches while any is in flight."""
        if queued and not self._l2_polling:
            self._l2_polling = True
            self._timers.schedule(L2_POLL_S, self._l2_poll)

    def _l2_report(self) -> None:
        """Tell the scheduler where agents' KV went (arena <-> L2) and what fetches cost."""
        assert self.l2 is not None
        moves = self.l2.take_moves()
        if moves is None:
            return
        scheduler = self._parts.scheduler
        for nbytes, seconds, blocks in moves.fetches:
            self._parts.apply(scheduler.l2_measured(nbytes, seconds, blocks))
        if moves.to_l2:
            self._parts.apply(scheduler.kv_to_l2(moves.to_l2))
        if moves.lost:
            self._parts.apply(scheduler.kv_lost(moves.lost))
        for app_id, agent_id, blocks in moves.to_host:
            self._parts.apply(scheduler.kv_from_l2(app_id, agent_id, blocks))

    def _l2_poll(self) -> None:
        assert self.l2 is not None
        try:
            self.l2.poll()
            self._l2_report()
            self._waits.settle(self.l2.in_flight)
        finally:
            if self.l2.busy:
                self._timers.schedule(L2_POLL_S, self._l2_poll)
            else:
                self._l2_polling = False
