"""Whole-state views of a ``HostStore`` for tests and debugging: a comparable snapshot and an
invariant check. Both are O(n) and read the store's internals; the store's hot paths never
call them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokencake.daemon.slot_table import FREE, READING, key_digest

if TYPE_CHECKING:
    from tokencake.daemon.host_store import HostStore


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
