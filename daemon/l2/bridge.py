"""The L2 tier as the event loop sees it: hooks on the host store, prefetches into the arena.

- Write-back (default): a block the host store evicts is copied out of its arena slot and
  queued for L2 before the slot is reused. Write-through: every committed block is queued
  at commit as well. Blocks known to be in L2 already (prefetched, or written through) are
  not written again when evicted.
- Fall-through: a ``lookup`` or ``load_begin`` that finds only a prefix on the host asks L2
  for the rest of the chain, on a worker thread. The blocks L2 had are placed in the arena
  as they arrive (reserved and committed by the daemon itself, owner ``L2_OWNER``); a
  lookup may wait for them within a bound (``waits``), the next lookup finds them.
- Nothing here waits on the store. Values are checked on the worker (checksum, key binding)
  and again for size here, so only whole blocks of the right layout reach the arena.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np

from tokencake.daemon.host_store import HostStore, StoreError
from tokencake.daemon.l2.backends import (
    DiskBackend,
    L2Backend,
    L2Error,
    RedisBackend,
    backend_class,
)
from tokencake.daemon.l2.codec import block_key, key_prefix
from tokencake.daemon.l2.tier import L2Metrics, L2Tier
from tokencake.daemon.store_views import slot_tag, whole_blocks

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from tokencake.daemon.config import DaemonConfig

logger = logging.getLogger(__name__)

L2_OWNER: Final = 0
"""The owner id the daemon reserves prefetched slots under; engines get ids from 1."""

_MAX_PREFIXES: Final = 4096
_MAX_AGENTS: Final = 16384
_MAX_CHAIN: Final = 4096
_MAX_SAMPLES: Final = 1024


@dataclass(slots=True, frozen=True)
class _Chain:
    """Which blocks a prefetch is for: the token that comes back with its result."""

    layout: int
    salt: str
    hashes: tuple[bytes, ...]
    agent: tuple[str, str] | None = None
    """The agent an upload's prefetch is for."""


@dataclass(slots=True)
class TierMoves:
    """What the scheduler learns from the tier since it last asked (``L2Bridge.take_moves``)."""

    to_l2: dict[int, int]
    """Blocks written back on eviction, by the agent tag of their slot."""
    to_host: list[tuple[str, str, int]]
    """``(app, agent, blocks)`` an upload's prefetch placed back in the arena."""
    fetches: list[tuple[int, float, int]]
    """``(bytes, seconds, blocks)`` of each timed fetch that found blocks."""
    lost: dict[int, int] = field(default_factory=dict)
    """Blocks evicted and not written to L2 (the write was dropped: queue full, store
    down), by agent tag: gone from this host and not in L2."""


