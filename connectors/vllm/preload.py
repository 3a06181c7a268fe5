"""Predictive upload into vLLM's GPU blocks: the agent's KV is back before its next request.

The daemon decides ``upload`` shortly before an agent's tool call is predicted to return.
The connector then brings the agent's host KV into GPU blocks a few at a time (gradual
reservation): each engine step it takes at most ``preload_chunk_blocks`` blocks from vLLM's
free queue, the worker copies the agent's host slots into them, and once the copy is done
each block is registered in vLLM's prefix cache under its chain hash and released
(``ref_cnt`` 0, at the evict-last end of the free queue). The continuation then finds a
local prefix hit and waits for no load at all.

It never takes memory a request needs: a step's blocks are taken after vLLM has allocated
for every running and admitted request (``build_connector_meta`` runs at the end of
``schedule``), and only beyond what the waiting requests still need, one block per running
request for its decode, and ``preload_min_free`` of the pool. A block whose copy failed is
released without a hash, so it can never be served. A request that arrives for the same
prefix while a chunk is in flight does not see those blocks (they have no hash yet); it
loads from the host itself, and the preloaded duplicate is released unhashed.

Nothing here talks to the daemon; ``TokenCakeConnector`` pins the host slots
(``load_begin``) and queues the copies.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vllm.v1.core.kv_cache_utils import BlockHash, make_block_hash_with_group_id

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool


@dataclass(slots=True)
class Preload:
    """One agent's predictive upload in progress."""

    hashes: list[bytes]
    """The agent's chain hashes, one per full engine block, in prefix order."""
    deadline: float
    """Monotonic time after which no further chunk is started (``hold_max_s``)."""
    inflight: int = 0
    """The job id of the chunk being copied (0: none); one chunk at a time."""
    done: bool = False
    """No further chunk: the agent's request arrived, or the host had no more."""
    brought: int = 0
    """How far into ``hashes`` the chunks started so far reach. A preload whose resident
    prefix falls short of it saw its own blocks evicted: the memory is wanted, and it ends
    rather than copy them again (two preloads in a tight pool could otherwise evict each
    other's blocks and copy them back until their deadline)."""


def budget(
    pool: BlockPool, *, waiting_blocks: int, running: int, min_free: float, want: int
) -> int:
    """How many free blocks a predictive upload may take now (0 or more, at most ``want``).

    Free blocks are vLLM's count, idle cached blocks included (taking one evicts its cached
    KV, as any allocation would).
    """
    keep = waiting_blocks + running + int(min_free * pool.num_gpu_blocks)
    return max(0, min(want, pool.get_num_free_blocks() - keep))


def take(pool: BlockPool, n: int) -> list[int]:
    """Take ``n`` blocks from the free queue for a copy (``ref_cnt`` 1 each)."""
    return [b.block_id for b in pool.get_new_blocks(n)] if n > 0 else []


def register(
    pool: BlockPool, block_ids: list[int], hashes: list[bytes], first: int, block_size: int
) -> int:
    """The copy into ``block_ids`` is done: register each block under its chain hash (block
    ``first + i`` of the agent's prefix) and release it. A hash vLLM already caches (a
    request computed or loaded it meanwhile) keeps its block; ours is released unhashed.
    Returns the blocks registered."""
    registered = 0
    blocks = [pool.blocks[b] for b in block_ids]
    for i, (block, chain) in enumerate(zip(blocks, hashes, strict=True)):
        if pool.get_cached_block(BlockHash(chain), [0]) is not None:
            continue
        key = make_block_hash_with_group_id(BlockHash(chain), 0)
        # vLLM's own path for a full block (cache_full_blocks) takes this step too.
        pool._insert_block_hash(key, block, num_tokens=(first + i + 1) * block_size)
        registered += 1
    pool.free_blocks(blocks)
    return registered


def release(pool: BlockPool, block_ids: list[int]) -> None:
    """The copy failed or was abandoned: release the blocks with no hash (reused first)."""
    pool.free_blocks(pool.blocks[b] for b in block_ids)
