"""Key -> slot for the host store: an open-addressing table of int32 slot ids.

A block's key is (layout id, tenant id, chain hash); the slot table holds the key bytes and a
32-bit digest per slot, and this index finds a key's slot without a Python object per key.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from tokencake.daemon.slot_table import NO_SLOT, SlotTable, int_view

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