class L2Bridge:
    def __init__(self, tier: L2Tier, *, namespace: str, write_through: bool = False) -> None:
        self.tier = tier
        self.namespace = namespace
        self.write_through = write_through
        self._store: HostStore | None = None
        self._rows: np.ndarray | None = None
        self._prefixes: dict[tuple[int, str], bytes] = {}
        # slot -> (layout, salt, hash) of blocks known to be in L2: no write-back needed.
        self._clean: dict[int, tuple[int, str, bytes]] = {}
        self._inflight: set[tuple[int, str, bytes]] = set()
        # (app, agent) -> (layout, salt, chain hashes) of the KV it last stored: what an
        # upload decision for it brings back.
        self._chains: OrderedDict[tuple[str, str], tuple[int, str, list[bytes]]] = OrderedDict()
        self.placed_blocks = 0
        self.written_back = 0
        self.written_through = 0
        self._moves = TierMoves({}, [], [])

    def attach(self, store: HostStore, rows: np.ndarray) -> None:
        """Start serving a formatted store; ``rows`` is the arena's ``(num_slots, slot_bytes)``
        view."""
        self._store = store
        self._rows = rows

    # ------------------------------------------------------------------ keys

    def _prefix(self, layout: int, salt: str) -> bytes:
        prefix = self._prefixes.get((layout, salt))
        if prefix is None:
            assert self._store is not None
            if len(self._prefixes) >= _MAX_PREFIXES:
                self._prefixes.clear()
            prefix = key_prefix(self.namespace, self._store.layout_fingerprint(layout), salt)
            self._prefixes[(layout, salt)] = prefix
        return prefix

    # ------------------------------------------------------------------ writes

    def on_evict(self, slot: int) -> None:
        """HostStore hook: ``slot`` is about to be reused; save its block unless L2 has it."""
        store, rows = self._store, self._rows
        if store is None or rows is None:
            return
        ident = store.slot_key(slot)
        tag = slot_tag(store, slot)
        if self._clean.pop(slot, None) != ident:
            if not self._put(slot, ident):
                # Dropped (counted): gone from this host, not in L2; an agent's block is
                # reported lost, so the scheduler stops counting on it.
                if tag:
                    self._moves.lost[tag] = self._moves.lost.get(tag, 0) + 1
                return
            self.written_back += 1
        if tag:  # an agent's block: the scheduler learns that it now lives in L2
            self._moves.to_l2[tag] = self._moves.to_l2.get(tag, 0) + 1

    def committed(self, slots: list[int]) -> None:
        """An engine committed ``slots``; in write-through mode, queue them for L2 now."""
        if not self.write_through or self._store is None:
            return
        for slot in slots:
            ident = self._store.slot_key(slot)
            if self._put(slot, ident):
                self._clean[slot] = ident
                self.written_through += 1

    def _put(
        self, slot: int, ident: tuple[int, str, bytes], wait_until: float | None = None
    ) -> bool:
        assert self._store is not None and self._rows is not None
        layout, salt, chain_hash = ident
        nbytes = self._store.layout_bytes(layout)
        key = block_key(self._prefix(layout, salt), chain_hash)
        return self.tier.put(key, self._rows[slot, :nbytes], wait_until=wait_until)

    def flush_arena(self, timeout_s: float) -> tuple[int, int]:
        """At stop: write every whole block held only in the arena to L2, waiting at most
        ``timeout_s`` in all. Returns ``(flushed, not_flushed)``; the second is counted as
        dropped writes (reason ``shutdown``) and logged."""
        store = self._store
        if store is None or self._rows is None or timeout_s <= 0:
            return 0, 0
        deadline = time.monotonic() + timeout_s
        self.tier.flush(timeout_s)  # earlier write-backs first, so the count below is ours
        metrics = self.tier.metrics
        before = metrics.value("tokencake_l2_blocks", op="put", result="stored")
        dirty = [
            (s, ident)
            for s in whole_blocks(store)
            if self._clean.get(s) != (ident := store.slot_key(s))
        ]
        queued = 0
        for slot, ident in dirty:
            if time.monotonic() >= deadline:
                break
            queued += self._put(slot, ident, wait_until=deadline)
        self.tier.flush(max(0.0, deadline - time.monotonic()))
        stored = metrics.value("tokencake_l2_blocks", op="put", result="stored") - before
        flushed = min(stored, queued)
        missed = len(dirty) - flushed
        if missed:
            metrics.dropped.labels("shutdown").inc(missed)
            logger.warning(
                "L2 flush at stop: %d blocks written, %d not (within %.1fs)",
                flushed,
                missed,
                timeout_s,
            )
        else:
            logger.info("L2 flush at stop: %d blocks written", flushed)
        return flushed, missed

    # ------------------------------------------------------------------ agents

    def remember(
        self, app_id: str, agent_id: str, layout: int, salt: str, hashes: list[bytes]
    ) -> None:
        """An agent stored ``hashes`` (one reserve): keep its chain, in order, for an upload.

        A reserve that starts with the chain's first hash restarts it (the agent stored its
        context again); any other continues it.
        """
        key = (app_id, agent_id)
        known = self._chains.pop(key, None)
        if known is None or known[0] != layout or known[1] != salt or hashes[:1] == known[2][:1]:
            chain = list(hashes)
        else:
            seen = set(known[2])
            chain = known[2] + [h for h in hashes if h not in seen]
        self._chains[key] = (layout, salt, chain[:_MAX_CHAIN])
        if len(self._chains) > _MAX_AGENTS:
            self._chains.popitem(last=False)

    def upload(self, app_id: str, agent_id: str) -> bool:
        """The scheduler decided to upload this agent: fetch what of its chain left the host.

        The engine loads the agent's KV from the arena when its next call comes; blocks that
        were evicted to L2 meanwhile must be back by then. True when a prefetch was queued.
        """
        known = self._chains.get((app_id, agent_id))
        if known is None or self._store is None:
            return False
        layout, salt, chain = known
        on_host = self._store.resident_prefix(layout, salt, chain)
        agent = (app_id, agent_id)
        return on_host < len(chain) and self.missed(layout, salt, chain[on_host:], agent)

    # ------------------------------------------------------------------ reads

    def missed(
        self,
        layout: int,
        salt: str,
        hashes: list[bytes],
        agent: tuple[str, str] | None = None,
    ) -> bool:
        """The host store lacked ``hashes`` (the rest of a looked-up chain): ask L2 for them.

        Returns True when a prefetch was queued. One prefetch per chain start is in flight at
        a time; a repeated lookup while it runs asks for nothing more.
        """
        if not hashes or self._store is None:
            return False
        start = (layout, salt, hashes[0])
        if start in self._inflight:
            return False
        prefix = self._prefix(layout, salt)
        keys = [block_key(prefix, h) for h in hashes]
        if not self.tier.get(_Chain(layout, salt, tuple(hashes), agent), keys):
            return False
        self._inflight.add(start)
        return True

    def in_flight(self, start: tuple[int, str, bytes]) -> bool:
        """A prefetch from ``(layout, salt, first hash)`` is queued or running."""
        return start in self._inflight

    def take_moves(self) -> TierMoves | None:
        """What moved between the arena and L2 since the last call (for the scheduler);
        None when nothing did."""
        moves = self._moves
        if not (moves.to_l2 or moves.to_host or moves.fetches or moves.lost):
            return None
        self._moves = TierMoves({}, [], [])
        return moves

    @property
    def busy(self) -> bool:
        return self.tier.gets_in_flight > 0

    def poll(self, limit: int = 64) -> int:
        """Place finished prefetches in the arena; returns how many blocks were placed."""
        placed = 0
        for job in self.tier.completed(limit):
            chain = job.token
            assert isinstance(chain, _Chain)
            self._inflight.discard((chain.layout, chain.salt, chain.hashes[0]))
            if not job.payloads:
                continue
            if len(self._moves.fetches) < _MAX_SAMPLES:
                nbytes = sum(len(v) for v in job.payloads)
                self._moves.fetches.append((nbytes, job.seconds, len(job.payloads)))
            try:
                fresh = self._place(chain, job.payloads)
            except Exception:  # a bug costs one prefetch, never the event loop
                logger.exception("placing an L2 prefetch failed")
                continue
            placed += fresh
            if chain.agent is not None and fresh:
                self._moves.to_host.append((*chain.agent, fresh))
        self.placed_blocks += placed
        return placed

    def _place(self, chain: _Chain, payloads: list[memoryview]) -> int:
        store, rows = self._store, self._rows
        if store is None or rows is None:
            return 0
        nbytes = store.layout_bytes(chain.layout)
        good = 0
        for payload in payloads:
            if len(payload) != nbytes:
                self.tier.metrics.rejected.labels("size").inc()
                break
            good += 1
        if not good:
            return 0
        hashes = list(chain.hashes[:good])
        try:
            slots = store.reserve(L2_OWNER, chain.layout, chain.salt, hashes)
        except StoreError as exc:
            self.tier.metrics.ops.labels("prefetch", "no_space").inc(good)
            logger.debug("prefetch not placed: %s", exc)
            return 0
        fresh: list[int] = []
        present: list[bytes] = []
        for i, slot in enumerate(slots):
            if slot < 0:
                present.append(hashes[i])
                continue
            rows[slot, :nbytes] = np.frombuffer(payloads[i], dtype=np.uint8)
            fresh.append(slot)
        if present:
            # Stored meanwhile by an engine: reserve added our holder reference; give it back.
            store.drop(chain.layout, chain.salt, present)
        if fresh:
            store.commit(L2_OWNER, fresh)
            for slot in fresh:
                self._clean[slot] = store.slot_key(slot)
        self.tier.metrics.ops.labels("prefetch", "placed").inc(len(fresh))
        self.tier.metrics.ops.labels("prefetch", "no_space").inc(good - len(slots))
        return len(fresh)

    # ------------------------------------------------------------------ lifecycle

    def stats(self) -> dict[str, int]:
        """What ``tokencake-ctl status --json`` shows under ``l2``."""
        m = self.tier.metrics
        return {
            "placed_blocks": self.placed_blocks,
            "written_back": self.written_back,
            "written_through": self.written_through,
            "queued_bytes": self.tier.pending_bytes,
            "prefetches_in_flight": self.tier.gets_in_flight,
            "available": int(self.tier.available),
            "stored_blocks": m.value("tokencake_l2_blocks", op="put", result="stored"),
            "hit_blocks": m.value("tokencake_l2_blocks", op="get", result="hit"),
            "missed_blocks": m.value("tokencake_l2_blocks", op="get", result="miss"),
            "dropped_writes": m.total("tokencake_l2_dropped_writes"),
            "rejected_values": m.total("tokencake_l2_rejected_values"),
        }

    def close(self) -> None:
        """Stop the workers and drop the arena view (before the arena is unmapped)."""
        self._rows = None
        self._store = None
        self.tier.close()


