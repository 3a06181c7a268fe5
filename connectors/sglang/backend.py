"""``TokenCakeStorage``: an SGLang HiCache storage backend (L3) backed by tokencaked.

Load it as a dynamic backend (SGLang 0.5.23)::

    --enable-hierarchical-cache --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "tokencake",
        "module_path": "tokencake.connectors.sglang.backend",
        "class_name": "TokenCakeStorage", "interface_v1": 1}'

SGLang builds it as ``TokenCakeStorage(storage_config, kwargs)`` and hands it the host pool
through ``register_mem_pool_host``; only then is the page geometry known, so that is where
the backend registers with the daemon (one engine per TP rank and pipeline stage) and maps
the daemon's arena.

Data path: ``interface_v1: 1`` makes SGLang call the zero-copy ``batch_get_v1`` /
``batch_set_v1`` with host-pool indices; pages move between the host pool and arena slots
with one numpy copy per piece. Without it SGLang calls ``batch_get``/``batch_set`` with one
flat tensor per page. Writes are two-phase: ``reserve``, copy, ``commit``; a page is
servable only once committed. Reads pin the longest ready prefix (``load_begin``), copy it,
and unpin (``load_end``), so a page cannot be evicted or rewritten while it is read.

SGLang calls a backend from three threads (prefetch queries, prefetch reads, backups). Every
daemon request goes through one lock-guarded client; copies run outside the lock.

Failure: a daemon that is down or slow costs one ``timeout_ms`` wait, then the link is down,
every call is a miss or a dropped write (counted in ``stats``), and the daemon is tried again
every ``reconnect_s``. Nothing here raises into SGLang's storage threads.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

import msgspec
import torch
from sglang.srt.mem_cache.hicache_storage import (
    HiCacheStorage,
    HiCacheStorageConfig,
    HiCacheStorageExtraInfo,
    PoolHitPolicy,
    PoolName,
    PoolTransfer,
    PoolTransferResult,
)

from tokencake import protocol as p
from tokencake.clients.client import DaemonLink
from tokencake.clients.kv_arena import ArenaMapping, KvArenaError
from tokencake.connectors.sglang.config import BackendConfig
from tokencake.connectors.sglang.pages import HostPages, page_key
from tokencake.segment import ArenaError, segment_path

logger = logging.getLogger(__name__)

R = TypeVar("R", bound=msgspec.Struct)

# The in-slot byte order: the pool's own piece order (zero-copy) or SGLang's flat page
# tensor (get/set). Part of the registered layout, so the two never mix.
KV_FORMAT_ZERO_COPY = "sglang-meta-v1"
KV_FORMAT_FLAT = "sglang-flat-v1"


@dataclass(slots=True)
class BackendStats:
    """Counters a test, a benchmark or an operator reads from ``TokenCakeStorage.stats``."""

    # Loads and saves through the host store.
    lookups: int = 0
    """Host store lookups of a run of page keys (``exists``, ``batch_exists``...)."""
    hit_pages: int = 0
    """Pages those lookups found in the host store."""
    loaded_pages: int = 0
    """Pages copied from the host store into SGLang's host pool."""
    load_failures: int = 0
    """Pages whose load failed (SGLang recomputes them)."""
    stored_pages: int = 0
    """Pages saved to the host store (committed)."""
    already_stored_pages: int = 0
    """Pages a save skipped: the host store held them already."""
    dropped_writes: int = 0
    """Pages SGLang asked to store that were not stored: daemon down or full, copy failed."""
    # The daemon link.
    daemon_failures: int = 0
    """Daemon calls (requests, heartbeats) that got no reply."""
    reconnects: int = 0
    """Times the daemon link came up again after being down."""
    decisions_ignored: int = 0
    """Daemon decisions pushed to this engine. A storage backend cannot move SGLang's GPU
    pages, so they are counted, not applied (see docs/sglang.md)."""


