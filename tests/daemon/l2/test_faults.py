"""The tier against a real redis-server that dies, fills up, serves damaged values or stalls.

In every case nothing raises on the caller's side, nothing wrong is served, and what could
not be written is counted. The breaker's clock is injected, so "after the retry interval"
needs no sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from tests.daemon.l2.redis_procs import RedisNode, start_node
from tests.procs import start
from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.daemon.l2.backends import RedisBackend
from tokencake.daemon.l2.codec import HEADER_BYTES, block_key, key_prefix, open_value
from tokencake.daemon.l2.tier import L2Metrics, L2Tier
from tokencake.layout import KvLayout

BLOCK = 64 << 10
PREFIX = key_prefix("faults", "fp", "salt")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def payload(i: int) -> bytes:
    return np.random.default_rng(i).integers(0, 256, BLOCK, dtype=np.uint8).tobytes()


def key(i: int) -> bytes:
    return block_key(PREFIX, i.to_bytes(32, "big"))


class Rig:
    def __init__(self, node: RedisNode, *, timeout_s: float = 5.0, batch: int = 8) -> None:
        self.node = node
        self.clock = Clock()
        self.registry = CollectorRegistry()
        self.tier = L2Tier(
            RedisBackend(node.url, timeout_s=timeout_s),
            queue_bytes=64 << 20,
            workers=1,
            batch=batch,
            retry_s=5.0,
            metrics=L2Metrics(self.registry),
            clock=self.clock,
        )

    def count(self, name: str, **labels: str) -> float:
        return self.registry.get_sample_value(name, labels) or 0.0

    def dropped(self, reason: str) -> float:
        return self.count("tokencake_l2_dropped_writes_total", reason=reason)

    def stored(self) -> float:
        return self.count("tokencake_l2_blocks_total", op="put", result="stored")

    def fetch(self, ids: list[int]) -> list[bytes]:
        """One prefetch, waited for: the payloads of the clean prefix."""
        assert self.tier.get("t", [key(i) for i in ids])
        deadline = time.monotonic() + 30
        while True:
            done = self.tier.completed()
            if done:
                return [bytes(p) for p in done[0].payloads]
            assert time.monotonic() < deadline, "prefetch never finished"
            time.sleep(0.005)


@pytest.fixture
def rig(redis_node: RedisNode) -> Iterator[Rig]:
    r = Rig(redis_node)
    yield r
    r.tier.close()


def test_round_trip_through_the_workers(rig: Rig) -> None:
    for i in range(20):
        assert rig.tier.put(key(i), payload(i))
    assert rig.tier.flush(30)
    assert rig.stored() == 20
    assert rig.fetch(list(range(20))) == [payload(i) for i in range(20)]
    # A prefetch returns the chain's prefix: it stops at the first block L2 lacks.
    assert rig.fetch([0, 1, 99, 3]) == [payload(0), payload(1)]


def test_store_killed_mid_write(rig: Rig) -> None:
    client = rig.node.client()
    client.execute_command("CLIENT", "PAUSE", "30000", "WRITE")
    for i in range(8):  # the worker sends a pipeline and waits on the paused server
        assert rig.tier.put(key(i), payload(i))
    deadline = time.monotonic() + 30
    while not rig.tier._busy:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    rig.node.kill9()
    assert rig.tier.flush(30)
    assert rig.dropped("unavailable") == 8 and rig.stored() == 0
    assert not rig.tier.available  # breaker open: writes are dropped without a try
    assert not rig.tier.put(key(50), payload(50))
    assert rig.dropped("unavailable") == 9
    rig.node.restart()
    rig.clock.now += 6  # past retry_s
    assert rig.tier.available
    assert rig.tier.put(key(60), payload(60))
    assert rig.tier.flush(30)
    assert rig.stored() == 1
    assert rig.fetch([60]) == [payload(60)]
    assert rig.fetch([0]) == []  # lost with the process: a miss, never an error


def test_full_store_drops_and_counts(tmp_path: Path) -> None:
    node = start_node(tmp_path, "--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    r = Rig(node)
    try:
        for i in range(120):
            assert r.tier.put(key(i), payload(i))
        assert r.tier.flush(60)
        stored, full = r.stored(), r.dropped("full")
        assert stored > 0 and full > 0 and stored + full == 120
        assert r.tier.available  # a full store is not a down store
        client = node.client()
        present = [i for i in range(120) if client.exists(key(i))]
        assert len(present) == stored
        for i in present:  # what it kept is whole
            assert bytes(open_value(key(i), client.get(key(i)))) == payload(i)  # type: ignore[arg-type]
    finally:
        r.tier.close()
        node.stop()


def test_damaged_values_are_not_served(rig: Rig) -> None:
    for i in range(6):
        rig.tier.put(key(i), payload(i))
    assert rig.tier.flush(30)
    client = rig.node.client()
    client.setrange(key(1), HEADER_BYTES + 100, b"\xff\xfe")
    assert rig.fetch([0, 1, 2]) == [payload(0)]
    assert rig.count("tokencake_l2_rejected_values_total", reason="checksum") == 1
    client.set(key(3), client.get(key(3))[: BLOCK // 2])  # type: ignore[index]
    assert rig.fetch([2, 3]) == [payload(2)]
    assert rig.count("tokencake_l2_rejected_values_total", reason="torn") == 1
    client.set(key(4), client.get(key(5)))  # type: ignore[arg-type]
    assert rig.fetch([4]) == []
    assert rig.count("tokencake_l2_rejected_values_total", reason="foreign") == 1
    client.set(key(5), b"a value another program stored under this name, " * 4)
    assert rig.fetch([5]) == []
    assert rig.count("tokencake_l2_rejected_values_total", reason="foreign") == 2


def pause(node: RedisNode, ms: int) -> None:
    """``CLIENT PAUSE ms ALL``: every client's commands wait (``CLIENT UNPAUSE`` would too,
    so a pause here always runs its course)."""
    with node.client() as c:
        c.execute_command("CLIENT", "PAUSE", str(ms), "ALL")


def wait_unpaused(node: RedisNode) -> None:
    with node.client(socket_timeout=30) as c:
        c.ping()  # answered when the pause ends


def test_stalled_store_never_blocks_the_caller(redis_node: RedisNode) -> None:
    r = Rig(redis_node, timeout_s=0.5)
    try:
        pause(redis_node, 4000)
        assert r.tier.get("stalled", [key(0)])
        # While the worker waits on the paused store, the caller's puts return at once:
        # taken into the bounded queue, or dropped and counted.
        taken = sum(r.tier.put(key(i), payload(i % 4)) for i in range(2000))
        assert taken < 2000  # 64 MiB of queue for 125 MiB offered
        deadline = time.monotonic() + 30
        while not (done := r.tier.completed()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert done[0].payloads == [] and "Timeout" in done[0].error  # the stall: a miss
        assert r.tier.flush(30)
        assert not r.tier.available
        assert r.stored() == 0
        assert r.dropped("queue_full") + r.dropped("unavailable") == 2000
        wait_unpaused(redis_node)
        r.clock.now += 6
        assert r.tier.put(key(100), payload(100))
        assert r.tier.flush(30)
        assert r.fetch([100]) == [payload(100)]
    finally:
        r.tier.close()


def test_daemon_answers_while_its_store_is_paused(tmp_path: Path, redis_node: RedisNode) -> None:
    """A real tokencaked with a paused Redis keeps serving stores, evictions and lookups."""
    env = {
        "TOKENCAKE_L2_BACKEND": "redis",
        "TOKENCAKE_L2_URL": redis_node.url,
        "TOKENCAKE_L2_MODE": "write-through",
        "TOKENCAKE_L2_TIMEOUT_S": "0.5",
    }
    d = start(tmp_path, arena="1MiB", env=env)
    try:
        pause(redis_node, 4000)
        layout = KvLayout("l2-paused", 4, 16, 4, 64, "float16", BLOCK)
        with TokenCakeClient(d.endpoint, timeout_s=5.0) as c:
            eid = c.call(p.RegisterEngine("e", layout)).engine_id
            for round_ in range(10):  # 10 x 10 blocks through a 15-slot arena: evictions
                hashes = [f"p{round_}-{i}".encode() for i in range(10)]
                slots = c.call(p.Reserve(eid, hashes)).slots
                assert c.call(p.Commit(eid, slots)).committed == len(slots)
                assert c.call(p.Lookup(eid, [b"never-stored", *hashes])).hit_blocks == 0
            assert c.call(p.Ping()).protocol_version >= 1
    finally:
        d.stop()
        wait_unpaused(redis_node)
