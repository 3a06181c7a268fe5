"""Per-slot metadata of the host KV store, in flat numpy arrays.

One array per field, one row per slot, so a million slots cost a few dozen megabytes and no
Python object each. Every slot sits in exactly one intrusive doubly linked list, the list of
its state (free, writing, ready, reading), threaded through the ``prev``/``next`` arrays with
one sentinel per list. Moving a slot between states is O(1) and allocates nothing; the ready
list doubles as the LRU order (head = least recently used).

Scalar access from Python goes through memoryviews of the arrays (plain ints, about twice as
fast as numpy scalar indexing); the numpy arrays themselves serve vectorised scans.

``KeyIndex`` finds a key's slot: an open-addressing table of int32 slot ids over the keys and
32-bit digests the table holds, with no Python object per key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Final

import numpy as np

logger = logging.getLogger(__name__)

FREE: Final = 0
WRITING: Final = 1
READY: Final = 2
READING: Final = 3  # ready with at least one reader: never evicted
NUM_STATES: Final = 4
STATE_NAMES: Final = ("free", "writing", "ready", "reading")

KEY_BYTES: Final = 64  # the protocol's MAX_HASH_BYTES
NO_SLOT: Final = -1
INT32_MAX: Final = 2**31 - 1
INT32_MIN: Final = -(2**31)
MAX_LAYOUTS: Final = 2**15 - 1


def int_view(a: np.ndarray) -> memoryview:
    """A flat memoryview of an integer array: indexing it yields plain Python ints."""
    return a.data.cast("B").cast(a.dtype.char)


class SlotTable:
    """Slot metadata plus the four state lists. Knows nothing about keys' meaning or leases."""

    def __init__(self, num_slots: int) -> None:
        if num_slots <= 0 or num_slots > INT32_MAX - NUM_STATES:
            raise ValueError(f"num_slots must be in 1..{INT32_MAX - NUM_STATES}, got {num_slots}")
        n = num_slots
        self.num_slots = n
        self.state = np.zeros(n, dtype=np.uint8)
        # Sentinels of the four lists live at n + state.
        self.prev = np.empty(n + NUM_STATES, dtype=np.int32)
        self.next = np.empty(n + NUM_STATES, dtype=np.int32)
        self.owner = np.full(n, -1, dtype=np.int32)
        self.deadline = np.zeros(n, dtype=np.float64)
        self.readers = np.zeros(n, dtype=np.int32)
        self.holders = np.zeros(n, dtype=np.int32)
        self.layout = np.zeros(n, dtype=np.int16)
        self.tenant = np.zeros(n, dtype=np.int32)
        self.tag = np.zeros(n, dtype=np.int32)
        # Low 32 bits of the key's hash: the index's home position and a cheap first check.
        self.digest = np.zeros(n, dtype=np.uint32)
        self.key_len = np.zeros(n, dtype=np.uint8)
        self.keys = np.zeros((n, KEY_BYTES), dtype=np.uint8)

        # Free list in slot order: slot i links to i - 1 and i + 1.
        self.next[:n] = np.arange(1, n + 1, dtype=np.int32)
        self.prev[:n] = np.arange(-1, n - 1, dtype=np.int32)
        free_head = n + FREE
        self.prev[0] = free_head
        self.next[n - 1] = free_head
        self.next[free_head] = 0
        self.prev[free_head] = n - 1
        for st in (WRITING, READY, READING):
            self.next[n + st] = n + st
            self.prev[n + st] = n + st
        self.counts = [n, 0, 0, 0]

        self.m_state = int_view(self.state)
        self.m_prev = int_view(self.prev)
        self.m_next = int_view(self.next)
        self.m_owner = int_view(self.owner)
        self.m_deadline = self.deadline.data.cast("B").cast("d")
        self.m_readers = int_view(self.readers)
        self.m_holders = int_view(self.holders)
        self.m_layout = int_view(self.layout)
        self.m_tenant = int_view(self.tenant)
        self.m_tag = int_view(self.tag)
        self.m_digest = int_view(self.digest)
        self.m_key_len = int_view(self.key_len)
        self.m_keys = int_view(self.keys.reshape(-1))

    # ------------------------------------------------------------------ lists

    def move(self, slot: int, state: int) -> None:
        """Unlink ``slot`` from its list and append it to the tail of ``state``'s list."""
        prv, nxt = self.m_prev, self.m_next
        old = self.m_state[slot]
        p = prv[slot]
        q = nxt[slot]
        nxt[p] = q
        prv[q] = p
        tail_sentinel = self.num_slots + state
        t = prv[tail_sentinel]
        nxt[t] = slot
        prv[slot] = t
        nxt[slot] = tail_sentinel
        prv[tail_sentinel] = slot
        self.m_state[slot] = state
        self.counts[old] -= 1
        self.counts[state] += 1

    def touch(self, slot: int) -> None:
        """Move ``slot`` to the tail (most recent end) of its own list."""
        self.move(slot, self.m_state[slot])

    def first(self, state: int) -> int:
        """Head of ``state``'s list (least recent), or NO_SLOT when the list is empty."""
        s: int = self.m_next[self.num_slots + state]
        return NO_SLOT if s >= self.num_slots else s

    def after(self, slot: int) -> int:
        """The slot after ``slot`` in its list, or NO_SLOT at the end."""
        s: int = self.m_next[slot]
        return NO_SLOT if s >= self.num_slots else s

    def iter_state(self, state: int) -> Iterator[int]:
        """Slots of one state, head first. Do not move the current slot while iterating."""
        nxt = self.m_next
        n = self.num_slots
        s = nxt[n + state]
        while s < n:
            yield s
            s = nxt[s]

    def count(self, state: int) -> int:
        return self.counts[state]

    # ------------------------------------------------------------------ keys

    def set_key(self, slot: int, layout: int, tenant: int, key: bytes, digest: int) -> None:
        base = slot * KEY_BYTES
        n = len(key)
        self.m_keys[base : base + n] = key
        self.m_key_len[slot] = n
        self.m_layout[slot] = layout
        self.m_tenant[slot] = tenant
        self.m_digest[slot] = digest

    def key_equals(self, slot: int, layout: int, tenant: int, key: bytes) -> bool:
        n = len(key)
        if self.m_key_len[slot] != n or self.m_layout[slot] != layout:
            return False
        if self.m_tenant[slot] != tenant:
            return False
        base = slot * KEY_BYTES
        return self.m_keys[base : base + n] == key

    def key_of(self, slot: int) -> bytes:
        base = slot * KEY_BYTES
        return bytes(self.m_keys[base : base + self.m_key_len[slot]])

    def clear(self, slot: int) -> None:
        """Reset a slot's fields (not its list membership) when it goes back to FREE."""
        self.m_owner[slot] = -1
        self.m_deadline[slot] = 0.0
        self.m_readers[slot] = 0
        self.m_holders[slot] = 0
        self.m_tag[slot] = 0
        self.m_key_len[slot] = 0

    # ------------------------------------------------------------------ accounting

    def nbytes(self) -> int:
        """Bytes held by the metadata arrays."""
        arrays = (
            self.state,
            self.prev,
            self.next,
            self.owner,
            self.deadline,
            self.readers,
            self.holders,
            self.layout,
            self.tenant,
            self.tag,
            self.digest,
            self.key_len,
            self.keys,
        )
        return sum(a.nbytes for a in arrays)

    def check(self) -> None:
        """Verify that lists, states and counts agree. O(n); for tests and debugging."""
        n = self.num_slots
        seen = np.zeros(n, dtype=np.bool_)
        for st in range(NUM_STATES):
            count = 0
            prev = n + st
            for s in self.iter_state(st):
                if seen[s]:
                    raise AssertionError(f"slot {s} in two lists")
                seen[s] = True
                if self.m_state[s] != st:
                    raise AssertionError(
                        f"slot {s} in {STATE_NAMES[st]} list has state {self.m_state[s]}"
                    )
                if self.m_prev[s] != prev:
                    raise AssertionError(f"slot {s} has a broken prev link")
                prev = s
                count += 1
            if self.m_prev[n + st] != prev:
                raise AssertionError(f"{STATE_NAMES[st]} list tail is broken")
            if count != self.counts[st]:
                raise AssertionError(f"{STATE_NAMES[st]} count {self.counts[st]} != {count}")
        if not seen.all():
            raise AssertionError(f"slots in no list: {np.flatnonzero(~seen)[:10]}")
        reading = self.state == READING
        if (self.readers[reading] <= 0).any() or (self.readers[~reading] != 0).any():
            raise AssertionError("reader counts disagree with the reading state")


