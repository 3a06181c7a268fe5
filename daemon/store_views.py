"""Read-only views of a ``HostStore``: its counts, who uses its slots, a comparable snapshot
and an invariant check. ``snapshot`` and ``check_invariants`` are O(n), for tests and
debugging; the usage views serve ``tokencake-ctl pool`` and ``engines``. None of them is on
a KV op's path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from tokencake.daemon.slot_table import FREE, READING, READY, WRITING, key_digest

if TYPE_CHECKING:
    from tokencake.daemon.host_store import HostStore


@dataclass(slots=True)
class StoreStats:
    """The store's part of ``protocol.PoolStats``, under the same names (``kv_service``
    passes them through as they are)."""

    num_slots: int
    slot_bytes: int
    free: int
    writing: int
    ready: int
    reading: int
    evictions: int
    hits: int
    misses: int


def stats(store: HostStore) -> StoreStats:
    t = store._t
    return StoreStats(
        num_slots=t.num_slots,
        slot_bytes=store._slot_bytes,
        free=t.count(FREE),
        writing=t.count(WRITING),
        ready=t.count(READY),
        reading=t.count(READING),
        evictions=store._evictions,
        hits=store._hits,
        misses=store._misses,
    )


def whole_blocks(store: HostStore) -> list[int]:
    """Slots holding a whole block (ready, or being read); for the L2 tier's flush at stop."""
    t = store._t
    return [*t.iter_state(READY), *t.iter_state(READING)]


def slot_tag(store: HostStore, slot: int) -> int:
    """The agent tag a slot was reserved with (0: none); for the L2 tier's write-back."""
    return int(store._t.m_tag[slot])


def usage_by_owner(store: HostStore) -> dict[int, int]:
    """Occupied slots per owner that stored them (writing, ready or being read)."""
    t = store._t
    owners = t.owner[t.state != FREE]
    ids, counts = np.unique(owners, return_counts=True)
    return {int(i): int(c) for i, c in zip(ids, counts, strict=True)}


def usage_by_tenant(store: HostStore) -> dict[str, int]:
    """Occupied slots per tenant salt."""
    t = store._t
    if not store._tenant_names:
        return {}
    counts = np.bincount(t.tenant[t.state != FREE], minlength=len(store._tenant_names))
    return {name: int(counts[i]) for i, name in enumerate(store._tenant_names) if counts[i] > 0}


def leases_by_owner(store: HostStore) -> dict[int, int]:
    """Slots each owner holds a lease on: its unfinished writes plus its pinned slots."""
    t = store._t
    out: dict[int, int] = {}
    for s in t.iter_state(WRITING):
        o = t.m_owner[s]
        out[o] = out.get(o, 0) + 1
    for owner, pins in store._pins.items():
        if pins:
            out[owner] = out.get(owner, 0) + len(pins)
    return out


def snapshot(store: HostStore) -> dict[str, Any]:
    """Every bit of mutable state, as comparable values. O(n): for tests and debugging."""
    t = store._t
    arrays = {
        name: getattr(t, name).tobytes()
        for name in (
            "state",
            "prev",
            "next",
            "owner",
            "deadline",
            "readers",
            "holders",
            "layout",
            "tenant",
            "tag",
            "digest",
            "key_len",
            "keys",
        )
    }
    return {
        **arrays,
        "counts": list(t.counts),
        "index": store._index.entries.tobytes(),
        "index_len": len(store._index),
        "layouts": dict(store._layouts),
        "layout_bytes": list(store._layout_bytes),
        "tenants": dict(store._tenants),
        "pins": {
            o: {s: (p.count, p.deadline) for s, p in pins.items()}
            for o, pins in store._pins.items()
        },
        "counters": (store._evictions, store._hits, store._misses),
    }


def check_invariants(store: HostStore) -> None:
    """Raise AssertionError when any internal invariant is broken. O(n)."""
    t = store._t
    t.check()
    indexed: set[int] = set()
    for s in store._index.entries[store._index.entries >= 0].tolist():
        if s in indexed:
            raise AssertionError(f"slot {s} indexed twice")
        indexed.add(s)
        key = t.key_of(s)
        layout, tenant = t.m_layout[s], t.m_tenant[s]
        if store._index.find(layout, tenant, key, key_digest(layout, tenant, key)) != s:
            raise AssertionError(f"slot {s} is indexed but not found by its key")
    if len(indexed) != len(store._index):
        raise AssertionError("index length is off")
    readers: dict[int, int] = {}
    for pins in store._pins.values():
        for s, pin in pins.items():
            if pin.count <= 0:
                raise AssertionError(f"empty pin on slot {s}")
            readers[s] = readers.get(s, 0) + pin.count
    for s in range(t.num_slots):
        st = t.m_state[s]
        if t.m_readers[s] != readers.get(s, 0):
            raise AssertionError(f"slot {s}: readers {t.m_readers[s]} != pins")
        doomed = st == READING and t.m_holders[s] == 0
        should_index = st != FREE and not doomed
        if (s in indexed) != should_index:
            raise AssertionError(f"slot {s} state {st} indexed={s in indexed}")
        if should_index and t.m_holders[s] <= 0:
            raise AssertionError(f"indexed slot {s} has no holder")
        if st == FREE and (t.m_holders[s] or t.m_key_len[s] or t.m_owner[s] != -1):
            raise AssertionError(f"free slot {s} was not cleared")