def open_bridge(config: DaemonConfig, registry: CollectorRegistry | None = None) -> L2Bridge:
    """The L2 tier ``config`` asks for. Raises :class:`L2Error` with a one-line reason.

    Connecting is left to the workers: a store that is down at start is a store that is
    down, not a daemon that cannot start.
    """
    name = config.l2_backend
    cls = backend_class(name)
    backend: L2Backend
    try:
        if issubclass(cls, DiskBackend):
            backend = DiskBackend(config.l2_dir, capacity_bytes=config.l2_disk_bytes)
        elif issubclass(cls, RedisBackend):
            backend = cls(config.l2_url, timeout_s=config.l2_timeout_s, ttl_s=config.l2_ttl_s)
        else:
            raise L2Error(f"l2_backend {name}: no way to configure {cls.__name__}")
    except ImportError as exc:
        raise L2Error(f"l2_backend {name} needs {exc.name}: pip install 'tokencake[l2]'") from None
    except ValueError as exc:
        raise L2Error(f"l2_url: {exc}") from None
    tier = L2Tier(
        backend,
        queue_bytes=config.l2_queue_bytes,
        workers=config.l2_workers,
        batch=config.l2_batch,
        retry_s=config.l2_retry_s,
        metrics=L2Metrics(registry),
    )
    logger.info("L2 tier on %s (%s, namespace %s)", name, config.l2_mode, config.l2_namespace)
    return L2Bridge(
        tier, namespace=config.l2_namespace, write_through=config.l2_mode == "write-through"
    )
