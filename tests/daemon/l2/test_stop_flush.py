"""A daemon stopped cleanly writes the blocks only its arena held to L2 before it exits, so
a daemon started afterwards, empty, on the same store finds them byte for byte. Real
daemons, real shared memory, a real redis-server."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from tests.daemon.l2.redis_procs import RedisNode
from tests.daemon.l2.test_bridge import Host
from tests.daemon.l2.test_bridge import chain as short_chain
from tests.daemon.l2.test_two_daemons import Engine, blocks, chain, l2_env
from tests.procs import start
from tokencake import protocol as p
from tokencake.daemon.l2.backends import DiskBackend


def test_blocks_only_in_the_arena_reach_l2_at_stop(tmp_path: Path, redis_node: RedisNode) -> None:
    env = l2_env("redis", redis_node.url)  # write-back: nothing goes to L2 before eviction
    first = start(tmp_path, arena="4MiB", env=env)
    x = chain("stop", 12)
    data = blocks(7, 12)
    a = Engine(first, "engine-a")
    try:
        a.store(x, data)
        assert a.client.call(p.Stats()).l2["stored_blocks"] == 0
    finally:
        a.close()
    assert redis_node.client().dbsize() == 0
    assert first.stop() == 0
    assert redis_node.client().dbsize() == 12
    second = start(tmp_path, arena="4MiB", env=env)
    b = Engine(second, "engine-b")
    try:
        assert b.wait_hits(x) == 12
        assert np.array_equal(b.load(x), data)
    finally:
        b.close()
        second.stop()


def test_no_flush_when_disabled(tmp_path: Path, redis_node: RedisNode) -> None:
    env = {**l2_env("redis", redis_node.url), "TOKENCAKE_L2_FLUSH_ON_STOP_S": "0"}
    first = start(tmp_path, arena="4MiB", env=env)
    a = Engine(first, "engine-a")
    try:
        a.store(chain("kept", 4), blocks(8, 4))
    finally:
        a.close()
    assert first.stop() == 0
    assert redis_node.client().dbsize() == 0


class _StalledDisk(DiskBackend):
    """A store that takes writes and never answers until released (a stall, in-process)."""

    def __init__(self, directory: str) -> None:
        super().__init__(directory, capacity_bytes=1 << 30)
        self.release = threading.Event()

    def put_many(self, items: Sequence[tuple[bytes, bytes | memoryview]]) -> int:
        self.release.wait(30)
        return super().put_many(items)


def test_blocks_not_flushed_in_time_are_counted(tmp_path: Path) -> None:
    h = Host(tmp_path / "l2", 8)
    stalled = _StalledDisk(str(tmp_path / "l2"))
    h.bridge.tier.backend = stalled
    h.put(short_chain("x", 5), 1)
    try:
        assert h.bridge.flush_arena(0.2) == (0, 5)
        assert h.count("tokencake_l2_dropped_writes_total", reason="shutdown") == 5
    finally:
        stalled.release.set()
        h.bridge.close()


def test_blocks_l2_already_has_are_not_written_again(tmp_path: Path) -> None:
    a, b = Host(tmp_path / "l2", 8, write_through=True), Host(tmp_path / "l2", 8)
    x = short_chain("x", 4)
    a.put(x, 2)
    a.settle()
    b.lookup(x)
    b.settle()  # b holds x now, prefetched: clean
    b.put(short_chain("y", 2), 3)
    assert a.bridge.flush_arena(5.0) == (0, 0)  # written through at commit
    assert b.bridge.flush_arena(5.0) == (2, 0)