# --------------------------------------------------------------------------- key index

_DIGEST_MASK: Final = 0xFFFFFFFF
_EMPTY: Final = -1


def key_digest(layout: int, tenant: int, key: bytes) -> int:
    """32-bit digest of a block key. Collisions are fine: the index compares full keys."""
    return hash((layout, tenant, key)) & _DIGEST_MASK


class KeyIndex:
    """Key -> slot, as an open-addressing table of int32 slot ids (linear probing).

    Four bytes per table entry and no Python object per key: a dict of a million int keys
    costs about 100 bytes per entry, this costs 8. The table never holds more than
    ``num_slots`` entries and has at least twice that capacity, so probes stay short.
    Deletion shifts the following entries back (no tombstones to accumulate).
    """

    def __init__(self, table: SlotTable) -> None:
        cap = 1
        while cap < 2 * table.num_slots:
            cap *= 2
        self._table = table
        self._mask = cap - 1
        self.entries = np.full(cap, _EMPTY, dtype=np.int32)
        self._m = int_view(self.entries)
        self._len = 0

    def __len__(self) -> int:
        return self._len

    @property
    def nbytes(self) -> int:
        return self.entries.nbytes

    def find(self, layout: int, tenant: int, key: bytes, digest: int) -> int:
        """The slot indexed under this key, or NO_SLOT."""
        m = self._m
        dig = self._table.m_digest
        mask = self._mask
        i = digest & mask
        while True:
            s: int = m[i]
            if s == _EMPTY:
                return NO_SLOT
            if dig[s] == digest and self._table.key_equals(s, layout, tenant, key):
                return s
            i = (i + 1) & mask

    def insert(self, slot: int) -> None:
        """Index ``slot`` under the key already written into the slot table."""
        m = self._m
        mask = self._mask
        i = self._table.m_digest[slot] & mask
        while m[i] != _EMPTY:
            i = (i + 1) & mask
        m[i] = slot
        self._len += 1

    def remove(self, slot: int) -> None:
        m = self._m
        dig = self._table.m_digest
        mask = self._mask
        i = dig[slot] & mask
        while m[i] != slot:
            if m[i] == _EMPTY:
                raise KeyError(f"slot {slot} is not indexed")
            i = (i + 1) & mask
        # Backward-shift: pull later entries of the probe run into the hole when their home
        # position does not lie cyclically in (hole, entry].
        j = i
        while True:
            j = (j + 1) & mask
            s = m[j]
            if s == _EMPTY:
                break
            home = dig[s] & mask
            if (i <= j and (home <= i or home > j)) or (i > j and home <= i and home > j):
                m[i] = s
                i = j
        m[i] = _EMPTY
        self._len -= 1
