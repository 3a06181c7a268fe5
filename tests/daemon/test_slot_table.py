"""Slot lists: every slot in exactly one list, O(1) moves, LRU order kept by touch."""

from __future__ import annotations

import random

import numpy as np
import pytest

from tokencake.daemon.slot_table import (
    FREE,
    NO_SLOT,
    READING,
    READY,
    WRITING,
    SlotTable,
)


def test_fresh_table_is_all_free_in_slot_order() -> None:
    t = SlotTable(5)
    assert list(t.iter_state(FREE)) == [0, 1, 2, 3, 4]
    assert [t.count(s) for s in (FREE, WRITING, READY, READING)] == [5, 0, 0, 0]
    assert t.first(READY) == NO_SLOT
    t.check()


def test_move_and_touch_keep_lru_order() -> None:
    t = SlotTable(4)
    for s in (2, 0, 3):
        t.move(s, READY)
    assert list(t.iter_state(READY)) == [2, 0, 3]
    assert list(t.iter_state(FREE)) == [1]
    t.touch(2)
    assert list(t.iter_state(READY)) == [0, 3, 2]
    assert t.first(READY) == 0 and t.after(0) == 3 and t.after(2) == NO_SLOT
    t.move(3, FREE)
    assert list(t.iter_state(FREE)) == [1, 3]
    assert t.count(READY) == 2 and t.count(FREE) == 2
    t.check()


def test_single_slot_table() -> None:
    t = SlotTable(1)
    t.move(0, WRITING)
    assert t.first(FREE) == NO_SLOT
    t.move(0, READY)
    t.touch(0)
    assert list(t.iter_state(READY)) == [0]
    t.check()


def test_keys_round_trip_and_compare() -> None:
    t = SlotTable(3)
    key = bytes(range(64))
    t.set_key(1, 2, 7, key, 123)
    assert t.key_of(1) == key
    assert t.key_equals(1, 2, 7, key)
    assert not t.key_equals(1, 3, 7, key)  # other layout
    assert not t.key_equals(1, 2, 8, key)  # other tenant
    assert not t.key_equals(1, 2, 7, key[:-1])
    assert not t.key_equals(1, 2, 7, key[:-1] + b"\xff")
    t.set_key(1, 2, 7, b"ab", 5)  # shorter key overwrites a longer one
    assert t.key_of(1) == b"ab" and not t.key_equals(1, 2, 7, b"ab" + key[2:])


def test_random_moves_match_a_reference_model() -> None:
    rng = random.Random(7)
    n = 50
    t = SlotTable(n)
    model: list[list[int]] = [list(range(n)), [], [], []]
    for _ in range(3000):
        s = rng.randrange(n)
        dst = rng.randrange(4)
        for lst in model:
            if s in lst:
                lst.remove(s)
        model[dst].append(s)
        t.move(s, dst)
        t.m_readers[s] = 1 if dst == READING else 0
        if rng.random() < 0.05:
            t.check()
    for st in (FREE, WRITING, READY, READING):
        assert list(t.iter_state(st)) == model[st]
    t.check()
    assert (
        t.state == np.array([next(i for i, m in enumerate(model) if s in m) for s in range(n)])
    ).all()


def test_check_detects_corruption() -> None:
    t = SlotTable(4)
    t.move(1, READY)
    t.state[1] = WRITING  # state disagrees with list membership
    with pytest.raises(AssertionError):
        t.check()


def test_metadata_bytes_per_slot_is_bounded() -> None:
    t = SlotTable(1000)
    assert t.nbytes() / 1000 <= 120


def test_bad_sizes() -> None:
    for n in (0, -1, 2**31):
        with pytest.raises(ValueError):
            SlotTable(n)
