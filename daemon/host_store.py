"""The host KV store: which arena slot holds which block, who may write or read it, and when.

Pure logic: no sockets, no threads, no wall clock (a monotonic clock is injected), no KV
bytes (those live in the arena; the store only hands out slot numbers). The server calls it
from one thread.

A block's key is (layout id, tenant id, chain hash). The same hash under another salt or
another layout is another key, so a tenant can never see another tenant's blocks and an
engine is never served bytes laid out for another model. A slot's life:

    FREE --reserve--> WRITING --commit--> READY <--begin_load / end_load--> READING
      ^                  |                  |                                 |
      +------abort, lease expiry, owner released                              |
      +------drop (holders reach 0) or eviction ----------+  (drop deferred until readers leave)

WRITING slots are indexed at reserve time so a second writer of the same block is told it is
stored already (-1), but only READY/READING slots are ever served. Every public method
validates all of its input before it changes anything: a failed call leaves the store exactly
as it was.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tokencake.daemon import store_views
from tokencake.daemon.eviction import EvictionPolicy, LruPolicy
from tokencake.daemon.slot_table import (
    FREE,
    INT32_MAX,
    INT32_MIN,
    KEY_BYTES,
    MAX_LAYOUTS,
    NO_SLOT,
    READING,
    READY,
    WRITING,
    KeyIndex,
    SlotTable,
    key_digest,
)
from tokencake.daemon.store_checks import (
    StoreError,
    check_hashes,
    check_layout,
    check_owner,
    check_salt,
    check_slots,
    is_int,
)
from tokencake.daemon.store_views import StoreStats
from tokencake.protocol import MAX_HASH_BYTES, MAX_NAME_CHARS, ErrorCode

logger = logging.getLogger(__name__)

assert MAX_HASH_BYTES <= KEY_BYTES


@dataclass(slots=True)
class _Pin:
    """One owner's read pins on one slot."""

    count: int
    deadline: float