@dataclass(slots=True)
class _Lease:
    """What one daemon reply handed out, with the registration it belongs to."""

    epoch: int
    arena: ArenaMapping
    slots: list[int]


class _Link(DaemonLink):
    """The shared daemon link (``clients/client.py``) with what this backend adds: the
    daemon's arena mapped at each registration, and every request may register again first,
    renews the leases (SGLang has no step hook: the storage calls carry it) and drains the
    pushed decisions. SGLang's storage threads hold ``lock`` around every use."""

    def __init__(self, cfg: BackendConfig, stats: BackendStats) -> None:
        super().__init__(cfg, None, "", log=logger, reregister_at_once=True)
        self.stats = stats
        self.arena: ArenaMapping | None = None
        self.arena_ident: tuple[int, int] | None = None
        self.retired: list[ArenaMapping] = []
        self.prefault = cfg.prefault
        self.accept = self._map_arena

    def _map_arena(self, reg: p.RegisterEngineReply) -> bool:
        """Map the registration's arena, unless this mapping is of the same segment."""
        ident = _segment_identity(reg.arena_name)
        if self.arena is None or self.arena.name != reg.arena_name or ident != self.arena_ident:
            # A restarted daemon may reuse the segment's name (same instance, same pid in a
            # container) but never its inode: a mapping of the old one must not be reused.
            try:
                arena = ArenaMapping.open(
                    reg.arena_name,
                    reg.slot_bytes,
                    min_bytes=reg.arena_bytes,
                    populate=self.prefault,
                )
            except (ArenaError, KvArenaError, OSError) as exc:
                logger.error("cannot map tokencaked's arena %s: %s", reg.arena_name, exc)
                return False
            if self.arena is not None:
                # Another thread may still copy through it; it is unmapped at close().
                self.retired.append(self.arena)
            self.arena, self.arena_ident = arena, ident
        if self.epoch:
            self.stats.reconnects += 1
        return True

    def request(
        self, build: Callable[[str], p.Request[R]], *, epoch: int = 0, retry: bool = False
    ) -> R | None:
        """One request built for the current engine id; None when the daemon is down, slow,
        or refuses it.

        ``epoch`` (non-zero) ties the request to slots of that registration: after a
        re-registration it is not sent. ``retry`` registers again at once and sends again
        when the daemon forgot this engine (it restarted, or dropped an idle engine).
        """
        for _attempt in range(2 if retry else 1):
            now = time.monotonic()
            self.maybe_connect(now, wait=True)
            if not self.up or (epoch and epoch != self.epoch):
                return None
            self._heartbeat(now)
            if not self.up:
                continue
            reply = self.call(build(self.engine_id))
            if reply is not None:
                return reply
            self.stats.daemon_failures += 1
            if self.last_error != p.ErrorCode.UNKNOWN_ENGINE:
                return None
        return None

    def _heartbeat(self, now: float) -> None:
        """Renew leases when due and count the decisions the daemon pushed."""
        if self.reg is not None and now >= self.next_heartbeat:
            self.next_heartbeat = now + self.reg.heartbeat_s
            if self.call(p.EngineHeartbeat(self.engine_id)) is None:
                self.stats.daemon_failures += 1
                return
        self.stats.decisions_ignored += len(self.pushes())

    def close(self) -> None:
        super().close()
        for arena in [*self.retired, *([self.arena] if self.arena else [])]:
            try:
                arena.close()
            except ArenaError as exc:
                logger.debug("arena %s left mapped: %s", arena.name, exc)
        self.arena, self.retired = None, []


def _segment_identity(name: str) -> tuple[int, int] | None:
    """(device, inode) of the daemon's arena segment; None when it cannot be read."""
    try:
        st = os.stat(segment_path(name))
    except (ArenaError, OSError):
        return None
    return st.st_dev, st.st_ino


