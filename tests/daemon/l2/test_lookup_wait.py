"""A lookup whose chain goes on in L2 waits for it, within ``l2_lookup_wait_ms``, and the
daemon serves other requests meanwhile. Real daemons, real shared memory, a real
redis-server (stalled with ``CLIENT PAUSE``)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from tests.daemon.l2.redis_procs import RedisNode
from tests.daemon.l2.test_faults import pause, wait_unpaused
from tests.daemon.l2.test_two_daemons import SALT, Engine, blocks, chain, l2_env
from tests.procs import Proc, start
from tokencake import protocol as p


def wait_keys(node: RedisNode, n: int, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while node.client().dbsize() < n:
        assert time.monotonic() < deadline, "write-through did not reach redis"
        time.sleep(0.02)


def test_first_lookup_returns_what_l2_fetched_within_the_wait(
    tmp_path: Path, redis_node: RedisNode
) -> None:
    env = l2_env("redis", redis_node.url, mode="write-through")
    a_proc = start(tmp_path, arena="4MiB", env=env)
    b_proc = start(tmp_path, arena="4MiB", env={**env, "TOKENCAKE_L2_LOOKUP_WAIT_MS": "5000"})
    a, b = Engine(a_proc, "engine-a"), Engine(b_proc, "engine-b")
    try:
        x = chain("wait", 12)
        data = blocks(11, 12)
        a.store(x[:8], data[:8])
        b.store(x[:3], data[:3])  # B's head; the tail waits in L2
        wait_keys(redis_node, 8)
        # One lookup, no retries: blocks 3..7 come from L2 before the reply; 8.. are nowhere.
        assert b.client.call(p.Lookup(b.engine_id, x, salt=SALT)).hit_blocks == 8
        assert np.array_equal(b.load(x[:8]), data[:8])
        assert b.client.call(p.Stats()).l2["placed_blocks"] == 5
    finally:
        a.close()
        b.close()
        _stop(a_proc, b_proc)


def test_a_stalled_store_holds_a_lookup_only_to_the_bound(
    tmp_path: Path, redis_node: RedisNode
) -> None:
    env = {
        **l2_env("redis", redis_node.url),
        "TOKENCAKE_L2_LOOKUP_WAIT_MS": "2000",
        "TOKENCAKE_L2_TIMEOUT_S": "30",  # the stall outlasts the bound
    }
    d = start(tmp_path, arena="4MiB", env=env)
    e = Engine(d, "engine")
    other = Engine(d, "other")
    got: list[int] = []
    try:
        pause(redis_node, 5000)
        started = time.monotonic()
        t = threading.Thread(
            target=lambda: got.append(
                e.client.call(p.Lookup(e.engine_id, chain("stalled", 4), salt=SALT)).hit_blocks
            )
        )
        t.start()
        time.sleep(0.2)
        # The waiting lookup does not hold the loop: another engine is served meanwhile.
        assert other.client.call(p.Ping()).protocol_version >= 1
        assert t.is_alive() and not got
        t.join(30)
        elapsed = time.monotonic() - started
        assert got == [0]
        assert elapsed < 4.5  # the bound (2 s) and a generous margin, not the stall (5 s)
        wait_unpaused(redis_node)
    finally:
        e.close()
        other.close()
        _stop(d)


def _stop(*procs: Proc) -> None:
    for proc in procs:
        assert proc.stop() == 0
