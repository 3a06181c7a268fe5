"""Two tokencaked processes, two "hosts" on loopback, sharing one L2 store.

KV an engine stores through daemon A (evicted there, or written through) is found by a
lookup on daemon B, prefetched into B's arena, and loaded byte for byte. Real daemons, real
shared memory, real redis-server (single node and a three-master cluster), a real
valkey-server, and a shared directory for the disk tier.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from tests.daemon.l2.redis_procs import RedisNode
from tests.procs import Proc, start
from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.clients.kv_arena import ArenaMapping
from tokencake.layout import KvLayout

# 4 layers x 16 tokens x 4 heads x 64 x fp16 x (K, V) = 64 KiB per block.
LAYOUT = KvLayout("l2-two-hosts", 4, 16, 4, 64, "float16", 65536)
BLOCK = LAYOUT.bytes_per_block
SALT = "tenant-a"


def chain(tag: str, n: int) -> list[bytes]:
    return [f"{tag}-{i}".encode().ljust(32, b".") for i in range(n)]


def blocks(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, BLOCK), dtype=np.uint8)


class Engine:
    """An engine process's view of one daemon: its client and its mapping of the arena."""

    def __init__(self, d: Proc, name: str) -> None:
        self.client = TokenCakeClient(d.endpoint, timeout_s=5.0)
        reg = self.client.call(p.RegisterEngine(name, LAYOUT, num_gpu_blocks=64))
        self.engine_id = reg.engine_id
        self.arena = ArenaMapping.open(reg.arena_name, reg.slot_bytes, populate=False)

    def store(self, hashes: list[bytes], data: np.ndarray) -> None:
        slots = self.client.call(p.Reserve(self.engine_id, hashes, salt=SALT)).slots
        assert len(slots) == len(hashes) and all(s >= 0 for s in slots)
        self.arena.write_blocks(slots, data)
        assert self.client.call(p.Commit(self.engine_id, slots)).committed == len(slots)

    def wait_hits(self, hashes: list[bytes], timeout_s: float = 20.0) -> int:
        """Look up until every block is on this host (L2 prefetches land in between)."""
        deadline = time.monotonic() + timeout_s
        while True:
            hits = self.client.call(p.Lookup(self.engine_id, hashes, salt=SALT)).hit_blocks
            if hits == len(hashes) or time.monotonic() > deadline:
                return hits
            time.sleep(0.02)

    def load(self, hashes: list[bytes]) -> np.ndarray:
        slots = self.client.call(p.LoadBegin(self.engine_id, hashes, salt=SALT)).slots
        out = np.zeros((len(slots), BLOCK), dtype=np.uint8)
        self.arena.read_blocks(slots, out)
        self.client.call(p.LoadEnd(self.engine_id, slots))
        return out

    def close(self) -> None:
        self.arena.close()
        self.client.close()


def l2_env(backend: str, url: str = "", directory: str = "", mode: str = "write-back") -> dict:
    env = {"TOKENCAKE_L2_BACKEND": backend, "TOKENCAKE_L2_MODE": mode}
    if url:
        env["TOKENCAKE_L2_URL"] = url
    if directory:
        env["TOKENCAKE_L2_DIR"] = directory
    return env


def start_pair(tmp_path: Path, hosts: list[Proc], env: dict) -> tuple[Engine, Engine]:
    # Host A's arena holds 15 blocks, so storing 15 more evicts what it held before.
    a = start(tmp_path, arena="1MiB", env=env)
    hosts.append(a)
    b = start(tmp_path, arena="4MiB", env=env)
    hosts.append(b)
    return Engine(a, "engine-a"), Engine(b, "engine-b")


def evict_to_l2_then_load_on_b(tmp_path: Path, hosts: list[Proc], env: dict) -> None:
    a, b = start_pair(tmp_path, hosts, env)
    try:
        x, y = chain("x", 10), chain("y", 15)
        data = blocks(1, 10)
        a.store(x, data)
        a.store(y, blocks(2, 15))  # evicts x on A: written back to L2
        assert a.client.call(p.Stats()).l2["written_back"] == 10
        assert b.wait_hits(x) == 10
        assert np.array_equal(b.load(x), data)
        a_l2, b_l2 = a.client.call(p.Stats()).l2, b.client.call(p.Stats()).l2
        assert a_l2["written_back"] >= 10 and a_l2["stored_blocks"] >= 10
        assert b_l2["placed_blocks"] == 10 and b_l2["hit_blocks"] == 10
        assert a_l2["dropped_writes"] == b_l2["rejected_values"] == 0
        # Another tenant's salt names other keys: nothing of x is found under it.
        assert b.client.call(p.Lookup(b.engine_id, x, salt="tenant-b")).hit_blocks == 0
    finally:
        a.close()
        b.close()


def test_evicted_on_a_loaded_on_b_redis(
    tmp_path: Path, hosts: list[Proc], redis_node: RedisNode
) -> None:
    evict_to_l2_then_load_on_b(tmp_path, hosts, l2_env("redis", redis_node.url))


def test_evicted_on_a_loaded_on_b_cluster(
    tmp_path: Path, hosts: list[Proc], redis_cluster: list[RedisNode]
) -> None:
    seeds = ",".join(n.url for n in redis_cluster)
    evict_to_l2_then_load_on_b(tmp_path, hosts, l2_env("redis-cluster", seeds))
    keys = sum(int(n.client().dbsize()) for n in redis_cluster)
    assert keys >= 10
    assert all(n.client().dbsize() > 0 for n in redis_cluster)  # spread over the masters


def test_evicted_on_a_loaded_on_b_valkey(
    tmp_path: Path, hosts: list[Proc], valkey_node: RedisNode
) -> None:
    with valkey_node.client() as c:
        assert "valkey_version" in c.info("server")  # the real thing, not Redis again
    evict_to_l2_then_load_on_b(tmp_path, hosts, l2_env("valkey", valkey_node.url))


def test_evicted_on_a_loaded_on_b_disk(tmp_path: Path, hosts: list[Proc]) -> None:
    evict_to_l2_then_load_on_b(tmp_path, hosts, l2_env("disk", directory=str(tmp_path / "l2")))


def test_write_through_is_found_on_b_while_a_still_holds_it(
    tmp_path: Path, hosts: list[Proc], redis_node: RedisNode
) -> None:
    a, b = start_pair(tmp_path, hosts, l2_env("redis", redis_node.url, mode="write-through"))
    try:
        x = chain("wt", 8)
        data = blocks(3, 8)
        a.store(x, data)
        assert a.client.call(p.Lookup(a.engine_id, x, salt=SALT)).hit_blocks == 8
        assert b.wait_hits(x) == 8
        assert np.array_equal(b.load(x), data)
    finally:
        a.close()
        b.close()


def test_a_block_prefix_on_the_host_and_the_rest_from_l2(
    tmp_path: Path, hosts: list[Proc], redis_node: RedisNode
) -> None:
    """B holds the chain's head itself; the tail comes from L2 and the two join up."""
    a, b = start_pair(tmp_path, hosts, l2_env("redis", redis_node.url, mode="write-through"))
    try:
        x = chain("split", 12)
        data = blocks(4, 12)
        a.store(x, data)
        b.store(x[:5], data[:5])
        assert b.wait_hits(x) == 12
        assert np.array_equal(b.load(x), data)
    finally:
        a.close()
        b.close()