class HostStore:
    """Slots of the CPU block buffer and the index over them. See the module docstring."""

    def __init__(
        self,
        num_slots: int,
        slot_bytes: int,
        *,
        clock: Callable[[], float],
        lease_s: float = 30.0,
        eviction: EvictionPolicy | None = None,
        on_evict: Callable[[int], None] | None = None,
    ) -> None:
        """``on_evict(slot)`` runs just before an evicted slot is cleared (the L2 tier's
        write-back); it may read the slot's key and bytes but must not call into the store."""
        if slot_bytes <= 0:
            raise ValueError(f"slot_bytes must be positive, got {slot_bytes}")
        if not lease_s > 0:
            raise ValueError(f"lease_s must be positive, got {lease_s}")
        self._t = SlotTable(num_slots)
        self._index = KeyIndex(self._t)
        self._slot_bytes = slot_bytes
        self._clock = clock
        self._lease_s = float(lease_s)
        self._policy = eviction if eviction is not None else LruPolicy()
        self._policy.bind(self._t)
        self._layouts: dict[str, int] = {}
        self._layout_names: list[str] = []
        self._layout_bytes: list[int] = []
        self._tenants: dict[str, int] = {}
        self._tenant_names: list[str] = []
        self._pins: dict[int, dict[int, _Pin]] = {}
        self._on_evict = on_evict
        self._evictions = 0
        self._hits = 0
        self._misses = 0

    # ------------------------------------------------------------------ properties

    @property
    def num_slots(self) -> int:
        return self._t.num_slots

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    @property
    def lease_s(self) -> float:
        return self._lease_s

    @property
    def policy(self) -> EvictionPolicy:
        return self._policy

    def metadata_nbytes(self) -> int:
        """Bytes of per-slot metadata: the slot arrays plus the index table."""
        return self._t.nbytes() + self._index.nbytes

    # ------------------------------------------------------------------ registration

    def register_layout(self, fingerprint: str, bytes_per_block: int) -> int:
        """Small layout id for a layout fingerprint; the same fingerprint gets the same id."""
        if not isinstance(fingerprint, str) or not 0 < len(fingerprint) <= MAX_NAME_CHARS:
            raise StoreError(ErrorCode.BAD_REQUEST, "fingerprint must be 1..256 characters")
        if not is_int(bytes_per_block) or bytes_per_block <= 0:
            raise StoreError(ErrorCode.BAD_REQUEST, f"bad bytes_per_block {bytes_per_block!r}")
        known = self._layouts.get(fingerprint)
        if known is not None:
            if self._layout_bytes[known] != bytes_per_block:
                raise StoreError(
                    ErrorCode.CONFLICT,
                    f"layout {fingerprint} registered with {self._layout_bytes[known]} bytes "
                    f"per block, not {bytes_per_block}",
                )
            return known
        if bytes_per_block > self._slot_bytes:
            raise StoreError(
                ErrorCode.LAYOUT_REJECTED,
                f"{bytes_per_block} bytes per block do not fit {self._slot_bytes}-byte slots",
            )
        if len(self._layout_bytes) >= MAX_LAYOUTS:
            raise StoreError(ErrorCode.LAYOUT_REJECTED, "too many layouts")
        layout = len(self._layout_bytes)
        self._layouts[fingerprint] = layout
        self._layout_names.append(fingerprint)
        self._layout_bytes.append(bytes_per_block)
        logger.info("layout %d = %s (%d bytes per block)", layout, fingerprint, bytes_per_block)
        return layout

    def layout_bytes(self, layout: int) -> int:
        check_layout(layout, len(self._layout_bytes))
        return self._layout_bytes[layout]

    def layout_fingerprint(self, layout: int) -> str:
        check_layout(layout, len(self._layout_bytes))
        return self._layout_names[layout]

    def slot_key(self, slot: int) -> tuple[int, str, bytes]:
        """``(layout id, tenant salt, chain hash)`` of an occupied slot."""
        (s,) = check_slots([slot], self._t.num_slots)
        t = self._t
        if t.m_state[s] == FREE:
            raise StoreError(ErrorCode.BAD_REQUEST, f"slot {s} is free")
        return t.m_layout[s], self._tenant_names[t.m_tenant[s]], t.key_of(s)

    def tenant_id(self, salt: str) -> int:
        """Intern a tenant salt as a small int."""
        check_salt(salt)
        return self._intern(salt)

    # ------------------------------------------------------------------ reads

    def lookup(self, layout: int, salt: str, hashes: Sequence[bytes]) -> list[int]:
        """Slots of the longest stored prefix of ``hashes``. Pins nothing."""
        check_layout(layout, len(self._layout_bytes))
        check_salt(salt)
        check_hashes(hashes)
        tenant = self._tenants.get(salt)
        found = [] if tenant is None else self._ready_prefix(layout, tenant, hashes, False)
        self._touch(found)
        self._hits += len(found)
        self._misses += len(hashes) - len(found)
        return found

    def resident_prefix(self, layout: int, salt: str, hashes: Sequence[bytes]) -> int:
        """How many of ``hashes``, from the first, are stored and servable. Unlike
        :meth:`lookup` it changes nothing: no recency, no hit or miss counted."""
        check_layout(layout, len(self._layout_bytes))
        check_salt(salt)
        check_hashes(hashes)
        tenant = self._tenants.get(salt)
        return 0 if tenant is None else len(self._ready_prefix(layout, tenant, hashes, False))

    def begin_load(self, owner: int, layout: int, salt: str, hashes: Sequence[bytes]) -> list[int]:
        """Pin the longest stored prefix for reading; pinned slots are never evicted."""
        check_owner(owner)
        check_layout(layout, len(self._layout_bytes))
        check_salt(salt)
        check_hashes(hashes)
        tenant = self._tenants.get(salt)
        found = [] if tenant is None else self._ready_prefix(layout, tenant, hashes, True)
        # Blocks asked for and found (or not): what an engine's load got from the store.
        self._hits += len(found)
        self._misses += len(hashes) - len(found)
        if not found:
            return found
        t = self._t
        deadline = self._clock() + self._lease_s
        pins = self._pins.setdefault(owner, {})
        for s in reversed(found):
            if t.m_state[s] == READY:
                self._policy.on_unevictable(s, t.m_tag[s])
                t.move(s, READING)
            t.m_readers[s] += 1
            self._policy.on_access(s, t.m_tag[s])
            pin = pins.get(s)
            if pin is None:
                pins[s] = _Pin(1, deadline)
            else:
                pin.count += 1
                pin.deadline = deadline
        return found

    def end_load(self, owner: int, slots: Sequence[int]) -> int:
        """Release one read pin of ``owner`` per listed slot."""
        check_owner(owner)
        checked = check_slots(slots, self._t.num_slots)
        pins = self._pins.get(owner, {})
        for s in checked:
            if s not in pins:
                raise StoreError(ErrorCode.NOT_OWNER, f"owner {owner} holds no pin on slot {s}")
        for s in reversed(checked):
            self._unpin(owner, s, 1)
        return len(checked)

    # ------------------------------------------------------------------ writes

    def reserve(
        self, owner: int, layout: int, salt: str, hashes: Sequence[bytes], tag: int = 0
    ) -> list[int]:
        """``slots[i]`` to write ``hashes[i]`` into, -1 where the block is stored already.

        A block already stored (or being written) gains a holder reference instead. When
        free and evictable slots run out, only a prefix is reserved; when not even the first
        block can be placed, NO_SPACE.
        """
        check_owner(owner)
        check_layout(layout, len(self._layout_bytes))
        check_salt(salt)
        check_hashes(hashes)
        if not is_int(tag) or not INT32_MIN <= tag <= INT32_MAX:
            raise StoreError(ErrorCode.BAD_REQUEST, f"tag {tag!r} is not an int32")
        if not hashes:
            return []
        tenant = self._tenants.get(salt)
        tid = len(self._tenant_names) if tenant is None else tenant
        if tid > INT32_MAX:
            raise StoreError(ErrorCode.BAD_REQUEST, "too many tenants")
        # Plan without touching anything: existing slot or NO_SLOT (needs a new one) per hash.
        digests = [key_digest(layout, tid, h) for h in hashes]
        plan: list[int] = []
        for h, d in zip(hashes, digests, strict=True):
            plan.append(NO_SLOT if tenant is None else self._index.find(layout, tid, h, d))
        prefix, victims = self._room_for(plan)
        # Mutate.
        if tenant is None:
            self._intern(salt)
        for v in victims:
            self._evict(v)
        deadline = self._clock() + self._lease_s
        t = self._t
        out: list[int] = []
        for i in range(prefix):
            s = plan[i]
            if s != NO_SLOT:
                if t.m_holders[s] < INT32_MAX:
                    t.m_holders[s] += 1
                out.append(-1)
                continue
            s = t.first(FREE)
            t.move(s, WRITING)
            t.m_owner[s] = owner
            t.m_deadline[s] = deadline
            t.m_holders[s] = 1
            t.m_tag[s] = tag
            t.set_key(s, layout, tid, hashes[i], digests[i])
            self._index.insert(s)
            out.append(s)
        return out

    def _room_for(self, plan: list[int]) -> tuple[int, list[int]]:
        """How many planned blocks get a slot (a prefix of them), and the victims to evict for
        it. NO_SPACE when not even the first one can be placed. Changes nothing."""
        t = self._t
        free = t.count(FREE)
        victims: list[int] = []
        needed = plan.count(NO_SLOT)
        if needed > free:
            protected = {s for s in plan if s != NO_SLOT}
            victims = self._valid_victims(needed - free, protected)
        budget = free + len(victims)
        prefix = 0
        used = 0
        for s in plan:
            if s == NO_SLOT:
                if used == budget:
                    break
                used += 1
            prefix += 1
        if prefix == 0:
            raise StoreError(
                ErrorCode.NO_SPACE,
                f"no free or evictable slot ({t.count(WRITING)} writing, "
                f"{t.count(READING)} pinned)",
            )
        return prefix, victims[: max(0, used - free)]

    def commit(self, owner: int, slots: Sequence[int]) -> int:
        """The owner wrote these slots completely: make them servable."""
        checked = self._check_writes(owner, slots)
        t = self._t
        for s in reversed(checked):
            t.move(s, READY)
            t.m_deadline[s] = 0.0
            self._policy.on_evictable(s, t.m_tag[s])
        return len(slots)

    def abort(self, owner: int, slots: Sequence[int]) -> int:
        """Give reserved slots back unwritten."""
        checked = self._check_writes(owner, slots)
        for s in checked:
            self._free_writing(s)
        return len(checked)

    def check_held(self, owner: int, slots: Sequence[int], *, writing: bool) -> None:
        """Raise unless ``owner`` holds every slot: reserved by it (``writing``), or pinned by
        its ``begin_load``. Changes nothing; the daemon's copy worker asks before a copy."""
        if writing:
            self._check_writes(owner, slots)
            return
        check_owner(owner)
        pins = self._pins.get(owner, {})
        for s in check_slots(slots, self._t.num_slots):
            if s not in pins:
                raise StoreError(ErrorCode.NOT_OWNER, f"owner {owner} holds no pin on slot {s}")

    def drop(self, layout: int, salt: str, hashes: Sequence[bytes]) -> int:
        """Release one holder reference per stored block; returns how many were released.

        A block whose last holder leaves is unindexed at once and freed when its last reader
        finishes. Blocks still being written and unknown hashes are skipped.
        """
        check_layout(layout, len(self._layout_bytes))
        check_salt(salt)
        check_hashes(hashes)
        tenant = self._tenants.get(salt)
        if tenant is None:
            return 0
        t = self._t
        hit: list[int] = []
        for h in hashes:
            s = self._index.find(layout, tenant, h, key_digest(layout, tenant, h))
            if s != NO_SLOT and t.m_state[s] != WRITING:
                hit.append(s)
        for s in hit:
            t.m_holders[s] -= 1
            if t.m_holders[s] > 0:
                continue
            self._index.remove(s)
            if t.m_state[s] == READY:
                self._policy.on_unevictable(s, t.m_tag[s])
                t.clear(s)
                t.move(s, FREE)
            # READING with no holder left: freed by the last end_load.
        return len(hit)

    # ------------------------------------------------------------------ leases

    def renew_leases(self, owner: int) -> int:
        """Push every write lease and read pin of ``owner`` to now + lease_s."""
        check_owner(owner)
        t = self._t
        deadline = self._clock() + self._lease_s
        renewed = 0
        for s in t.iter_state(WRITING):
            if t.m_owner[s] == owner:
                t.m_deadline[s] = deadline
                renewed += 1
        for pin in self._pins.get(owner, {}).values():
            pin.deadline = deadline
            renewed += 1
        return renewed

    def release_owner(self, owner: int) -> int:
        """Free the owner's unfinished writes and release its read pins (crash, unregister)."""
        check_owner(owner)
        t = self._t
        writes = [s for s in t.iter_state(WRITING) if t.m_owner[s] == owner]
        for s in writes:
            self._free_writing(s)
        pins = self._pins.get(owner, {})
        pinned = list(pins.items())
        for s, pin in pinned:
            self._unpin(owner, s, pin.count)
        if writes or pinned:
            logger.info("owner %d released: %d writes, %d pins", owner, len(writes), len(pinned))
        return len(writes) + len(pinned)

    def expire_leases(self) -> int:
        """Reclaim writes and read pins whose lease deadline has passed."""
        t = self._t
        now = self._clock()
        writes = [s for s in t.iter_state(WRITING) if t.m_deadline[s] < now]
        for s in writes:
            self._free_writing(s)
        expired = [
            (owner, s, pin.count)
            for owner, pins in self._pins.items()
            for s, pin in pins.items()
            if pin.deadline < now
        ]
        for owner, s, count in expired:
            self._unpin(owner, s, count)
        if writes or expired:
            logger.warning("leases expired: %d writes, %d pins", len(writes), len(expired))
        return len(writes) + len(expired)

    # ------------------------------------------------------------------ introspection

    def stats(self) -> StoreStats:
        return store_views.stats(self)

    def usage_by_owner(self) -> dict[int, int]:
        """Occupied slots per owner that stored them (writing, ready or being read)."""
        return store_views.usage_by_owner(self)

    def usage_by_tenant(self) -> dict[str, int]:
        """Occupied slots per tenant salt."""
        return store_views.usage_by_tenant(self)

    def leases_by_owner(self) -> dict[int, int]:
        """Slots each owner holds a lease on: its unfinished writes plus its pinned slots."""
        return store_views.leases_by_owner(self)

    def snapshot(self) -> dict[str, Any]:
        """Every bit of mutable state, as comparable values. O(n): for tests and debugging."""
        return store_views.snapshot(self)

    def check_invariants(self) -> None:
        """Raise AssertionError when any internal invariant is broken. O(n)."""
        store_views.check_invariants(self)

    # ------------------------------------------------------------------ internals

    def _ready_prefix(
        self, layout: int, tenant: int, hashes: Sequence[bytes], for_pin: bool
    ) -> list[int]:
        t = self._t
        st = t.m_state
        found: list[int] = []
        for h in hashes:
            s = self._index.find(layout, tenant, h, key_digest(layout, tenant, h))
            if s == NO_SLOT or st[s] == WRITING:
                break
            if for_pin and t.m_readers[s] == INT32_MAX:
                break
            found.append(s)
        return found

    def _touch(self, slots: list[int]) -> None:
        """Mark hits as recent; the prefix's first block ends up most recent."""
        t = self._t
        for s in reversed(slots):
            if t.m_state[s] == READY:
                t.touch(s)
            self._policy.on_access(s, t.m_tag[s])

    def _valid_victims(self, count: int, protected: set[int]) -> list[int]:
        picked = self._policy.victims(count, protected)
        t = self._t
        seen: set[int] = set()
        out: list[int] = []
        for v in picked[:count]:
            ok = (
                is_int(v)
                and 0 <= v < t.num_slots
                and v not in seen
                and v not in protected
                and t.m_state[v] == READY
            )
            if not ok:
                logger.warning("eviction policy %s offered bad victim %r", self._policy.name, v)
                continue
            seen.add(v)
            out.append(v)
        return out

    def _evict(self, s: int) -> None:
        t = self._t
        if self._on_evict is not None:
            try:
                self._on_evict(s)
            except Exception:  # a failed write-back loses an L2 copy, never the store
                logger.exception("eviction hook failed for slot %d", s)
        self._policy.on_unevictable(s, t.m_tag[s])
        self._index.remove(s)
        t.clear(s)
        t.move(s, FREE)
        self._evictions += 1

    def _free_writing(self, s: int) -> None:
        t = self._t
        self._index.remove(s)
        t.clear(s)
        t.move(s, FREE)

    def _unpin(self, owner: int, s: int, count: int) -> None:
        t = self._t
        pins = self._pins[owner]
        pin = pins[s]
        pin.count -= count
        if pin.count == 0:
            del pins[s]
            if not pins:
                del self._pins[owner]
        t.m_readers[s] -= count
        if t.m_readers[s] > 0:
            return
        if t.m_holders[s] == 0:
            t.clear(s)
            t.move(s, FREE)
        else:
            t.move(s, READY)
            self._policy.on_evictable(s, t.m_tag[s])

    def _intern(self, salt: str) -> int:
        tenant = self._tenants.get(salt)
        if tenant is None:
            tenant = len(self._tenant_names)
            self._tenants[salt] = tenant
            self._tenant_names.append(salt)
        return tenant

    def _check_writes(self, owner: int, slots: Sequence[int]) -> list[int]:
        check_owner(owner)
        checked = check_slots(slots, self._t.num_slots)
        t = self._t
        for s in checked:
            if t.m_state[s] != WRITING or t.m_owner[s] != owner:
                raise StoreError(
                    ErrorCode.NOT_OWNER, f"slot {s} is not being written by owner {owner}"
                )
        return checked
