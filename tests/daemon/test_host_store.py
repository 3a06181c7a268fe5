"""HostStore: slot states, leases, tenant and layout isolation, atomic failures.

The property test drives random operation sequences against a plain-Python reference model
that predicts every result, including which blocks LRU eviction removes.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tokencake.daemon import host_store as host_store_mod
from tokencake.daemon import store_views
from tokencake.daemon.eviction import (
    EvictionPolicy,
    UnknownEvictionPolicyError,
    available_policies,
    make_policy,
    register_policy,
)
from tokencake.daemon.host_store import HostStore, StoreError
from tokencake.daemon.slot_table import NO_SLOT, READY
from tokencake.protocol import ErrorCode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(num_slots: int = 8, lease_s: float = 10.0, **kw: Any) -> tuple[HostStore, Clock, int]:
    clock = Clock()
    store = HostStore(num_slots, 4096, clock=clock, lease_s=lease_s, **kw)
    layout = store.register_layout("fp-a", 4096)
    return store, clock, layout


def H(i: int) -> bytes:
    return i.to_bytes(32, "little")


def stored(store: HostStore, owner: int, layout: int, salt: str, hashes: list[bytes]) -> list[int]:
    slots = store.reserve(owner, layout, salt, hashes)
    assert store.commit(owner, [s for s in slots if s >= 0]) == sum(s >= 0 for s in slots)
    return slots


def assert_fails(store: HostStore, code: str, fn: Any, *args: Any) -> None:
    before = store.snapshot()
    with pytest.raises(StoreError) as info:
        fn(*args)
    assert info.value.code == code, info.value
    assert store.snapshot() == before


# ---------------------------------------------------------------------- layouts, tenants


def test_register_layout_is_idempotent_and_checked() -> None:
    store, _, a = make()
    assert store.register_layout("fp-a", 4096) == a
    b = store.register_layout("fp-b", 100)
    assert b != a and store.layout_bytes(b) == 100
    assert_fails(store, ErrorCode.LAYOUT_REJECTED, store.register_layout, "fp-c", 4097)
    assert_fails(store, ErrorCode.CONFLICT, store.register_layout, "fp-a", 100)
    assert_fails(store, ErrorCode.BAD_REQUEST, store.register_layout, "", 1)
    assert_fails(store, ErrorCode.BAD_REQUEST, store.register_layout, "fp-d", 0)


def test_tenant_ids_are_interned() -> None:
    store, _, _ = make()
    assert store.tenant_id("x") == store.tenant_id("x") != store.tenant_id("y")


def test_tenants_and_layouts_never_see_each_other() -> None:
    store, _, a = make()
    b = store.register_layout("fp-b", 4096)
    hashes = [H(1), H(2)]
    slots = stored(store, 1, a, "alice", hashes)
    assert store.lookup(a, "alice", hashes) == slots
    assert store.lookup(a, "bob", hashes) == []
    assert store.lookup(b, "alice", hashes) == []
    assert store.begin_load(2, a, "bob", hashes) == []
    assert store.drop(a, "bob", hashes) == 0
    # The same hash stored by bob is a separate block in a separate slot.
    bob = stored(store, 2, a, "bob", hashes)
    assert set(bob).isdisjoint(slots)
    assert store.usage_by_tenant() == {"alice": 2, "bob": 2}


# ---------------------------------------------------------------------- write path


def test_reserve_commit_lookup_and_dedup() -> None:
    store, _, L = make()
    slots = store.reserve(7, L, "", [H(1), H(2), H(3)], tag=5)
    assert len(set(slots)) == 3 and all(s >= 0 for s in slots)
    assert store.lookup(L, "", [H(1)]) == []  # WRITING is never served
    assert store.begin_load(8, L, "", [H(1)]) == []
    assert store.reserve(8, L, "", [H(1), H(4)])[0] == -1  # being written: stored already
    assert store.commit(7, slots) == 3
    assert store.lookup(L, "", [H(1), H(2), H(9), H(3)]) == slots[:2]
    s = store.stats()
    # misses: the lookup and the load of H(1) while WRITING, then H(9) and H(3) after it
    assert (s.writing, s.ready, s.hits, s.misses) == (1, 3, 2, 4)
    assert store.usage_by_owner() == {7: 3, 8: 1}
    store.check_invariants()


def test_commit_and_abort_validate_everything_first() -> None:
    store, _, L = make()
    mine = store.reserve(1, L, "", [H(1), H(2)])
    theirs = store.reserve(2, L, "", [H(3)])
    assert_fails(store, ErrorCode.NOT_OWNER, store.commit, 1, [mine[0], theirs[0]])
    assert_fails(store, ErrorCode.NOT_OWNER, store.abort, 1, [mine[1], theirs[0]])
    assert_fails(store, ErrorCode.BAD_REQUEST, store.commit, 1, [mine[0], mine[0]])
    assert_fails(store, ErrorCode.BAD_REQUEST, store.commit, 1, [mine[0], 8])
    assert_fails(store, ErrorCode.BAD_REQUEST, store.commit, 1, [-1])
    assert_fails(store, ErrorCode.BAD_REQUEST, store.commit, 1, [True])
    assert_fails(store, ErrorCode.BAD_REQUEST, store.commit, -1, [mine[0]])
    free = [s for s in range(8) if s not in mine + theirs]
    assert_fails(store, ErrorCode.NOT_OWNER, store.commit, 1, [free[0]])
    assert store.abort(1, mine) == 2
    assert_fails(store, ErrorCode.NOT_OWNER, store.commit, 1, [mine[0]])  # no longer writing
    assert store.commit(2, theirs) == 1
    assert_fails(store, ErrorCode.NOT_OWNER, store.commit, 2, theirs)  # already ready
    assert store.lookup(L, "", [H(1)]) == [] and store.lookup(L, "", [H(3)]) == theirs


def test_bad_hashes_rejected_without_change() -> None:
    store, _, L = make()
    for bad in ([b""], [b"x" * 65], [H(1), H(1)], ["str"], [bytearray(b"x")]):
        for fn, args in (
            (store.reserve, (1, L, "", bad)),
            (store.lookup, (L, "", bad)),
            (store.begin_load, (1, L, "", bad)),
            (store.drop, (L, "", bad)),
        ):
            assert_fails(store, ErrorCode.BAD_REQUEST, fn, *args)
    assert_fails(store, ErrorCode.BAD_REQUEST, store.reserve, 1, 9, "", [H(1)])  # layout
    assert_fails(store, ErrorCode.BAD_REQUEST, store.reserve, 1, L, "s" * 257, [H(1)])
    assert_fails(store, ErrorCode.BAD_REQUEST, store.reserve, 1, L, "", [H(1)], 2**31)
    assert store.reserve(1, L, "", [b"x" * 64]) != []  # 64 bytes is the limit, inclusive


def test_eviction_is_lru_and_spares_pinned_writing_and_own_prefix() -> None:
    store, _, L = make(num_slots=4)
    a = stored(store, 1, L, "", [H(1), H(2)])
    b = stored(store, 1, L, "", [H(3)])
    store.lookup(L, "", [H(1)])  # H(2) is now least recent, then H(3), then H(1)
    pinned = store.begin_load(2, L, "", [H(3)])
    assert pinned == b
    writing = store.reserve(1, L, "", [H(4)])  # takes the last free slot
    # Needs 2 slots with none free: evicts H(2), then H(1) is the only evictable one left,
    # but it is this call's own prefix, so only one new block fits.
    got = store.reserve(1, L, "", [H(1), H(5), H(6)])
    assert got[0] == -1 and got[1] == a[1] and len(got) == 2
    assert store.stats().evictions == 1
    assert store.lookup(L, "", [H(1)]) == [a[0]]
    assert store.lookup(L, "", [H(3)]) == b  # pinned block survived
    assert store.reserve(1, L, "", [H(4)]) == [-1]  # writing block survived
    assert writing[0] not in got
    store.check_invariants()


def test_no_space_when_nothing_can_be_placed() -> None:
    store, _, L = make(num_slots=2)
    store.reserve(1, L, "", [H(1), H(2)])  # all writing
    assert_fails(store, ErrorCode.NO_SPACE, store.reserve, 2, L, "new-tenant", [H(3)])
    assert "new-tenant" not in store.snapshot()["tenants"]
    assert store.reserve(2, L, "", []) == []


def test_index_survives_total_digest_collisions(monkeypatch: pytest.MonkeyPatch) -> None:
    """With every key hashing alike, full-key comparison still tells blocks apart."""
    for module in (host_store_mod, store_views):
        monkeypatch.setattr(module, "key_digest", lambda layout, tenant, key: 42)
    store, _, L = make(num_slots=16)
    hashes = [H(i) for i in range(12)]
    slots = stored(store, 1, L, "", hashes)
    assert store.lookup(L, "", hashes) == slots
    assert store.lookup(L, "other", hashes) == []
    assert store.drop(L, "", hashes[3:6]) == 3  # deletions from the middle of the probe run
    assert store.lookup(L, "", hashes) == slots[:3]
    assert store.lookup(L, "", hashes[6:]) == slots[6:]
    store.check_invariants()


# ---------------------------------------------------------------------- read path, drop


def test_pins_block_eviction_and_drop_is_deferred() -> None:
    store, _, L = make(num_slots=2)
    slots = stored(store, 1, L, "", [H(1), H(2)])
    assert store.begin_load(5, L, "", [H(1), H(2)]) == slots
    assert store.begin_load(6, L, "", [H(1)]) == slots[:1]
    assert store.stats().reading == 2
    assert_fails(store, ErrorCode.NO_SPACE, store.reserve, 1, L, "", [H(3)])
    assert store.drop(L, "", [H(1)]) == 1
    assert store.lookup(L, "", [H(1)]) == []  # unindexed at once
    assert store.stats().reading == 2  # but still held for its readers
    assert_fails(store, ErrorCode.NOT_OWNER, store.end_load, 7, [slots[0]])
    assert store.end_load(5, slots) == 2
    assert store.stats().free == 0  # reader 6 still reads H(1)
    assert_fails(store, ErrorCode.NOT_OWNER, store.end_load, 5, [slots[0]])
    assert store.end_load(6, [slots[0]]) == 1
    s = store.stats()
    assert (s.free, s.ready, s.reading) == (1, 1, 0)
    store.check_invariants()


def test_drop_counts_holders() -> None:
    store, _, L = make()
    slots = stored(store, 1, L, "", [H(1)])
    assert store.reserve(2, L, "", [H(1)]) == [-1]  # second holder
    assert store.drop(L, "", [H(1), H(9)]) == 1
    assert store.lookup(L, "", [H(1)]) == slots
    assert store.drop(L, "", [H(1)]) == 1
    assert store.lookup(L, "", [H(1)]) == []
    assert store.stats().free == 8
    assert store.drop(L, "", [H(1)]) == 0


# ---------------------------------------------------------------------- leases


def test_leases_expire_renew_and_release() -> None:
    store, clock, L = make(lease_s=10)
    w1 = store.reserve(1, L, "", [H(1)])
    store.reserve(2, L, "", [H(3)])
    ready = stored(store, 2, L, "", [H(2)])
    store.begin_load(1, L, "", [H(2)])
    clock.now += 8
    assert store.renew_leases(1) == 2  # one write, one pin
    clock.now += 5
    assert store.expire_leases() == 1  # owner 2's write was not renewed
    assert store.lookup(L, "", [H(3)]) == []
    w3 = store.reserve(3, L, "", [H(3)])
    assert w3 != [-1]  # a fresh reservation
    clock.now += 6
    assert store.expire_leases() == 2  # owner 1's write and pin; owner 3's write lives on
    assert store.stats().reading == 0
    assert_fails(store, ErrorCode.NOT_OWNER, store.commit, 1, w1)
    assert store.lookup(L, "", [H(2)]) == ready
    store.begin_load(4, L, "", [H(2)])
    store.reserve(4, L, "", [H(7)])
    assert store.leases_by_owner() == {3: 1, 4: 2}
    assert store.release_owner(4) == 2
    assert store.release_owner(4) == 0
    s = store.stats()
    assert (s.writing, s.reading, s.ready) == (1, 0, 1)
    store.check_invariants()


# ---------------------------------------------------------------------- eviction policies


class KeepTaggedPolicy(EvictionPolicy):
    """Evicts untagged blocks first (the scheduler's 'spare critical agents' shape)."""

    name = "keep-tagged"

    def victims(self, count: int, protected: Collection[int]) -> list[int]:
        t = self.table
        ready = [s for s in t.iter_state(READY) if s not in protected]
        ready.sort(key=lambda s: t.m_tag[s] != 0)
        return ready[:count]


class BrokenPolicy(EvictionPolicy):
    name = "broken"

    def victims(self, count: int, protected: Collection[int]) -> list[int]:
        return [-5, 10**6, *protected, NO_SLOT]


def test_registry_and_custom_policy() -> None:
    assert "lru" in available_policies()
    assert make_policy("lru").name == "lru"
    with pytest.raises(UnknownEvictionPolicyError):
        make_policy("nope")
    register_policy("keep-tagged-test", f"{__name__}:KeepTaggedPolicy")
    policy = make_policy("keep-tagged-test")
    store, _, L = make(num_slots=3, eviction=policy)
    critical = store.reserve(1, L, "", [H(1)], tag=9)
    store.commit(1, critical)
    stored(store, 1, L, "", [H(2), H(3)])
    store.lookup(L, "", [H(2), H(3)])  # H(1) is least recent, but tagged
    store.reserve(1, L, "", [H(4)])
    assert store.lookup(L, "", [H(1)]) == critical


def test_bad_victims_are_ignored() -> None:
    store, _, L = make(num_slots=2, eviction=BrokenPolicy())
    stored(store, 1, L, "", [H(1), H(2)])
    assert_fails(store, ErrorCode.NO_SPACE, store.reserve, 1, L, "", [H(1), H(3)][1:])
    store.check_invariants()


# ---------------------------------------------------------------------- property test

N_SLOTS = 4
OWNERS = st.sampled_from([1, 2])
SALTS = st.sampled_from(["a", "a", "b"])
LAYOUT_IDX = st.sampled_from([0, 0, 1])
GOOD_HASHES = st.lists(st.sampled_from([H(i) for i in range(5)]), unique=True, max_size=4)
# Mostly valid requests, so that long sequences reach deep states; sometimes malformed ones.
BAD_HASHES = st.lists(st.sampled_from([H(0), H(1), b"", b"z" * 65]), min_size=2, max_size=3).filter(
    lambda hs: any(not 0 < len(h) <= 64 for h in hs) or len(set(hs)) < len(hs)
)
HASHES = st.one_of(GOOD_HASHES, GOOD_HASHES, GOOD_HASHES, BAD_HASHES)
SLOT_IDS: st.SearchStrategy[list[int]] = st.one_of(
    st.just([]), st.just([]), st.lists(st.integers(-1, N_SLOTS), max_size=2)
)

Key = tuple[int, str, bytes]


class StoreModel(RuleBasedStateMachine):
    """Reference model: dicts and lists, predicting every answer of the real store."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.lease = 10.0
        self.store = HostStore(N_SLOTS, 64, clock=self.clock, lease_s=self.lease)
        self.layouts = [self.store.register_layout("x", 64), self.store.register_layout("y", 32)]
        self.rec: dict[Key, dict[str, Any]] = {}  # indexed blocks
        self.slot_key: dict[int, Key] = {}
        self.doomed: set[int] = set()  # dropped while read: unindexed, still occupied
        self.lru: list[Key] = []  # evictable keys, least recent first
        self.pins: dict[int, dict[int, list[float]]] = {}  # owner -> slot -> [count, deadline]
        self.evictions = self.hits = self.misses = 0

    # -------------------------------------------------------------- model helpers

    def readers(self, slot: int) -> int:
        return int(sum(p[slot][0] for p in self.pins.values() if slot in p))

    def bad_hashes(self, hashes: list[bytes]) -> bool:
        return any(not 0 < len(h) <= 64 for h in hashes) or len(set(hashes)) != len(hashes)

    def bad_slots(self, slots: list[int]) -> bool:
        return any(not 0 <= s < N_SLOTS for s in slots) or len(set(slots)) != len(slots)

    def prefix(self, key0: tuple[int, str], hashes: list[bytes]) -> list[Key]:
        out = []
        for h in hashes:
            r = self.rec.get((*key0, h))
            if r is None or r["state"] != "R":
                break
            out.append((*key0, h))
        return out

    def free_slot(self, slot: int) -> None:
        self.slot_key.pop(slot, None)
        self.doomed.discard(slot)

    def unpin(self, owner: int, slot: int, count: int) -> None:
        p = self.pins[owner]
        p[slot][0] -= count
        if p[slot][0] == 0:
            del p[slot]
            if not p:
                del self.pins[owner]
        if self.readers(slot) == 0:
            if slot in self.doomed:
                self.free_slot(slot)
            else:
                self.lru.append(self.slot_key[slot])

    def expect_error(self, code: str, fn: Any, *args: Any) -> None:
        before = self.store.snapshot()
        with pytest.raises(StoreError) as info:
            fn(*args)
        assert info.value.code == code
        assert self.store.snapshot() == before

    # -------------------------------------------------------------- rules

    @rule(li=LAYOUT_IDX, salt=SALTS, hashes=HASHES)
    def lookup(self, li: int, salt: str, hashes: list[bytes]) -> None:
        L = self.layouts[li]
        if self.bad_hashes(hashes):
            return self.expect_error(ErrorCode.BAD_REQUEST, self.store.lookup, L, salt, hashes)
        keys = self.prefix((L, salt), hashes)
        got = self.store.lookup(L, salt, hashes)
        assert got == [self.rec[k]["slot"] for k in keys]
        for k in reversed(keys):
            if k in self.lru:
                self.lru.remove(k)
                self.lru.append(k)
        self.hits += len(keys)
        self.misses += len(hashes) - len(keys)

    @rule(owner=OWNERS, li=LAYOUT_IDX, salt=SALTS, hashes=HASHES, tag=st.integers(0, 3))
    def reserve(self, owner: int, li: int, salt: str, hashes: list[bytes], tag: int) -> None:
        self.do_reserve(owner, li, salt, hashes, tag)

    @rule(owner=OWNERS, li=LAYOUT_IDX, salt=SALTS, hashes=GOOD_HASHES)
    def store_blocks(self, owner: int, li: int, salt: str, hashes: list[bytes]) -> None:
        """Reserve then commit at once: the common path, so sequences build up stored blocks."""
        slots = self.do_reserve(owner, li, salt, hashes, 0)
        self.do_commit(owner, [s for s in slots if s >= 0])

    def do_reserve(
        self, owner: int, li: int, salt: str, hashes: list[bytes], tag: int
    ) -> list[int]:
        L = self.layouts[li]
        if self.bad_hashes(hashes):
            self.expect_error(
                ErrorCode.BAD_REQUEST, self.store.reserve, owner, L, salt, hashes, tag
            )
            return []
        keys: list[Key] = [(L, salt, h) for h in hashes]
        needed = sum(k not in self.rec for k in keys)
        free = N_SLOTS - len(self.slot_key)
        protected = {k for k in keys if k in self.rec}
        victims = [k for k in self.lru if k not in protected][: max(0, needed - free)]
        budget = free + len(victims)
        n, used = 0, 0
        for k in keys:
            if k not in self.rec:
                if used == budget:
                    break
                used += 1
            n += 1
        if hashes and n == 0:
            self.expect_error(ErrorCode.NO_SPACE, self.store.reserve, owner, L, salt, hashes, tag)
            return []
        got = self.store.reserve(owner, L, salt, hashes, tag)
        assert len(got) == n
        for v in victims[: max(0, used - free)]:
            self.lru.remove(v)
            self.free_slot(self.rec.pop(v)["slot"])
            self.evictions += 1
        for k, s in zip(keys, got, strict=False):
            if k in self.rec:
                assert s == -1
                self.rec[k]["holders"] += 1
            else:
                assert 0 <= s < N_SLOTS and s not in self.slot_key
                deadline = self.clock.now + self.lease
                self.rec[k] = {
                    "slot": s,
                    "state": "W",
                    "owner": owner,
                    "holders": 1,
                    "deadline": deadline,
                }
                self.slot_key[s] = k
        return got

    def writes_check(self, owner: int, slots: list[int]) -> str | None:
        if self.bad_slots(slots):
            return ErrorCode.BAD_REQUEST
        for s in slots:
            k = self.slot_key.get(s)
            if k is None or s in self.doomed:
                return ErrorCode.NOT_OWNER
            r = self.rec[k]
            if r["state"] != "W" or r["owner"] != owner:
                return ErrorCode.NOT_OWNER
        return None

    def my_writes(self, owner: int) -> list[int]:
        return [r["slot"] for r in self.rec.values() if r["state"] == "W" and r["owner"] == owner]

    @rule(owner=OWNERS, extra=SLOT_IDS, data=st.data())
    def commit(self, owner: int, extra: list[int], data: st.DataObject) -> None:
        self.do_commit(owner, data.draw(st.permutations(self.my_writes(owner))) + extra)

    def do_commit(self, owner: int, slots: list[int]) -> None:
        err = self.writes_check(owner, slots)
        if err:
            return self.expect_error(err, self.store.commit, owner, slots)
        assert self.store.commit(owner, slots) == len(slots)
        for s in reversed(slots):
            k = self.slot_key[s]
            self.rec[k]["state"] = "R"
            self.lru.append(k)

    @rule(owner=OWNERS, extra=SLOT_IDS, data=st.data())
    def abort(self, owner: int, extra: list[int], data: st.DataObject) -> None:
        mine = self.my_writes(owner)
        slots = data.draw(st.lists(st.sampled_from(mine), unique=True)) if mine else []
        slots += extra
        err = self.writes_check(owner, slots)
        if err:
            return self.expect_error(err, self.store.abort, owner, slots)
        assert self.store.abort(owner, slots) == len(slots)
        for s in slots:
            del self.rec[self.slot_key[s]]
            self.free_slot(s)

    @rule(owner=OWNERS, li=LAYOUT_IDX, salt=SALTS, hashes=HASHES)
    def begin_load(self, owner: int, li: int, salt: str, hashes: list[bytes]) -> None:
        L = self.layouts[li]
        if self.bad_hashes(hashes):
            return self.expect_error(
                ErrorCode.BAD_REQUEST, self.store.begin_load, owner, L, salt, hashes
            )
        keys = self.prefix((L, salt), hashes)
        got = self.store.begin_load(owner, L, salt, hashes)
        assert got == [self.rec[k]["slot"] for k in keys]
        self.hits += len(keys)  # an engine's load counts as much as a lookup
        self.misses += len(hashes) - len(keys)
        for k in reversed(keys):
            s = self.rec[k]["slot"]
            if k in self.lru:
                self.lru.remove(k)
            pin = self.pins.setdefault(owner, {}).setdefault(s, [0, 0.0])
            pin[0] += 1
            pin[1] = self.clock.now + self.lease

    @rule(owner=OWNERS, extra=SLOT_IDS, data=st.data())
    def end_load(self, owner: int, extra: list[int], data: st.DataObject) -> None:
        mine = list(self.pins.get(owner, {}))
        slots = data.draw(st.lists(st.sampled_from(mine), unique=True)) if mine else []
        slots += extra
        if self.bad_slots(slots):
            return self.expect_error(ErrorCode.BAD_REQUEST, self.store.end_load, owner, slots)
        if any(s not in self.pins.get(owner, {}) for s in slots):
            return self.expect_error(ErrorCode.NOT_OWNER, self.store.end_load, owner, slots)
        assert self.store.end_load(owner, slots) == len(slots)
        for s in reversed(slots):
            self.unpin(owner, s, 1)

    @rule(li=LAYOUT_IDX, salt=SALTS, hashes=HASHES)
    def drop(self, li: int, salt: str, hashes: list[bytes]) -> None:
        L = self.layouts[li]
        if self.bad_hashes(hashes):
            return self.expect_error(ErrorCode.BAD_REQUEST, self.store.drop, L, salt, hashes)
        hit = [(L, salt, h) for h in hashes if self.rec.get((L, salt, h), {}).get("state") == "R"]
        assert self.store.drop(L, salt, hashes) == len(hit)
        for k in hit:
            r = self.rec[k]
            r["holders"] -= 1
            if r["holders"] == 0:
                del self.rec[k]
                if self.readers(r["slot"]):
                    self.doomed.add(r["slot"])
                else:
                    self.lru.remove(k)
                    self.free_slot(r["slot"])

    @rule(owner=OWNERS)
    def renew(self, owner: int) -> None:
        mine = [r for r in self.rec.values() if r["state"] == "W" and r["owner"] == owner]
        for r in mine:
            r["deadline"] = self.clock.now + self.lease
        pins = self.pins.get(owner, {})
        for p in pins.values():
            p[1] = self.clock.now + self.lease
        assert self.store.renew_leases(owner) == len(mine) + len(pins)

    @rule(owner=OWNERS)
    def release(self, owner: int) -> None:
        writes = self.my_writes(owner)
        pinned = list(self.pins.get(owner, {}).items())
        assert self.store.release_owner(owner) == len(writes) + len(pinned)
        for s in writes:
            del self.rec[self.slot_key[s]]
            self.free_slot(s)
        for s, (count, _) in pinned:
            self.unpin(owner, s, int(count))

    @rule(dt=st.sampled_from([0.5, 4.0, 4.0, 11.0]))
    def advance(self, dt: float) -> None:
        self.clock.now += dt

    @rule()
    def expire(self) -> None:
        now = self.clock.now
        writes = [k for k, r in self.rec.items() if r["state"] == "W" and r["deadline"] < now]
        pins = [
            (o, s, int(p[0])) for o, ps in self.pins.items() for s, p in ps.items() if p[1] < now
        ]
        assert self.store.expire_leases() == len(writes) + len(pins)
        for k in writes:
            self.free_slot(self.rec.pop(k)["slot"])
        for o, s, count in pins:
            self.unpin(o, s, count)

    @precondition(lambda self: bool(self.slot_key))
    @rule()
    def no_half_written_block_is_served(self) -> None:
        for k, r in self.rec.items():
            if r["state"] == "W":
                assert self.store.lookup(k[0], k[1], [k[2]]) == []
                self.misses += 1

    # -------------------------------------------------------------- invariants

    @invariant()
    def agrees_with_model(self) -> None:
        s = self.store.stats()
        assert s.free + s.writing + s.ready + s.reading == N_SLOTS
        pinned = {slot for p in self.pins.values() for slot in p}
        assert s.writing == sum(r["state"] == "W" for r in self.rec.values())
        assert s.reading == len(pinned)
        assert s.ready == len(self.lru)
        assert s.free == N_SLOTS - len(self.slot_key)
        assert (s.evictions, s.hits, s.misses) == (self.evictions, self.hits, self.misses)
        assert self.doomed <= pinned
        self.store.check_invariants()


TestStoreModel = StoreModel.TestCase
TestStoreModel.settings = settings(
    max_examples=200,
    stateful_step_count=40,
)
