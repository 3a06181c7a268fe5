"""Each backend against its real store: Redis, a three-master Redis Cluster, a directory."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.l2.redis_procs import RedisNode
from tests.procs import free_port
from tokencake.daemon.l2.backends import (
    DiskBackend,
    L2Backend,
    L2Unavailable,
    RedisBackend,
    RedisClusterBackend,
    backend_class,
)
from tokencake.daemon.l2.codec import open_value, seal


@pytest.fixture(params=["redis", "redis-cluster", "disk"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[L2Backend]:
    b: L2Backend
    if request.param == "redis":
        node: RedisNode = request.getfixturevalue("redis_node")
        b = RedisBackend(node.url, timeout_s=2.0)
    elif request.param == "redis-cluster":
        nodes: list[RedisNode] = request.getfixturevalue("redis_cluster")
        b = RedisClusterBackend(",".join(n.url for n in nodes), timeout_s=2.0)
    else:
        b = DiskBackend(str(tmp_path / "l2"), capacity_bytes=1 << 30)
    yield b
    b.close()


def test_put_get_miss(backend: L2Backend) -> None:
    items = [(f"t:{backend.name}:{i}".encode(), bytes([i]) * (1000 + i)) for i in range(40)]
    assert backend.put_many(items) == 40
    keys = [k for k, _ in items] + [b"t:absent"]
    got = backend.get_many(keys)
    assert got[:-1] == [v for _, v in items]
    assert got[-1] is None
    assert backend.put_many([(items[0][0], b"new")]) == 1
    assert backend.get_many([items[0][0]]) == [b"new"]
    assert backend.put_many([]) == 0
    assert backend.get_many([]) == []


def test_registry_names_every_backend() -> None:
    assert backend_class("redis") is RedisBackend
    assert backend_class("valkey") is RedisBackend
    assert backend_class("redis-cluster") is RedisClusterBackend
    assert backend_class("disk") is DiskBackend
    with pytest.raises(KeyError, match="unknown L2 backend"):
        backend_class("memcached")


def test_a_store_that_is_not_there_is_unavailable() -> None:
    port = free_port()  # nothing listens here
    for b in (
        RedisBackend(f"redis://127.0.0.1:{port}", timeout_s=0.5),
        RedisClusterBackend(f"redis://127.0.0.1:{port}", timeout_s=0.5),
    ):
        with pytest.raises(L2Unavailable):
            b.put_many([(b"k", b"v")])
        with pytest.raises(L2Unavailable):
            b.get_many([b"k"])
        b.close()


def test_disk_capacity_drops_the_oldest_and_restart_keeps_the_rest(tmp_path: Path) -> None:
    d = tmp_path / "l2"
    b = DiskBackend(str(d), capacity_bytes=10_000)
    for i in range(15):
        assert b.put_many([(f"k{i}".encode(), bytes(1000))]) == 1
    got = b.get_many([f"k{i}".encode() for i in range(15)])
    assert [g is not None for g in got] == [False] * 5 + [True] * 10
    assert b.used_bytes == 10_000
    # A write that died before its rename leaves a .tmp file: never read, removed at start.
    stray = next(p for p in d.rglob("*") if p.is_file()).with_suffix(".123.tmp")
    stray.write_bytes(b"half")
    again = DiskBackend(str(d), capacity_bytes=10_000)
    assert again.used_bytes == 10_000
    assert not stray.exists()
    assert again.get_many([b"k14"]) == [bytes(1000)]


def test_reads_racing_writes_see_whole_values(backend: L2Backend) -> None:
    """One thread rewrites a key with alternating 1 MiB values while another reads it: every
    value read opens cleanly as one of the two (never a mix, never cut short)."""
    key = f"race:{backend.name}".encode()
    versions = [seal(key, bytes([v]) * (1 << 20)) for v in (1, 2)]
    backend.put_many([(key, versions[0])])
    stop = threading.Event()
    errors: list[BaseException] = []

    def write() -> None:
        try:
            for i in range(200):
                backend.put_many([(key, versions[i % 2])])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    writer = threading.Thread(target=write)
    writer.start()
    reads = 0
    while not stop.is_set() or reads < 20:
        (value,) = backend.get_many([key])
        assert value is not None
        assert bytes(open_value(key, value)) in (b"\x01" * (1 << 20), b"\x02" * (1 << 20))
        reads += 1
    writer.join()
    assert not errors