def _model_label(storage_config: HiCacheStorageConfig) -> str:
    name = storage_config.model_name or "model"
    parts = [name]
    if storage_config.pp_size > 1:
        parts.append(f"pp{storage_config.pp_rank}of{storage_config.pp_size}")
    if storage_config.attn_cp_size > 1:
        parts.append(f"cp{storage_config.attn_cp_rank}of{storage_config.attn_cp_size}")
    return ":".join(parts)


class TokenCakeStorage(HiCacheStorage):
    """See the module docstring."""

    def __init__(
        self, storage_config: HiCacheStorageConfig, kwargs: dict[str, Any] | None = None
    ) -> None:
        extra = dict(storage_config.extra_config or {})
        self.cfg = BackendConfig.from_extra(extra)
        if storage_config.dcp_size > 1:
            raise ValueError("TokenCakeStorage does not support decode context parallel (DCP)")
        self.storage_config = storage_config
        self.zero_copy = bool(extra.get("interface_v1", 0))
        self.stats = BackendStats()
        self._stats_lock = threading.Lock()
        self._link = _Link(self.cfg, self.stats)
        self._pages: HostPages | None = None

    # ------------------------------------------------------------------ registration

    def register_mem_pool_host(self, mem_pool_host: Any) -> None:
        """Learn the page geometry from the host pool, register, and map the arena.

        A daemon that is not up yet is not an error: the backend registers on a later call.
        """
        super().register_mem_pool_host(mem_pool_host)
        pages = HostPages(mem_pool_host)
        sc = self.storage_config
        kv_format = KV_FORMAT_ZERO_COPY if self.zero_copy else KV_FORMAT_FLAT
        pool = f"{type(mem_pool_host).__name__}:{pages.layout_name}"
        label = _model_label(sc)
        # MLA pages are the same on every TP rank (rank 0 writes, all read): one identity.
        rank, size = (0, 1) if sc.is_mla_model else (sc.tp_rank, sc.tp_size)
        layout = pages.kv_layout(f"{label}|{pool}|{kv_format}", tp_rank=rank, tp_size=size)
        self._pages = pages
        with self._link.lock:
            self._link.layout = layout
            self._link.name = self.cfg.engine_name or f"sglang:{label}:tp{rank}"[:256]
            self._link.maybe_connect(time.monotonic(), wait=True)

    def close(self) -> None:
        with self._link.lock:
            self._link.close()

    def _count(self, name: str, n: int) -> None:
        """Add to a counter; SGLang's storage threads call the backend concurrently."""
        with self._stats_lock:
            setattr(self.stats, name, getattr(self.stats, name) + n)

    def get_counters(self) -> dict[str, int]:
        """The counters of ``stats`` as a dict (``get_stats`` is SGLang's metrics hook)."""
        return asdict(self.stats)

    # ------------------------------------------------------------------ queries

    def _lookup(self, keys: list[str]) -> int:
        if not keys:
            return 0
        hashes = [page_key(k) for k in keys]
        salt = self.cfg.salt
        with self._link.lock:
            reply = self._link.request(lambda e: p.Lookup(e, hashes, salt), retry=True)
        self._count("lookups", 1)
        hits = reply.hit_blocks if reply is not None else 0
        self._count("hit_pages", hits)
        return hits

    def exists(self, key: str) -> bool:
        return self._lookup([key]) == 1

    def batch_exists(
        self, keys: list[str], extra_info: HiCacheStorageExtraInfo | None = None
    ) -> int:
        """How many leading keys the daemon holds, ready to read."""
        return self._lookup(list(keys))

    # ------------------------------------------------------------------ reads

    def _pin(self, keys: list[str]) -> _Lease | None:
        """Pin the longest ready prefix of ``keys`` for reading."""
        hashes = [page_key(k) for k in keys]
        salt = self.cfg.salt
        with self._link.lock:
            reply = self._link.request(lambda e: p.LoadBegin(e, hashes, salt), retry=True)
            if reply is None or not reply.slots or self._link.arena is None:
                return None
            return _Lease(self._link.epoch, self._link.arena, list(reply.slots))

    def _unpin(self, lease: _Lease) -> None:
        with self._link.lock:
            self._link.request(lambda e: p.LoadEnd(e, lease.slots), epoch=lease.epoch)

    def _read(self, keys: list[str], copy: Callable[[ArenaMapping, list[int]], None]) -> int:
        """Pin, copy with ``copy(arena, slots)``, unpin; the number of pages read."""
        if not keys:
            return 0
        lease = self._pin(keys)
        if lease is None:
            return 0
        try:
            copy(lease.arena, lease.slots)
        except Exception as exc:  # a failed copy fails its pages; it never reaches SGLang
            logger.warning("TokenCake read of %d pages failed: %s", len(lease.slots), exc)
            self._count("load_failures", len(lease.slots))
            return 0
        finally:
            self._unpin(lease)
        self._count("loaded_pages", len(lease.slots))
        return len(lease.slots)

    def batch_get_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Copy the longest stored prefix of ``keys`` into the host pool at ``host_indices``."""
        pages = self._pages
        if pages is None:
            return [False] * len(keys)
        n = self._read(
            list(keys),
            lambda arena, slots: pages.from_arena(arena.slots_view(), host_indices, slots),
        )
        return [i < n for i in range(len(keys))]

    def get(
        self,
        key: str,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> torch.Tensor | None:
        out = self.batch_get([key], [target_location] if target_location is not None else None)
        return out[0] if isinstance(out, list) else None

    def batch_get(
        self,
        keys: list[str],
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> list[torch.Tensor | None]:
        """Fill one flat page tensor per key (SGLang's non-zero-copy path); ``None`` from
        the first miss on. Without ``target_locations`` new uint8 tensors are returned."""
        keys = list(keys)
        layout = self._link.layout
        if layout is None or not keys:
            return [None] * len(keys)
        targets = list(target_locations) if target_locations is not None else []
        if targets and len(targets) != len(keys):
            return [None] * len(keys)
        if not targets:
            targets = [torch.empty(layout.bytes_per_block, dtype=torch.uint8) for _ in keys]

        def copy(arena: ArenaMapping, slots: list[int]) -> None:
            for slot, target in zip(slots, targets, strict=False):
                _check_page(target, layout.bytes_per_block)
                arena.read_blocks([slot], target.view(1, -1))

        n = self._read(keys, copy)
        return [targets[i] if i < n else None for i in range(len(keys))]

    # ------------------------------------------------------------------ writes

    def _write(
        self, keys: list[str], copy: Callable[[ArenaMapping, list[int], list[int]], None]
    ) -> list[bool]:
        """Reserve, copy with ``copy(arena, page positions, slots)``, commit.

        A page is True when the daemon holds it afterwards (stored now or already); pages
        the daemon had no room for, or whose copy or commit failed, are False and counted.
        """
        if not keys:
            return []
        hashes = [page_key(k) for k in keys]
        salt = self.cfg.salt
        with self._link.lock:
            reply = self._link.request(lambda e: p.Reserve(e, hashes, salt), retry=True)
            epoch, arena = self._link.epoch, self._link.arena
        if reply is None or arena is None:
            self._count("dropped_writes", len(keys))
            return [False] * len(keys)
        result = [False] * len(keys)
        todo = [(i, s) for i, s in enumerate(reply.slots) if s >= 0]
        for i, s in enumerate(reply.slots):
            if s < 0:
                result[i] = True
        self._count("already_stored_pages", len(reply.slots) - len(todo))
        slots = [s for _, s in todo]
        if todo:
            try:
                copy(arena, [i for i, _ in todo], slots)
                with self._link.lock:
                    done = self._link.request(lambda e: p.Commit(e, slots), epoch=epoch)
            except Exception as exc:  # a failed copy fails its pages; it never reaches SGLang
                logger.warning("TokenCake write of %d pages failed: %s", len(slots), exc)
                done = None
                with self._link.lock:
                    self._link.request(lambda e: p.Abort(e, slots), epoch=epoch)
            if done is not None and done.committed == len(slots):
                for i, _ in todo:
                    result[i] = True
                self._count("stored_pages", len(slots))
        self._count("dropped_writes", result.count(False))
        return result

    def batch_set_v1(
        self,
        keys: list[str],
        host_indices: torch.Tensor,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> list[bool]:
        """Store the host pool's pages at ``host_indices`` under ``keys``."""
        pages = self._pages
        if pages is None:
            self._count("dropped_writes", len(keys))
            return [False] * len(keys)
        ps = pages.page_size

        def copy(arena: ArenaMapping, positions: list[int], slots: list[int]) -> None:
            if positions == list(range(len(positions))):
                index = host_indices[: len(positions) * ps]
            else:
                index = torch.cat([host_indices[i * ps : (i + 1) * ps] for i in positions])
            pages.to_arena(arena.slots_view(), index, slots)

        return self._write(list(keys), copy)

    def set(
        self,
        key: str,
        value: Any | None = None,
        target_location: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        return self.batch_set([key], [value])

    def batch_set(
        self,
        keys: list[str],
        values: Any | None = None,
        target_locations: Any | None = None,
        target_sizes: Any | None = None,
    ) -> bool:
        """Store one flat page tensor per key (SGLang's non-zero-copy path)."""
        keys = list(keys)
        layout = self._link.layout
        vals = list(values) if values is not None else []
        if layout is None or len(vals) != len(keys):
            self._count("dropped_writes", len(keys))
            return False

        def copy(arena: ArenaMapping, positions: list[int], slots: list[int]) -> None:
            for i, slot in zip(positions, slots, strict=True):
                _check_page(vals[i], layout.bytes_per_block)
                arena.write_blocks([slot], vals[i].reshape(1, -1))

        return all(self._write(keys, copy))

    # ------------------------------------------------------------------ v2 (per pool)

    def batch_exists_v2(
        self,
        keys: list[str],
        pool_transfers: list[PoolTransfer] | None = None,
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> PoolTransferResult:
        """KV pages only: a transfer for another pool that gates the hit (Mamba, SWA, DSA
        indexer) makes it a miss, since those pools are not stored here."""
        if any(t.hit_policy != PoolHitPolicy.BLOCK_GROUPS for t in pool_transfers or []):
            return PoolTransferResult(0, {}, [])
        hits = self._lookup(list(keys))
        return PoolTransferResult(
            hits, {PoolName.KV: hits} if hits else {}, list(range(1, hits + 1))
        )

    def batch_get_v2(
        self,
        transfers: list[PoolTransfer],
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> dict[str, list[bool]]:
        return {str(t.name): self._v2(t, load=True) for t in transfers}

    def batch_set_v2(
        self,
        transfers: list[PoolTransfer],
        extra_info: HiCacheStorageExtraInfo | None = None,
    ) -> dict[str, list[bool]]:
        return {str(t.name): self._v2(t, load=False) for t in transfers}

    def _v2(self, transfer: PoolTransfer, *, load: bool) -> list[bool]:
        keys = list(transfer.keys or [])
        default = getattr(self, "mem_pool_host", None)
        pool = getattr(self, "registered_pools", {}).get(transfer.name, default)
        if (
            transfer.name != PoolName.KV
            or transfer.host_indices is None
            or self._pages is None
            or pool is not self._pages.pool
        ):
            if not load:
                self._count("dropped_writes", len(keys))
            return [False] * len(keys)
        if load:
            return self.batch_get_v1(keys, transfer.host_indices)
        return self.batch_set_v1(keys, transfer.host_indices)


def _check_page(tensor: Any, nbytes: int) -> None:
    if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
        raise ValueError("a page must be a CPU tensor")
    if tensor.numel() * tensor.element_size() != nbytes:
        raise ValueError(f"a page of {tensor.numel() * tensor.element_size()} B, not {nbytes} B")
