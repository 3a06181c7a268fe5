"""The bridge between the host store and the tier, in-process: a real HostStore over a numpy
arena and a real disk backend, driven as the event loop drives it."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tokencake.daemon.host_store import HostStore
from tokencake.daemon.l2.backends import DiskBackend
from tokencake.daemon.l2.bridge import L2_OWNER, L2Bridge
from tokencake.daemon.l2.codec import block_key, key_prefix, seal
from tokencake.daemon.l2.tier import L2Metrics, L2Tier

SLOT = 4096
NBYTES = 4000  # the layout's block; the slot is a little larger
SALT = "s"


class Host:
    """One daemon's store, arena and bridge; ``directory`` is the L2 shared between hosts."""

    def __init__(
        self,
        directory: Path,
        num_slots: int,
        *,
        write_through: bool = False,
        queue_bytes: int = 1 << 20,
    ) -> None:
        self.registry = CollectorRegistry()
        tier = L2Tier(
            DiskBackend(str(directory), capacity_bytes=1 << 30),
            queue_bytes=queue_bytes,
            workers=1,
            metrics=L2Metrics(self.registry),
        )
        self.bridge = L2Bridge(tier, namespace="t", write_through=write_through)
        self.store = HostStore(num_slots, SLOT, clock=time.monotonic, on_evict=self.bridge.on_evict)
        self.layout = self.store.register_layout("fp", NBYTES)
        self.rows = np.zeros((num_slots, SLOT), dtype=np.uint8)
        self.bridge.attach(self.store, self.rows)

    def put(self, hashes: list[bytes], seed: int) -> np.ndarray:
        data = np.random.default_rng(seed).integers(0, 256, (len(hashes), NBYTES), np.uint8)
        slots = self.store.reserve(7, self.layout, SALT, hashes)
        for s, block in zip(slots, data, strict=True):
            self.rows[s, :NBYTES] = block
        self.store.commit(7, slots)
        self.bridge.committed(slots)
        return data

    def settle(self) -> None:
        """Let the workers finish and place every finished prefetch."""
        assert self.bridge.tier.flush(30)
        while self.bridge.busy:
            self.bridge.poll()
            time.sleep(0.001)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        found = self.store.lookup(self.layout, SALT, hashes)
        if len(found) < len(hashes):
            self.bridge.missed(self.layout, SALT, hashes[len(found) :])
        return found

    def count(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def l2dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "l2"


def chain(tag: str, n: int) -> list[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


def test_evicted_blocks_come_back_through_a_lookup(l2dir: Path) -> None:
    h = Host(l2dir, 4)
    x = chain("x", 4)
    data = h.put(x, 1)
    h.put(chain("y", 4), 2)  # evicts x: written back
    h.settle()
    assert h.bridge.written_back == 4
    assert h.lookup(x) == []
    h.settle()
    found = h.lookup(x)
    assert len(found) == 4  # y was evicted in turn to make room: also written back
    assert np.array_equal(h.rows[found, :NBYTES], data)
    assert h.store.stats().writing == 0
    h.store.check_invariants()
    # x came from L2: evicting it again writes nothing.
    h.settle()
    before = h.count("tokencake_l2_blocks_total", op="put", result="stored")
    h.put(chain("z", 4), 3)
    h.settle()
    after = h.count("tokencake_l2_blocks_total", op="put", result="stored")
    assert after == before  # z evicted only clean blocks (x)
    h.bridge.close()


def test_blocks_stored_meanwhile_keep_their_holder_count(l2dir: Path) -> None:
    a = Host(l2dir, 8, write_through=True)
    b = Host(l2dir, 8)
    x = chain("x", 3)
    data = a.put(x, 1)
    a.settle()
    assert b.lookup(x) == []  # prefetch queued
    b.put(x[:2], 1)  # ... and the engine stores two of the blocks itself before it lands
    b.settle()
    found = b.lookup(x)
    assert len(found) == 3
    assert np.array_equal(b.rows[found, :NBYTES], data)
    snap = b.store.snapshot()
    holders = np.frombuffer(snap["holders"], dtype=np.int32)
    assert sorted(holders[found].tolist()) == [1, 1, 1]
    owners = np.frombuffer(snap["owner"], dtype=np.int32)
    assert owners[found[2]] == L2_OWNER
    b.store.check_invariants()
    a.bridge.close()
    b.bridge.close()


def test_a_value_of_another_size_is_not_placed(l2dir: Path) -> None:
    h = Host(l2dir, 4)
    key = block_key(key_prefix("t", "fp", SALT), b"odd")
    h.bridge.tier.backend.put_many([(key, seal(key, bytes(NBYTES - 1)))])
    h.lookup([b"odd"])
    h.settle()
    assert h.lookup([b"odd"]) == []
    assert h.count("tokencake_l2_rejected_values_total", reason="size") == 1
    h.bridge.close()


def test_one_prefetch_per_chain_at_a_time(l2dir: Path) -> None:
    h = Host(l2dir, 4)
    x = chain("x", 2)
    assert h.bridge.missed(h.layout, SALT, x)
    assert not h.bridge.missed(h.layout, SALT, x)
    h.settle()
    assert h.bridge.missed(h.layout, SALT, x)
    h.settle()
    h.bridge.close()


def test_an_upload_decision_brings_back_what_went_to_l2(l2dir: Path) -> None:
    h = Host(l2dir, 6)
    x = chain("agent", 4)
    data = h.put(x[:2], 1)
    h.bridge.remember("app", "coder", h.layout, SALT, x[:2])
    more = h.put(x[2:], 2)
    h.bridge.remember("app", "coder", h.layout, SALT, x[2:])  # the same offload, continued
    h.put(chain("other", 6), 3)  # pressure: the agent's blocks go to L2
    h.settle()
    assert h.store.resident_prefix(h.layout, SALT, x) == 0
    assert h.bridge.upload("app", "coder")
    assert not h.bridge.upload("nobody", "here")
    h.settle()
    assert h.store.resident_prefix(h.layout, SALT, x) == 4
    found = h.store.lookup(h.layout, SALT, x)
    assert np.array_equal(h.rows[found, :NBYTES], np.concatenate([data, more]))
    assert not h.bridge.upload("app", "coder")  # all on the host: nothing to fetch
    h.bridge.close()
