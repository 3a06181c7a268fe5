"""The GPU block pool's copy locks (``GpuPool.lock``/``unlock``)."""

from __future__ import annotations

from tokencake.sim.kvpool import GHOST, AgentKv, GpuPool


def test_a_block_copied_twice_at_once_is_freed_once() -> None:
    """Two agents that share a prefix can offload the same block at once. Found on
    Code-Writer with InferCept once the simulator settled every offloaded block: the first
    unlock freed the block, the second put it on the free list again, and the pool handed
    one block to two holders ("block 2427 released more often than used")."""
    pool = GpuPool(4)
    a, b = AgentKv("app", "a"), AgentKv("app", "b")
    res = pool.allocate(1, list)
    assert res is not None
    (blk,), _ = res
    pool.register(blk, 7)
    pool.release(blk, a, 0.0)  # idle and cached
    pool.lock(blk)  # a's offload (a move)
    pool.lock(blk)  # b's copy of the shared prefix
    pool.unlock(blk, a, to_ghost=True)
    pool.check()
    assert pool.free == 3  # still held by b's copy
    pool.unlock(blk, b, to_ghost=False)
    pool.check()
    assert pool.where[blk] == GHOST  # one copy moved it: freed, once
    assert pool.free == 4
    res = pool.allocate(4, list)
    assert res is not None
    assert sorted(res[0]) == [0, 1, 2, 3]
