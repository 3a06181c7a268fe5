"""Simulated KV memory: the engine's paged GPU pool with a prefix cache, and the host store.

The GPU pool follows vLLM v1's block pool: a block is identified by the hash chain of the
tokens it holds (``chain_keys``), finished requests leave their blocks cached and evictable
rather than freed, and a new request reuses every cached block of its prefix. Who may be
evicted, and in which order, is the policy's call (``Policy.eviction_order``); the pool
only offers candidates grouped by the agent that used them last.

Block states (``where``): FREE (no content), CACHED (content, evictable), GHOST (content
already copied to the host and released by an offload: counted free, reused first, still a
hit until reused), USED (held by a request or an in-flight upload: ``ref > 0``), LOCKED (idle
but being copied to the host, so not evictable until the copy ends).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

FREE, CACHED, GHOST, USED, LOCKED = 0, 1, 2, 3, 4


class PoolInvariantError(AssertionError):
    """The simulated pool's books do not balance: a bug in the engine, never a policy."""


def chain_keys(segments: Iterable[tuple[int, int]], block_tokens: int) -> list[int]:
    """Hash-chain keys of every *full* block of a token sequence given as segments.

    Block ``i``'s key hashes block ``i-1``'s key with the pieces of segments it covers, so
    two sequences share block ``i`` exactly when they share all tokens up to its end.
    Python's tuple-of-int hash is deterministic across runs (no string hashing involved).
    """
    keys: list[int] = []
    prev = 0
    pieces: list[int] = []
    fill = 0
    for sid, n in segments:
        off = 0
        while off < n:
            take = min(block_tokens - fill, n - off)
            pieces.append(sid)
            pieces.append(off)
            pieces.append(take)
            off += take
            fill += take
            if fill == block_tokens:
                prev = hash((prev, *pieces))
                keys.append(prev)
                pieces.clear()
                fill = 0
    return keys


@dataclass(slots=True, eq=False)
class AgentKv:
    """The engine's record of one agent (DAG node): its last sequence and its cached blocks."""

    app_id: str
    agent_id: str
    seq_keys: list[int] = field(default_factory=list)
    last_used_s: float = 0.0
    cached: dict[int, None] = field(default_factory=dict)
    """Evictable GPU blocks last used by this agent, in position order (evict from the end)."""


class GpuPool:
    """GPU KV blocks. ``num_blocks=None`` is unbounded (the oracle's infinite memory)."""

    def __init__(self, num_blocks: int | None) -> None:
        self.unbounded = num_blocks is None
        self.total = num_blocks if num_blocks is not None else 0
        n = self.total
        self.ref: list[int] = [0] * n
        self.key: list[int] = [0] * n
        self.where: list[int] = [FREE] * n
        self.owner: list[AgentKv | None] = [None] * n
        self.free_clean: list[int] = list(range(n - 1, -1, -1))
        self.ghost: OrderedDict[int, None] = OrderedDict()
        self.by_key: dict[int, int] = {}
        self.agents_with_cache: dict[AgentKv, None] = {}
        self.locks: dict[int, list[int]] = {}
        """Blocks being copied to the host: block -> [copies in flight, 1 if an ended one
        moved it]."""
        self.used = 0
        self.n_cached = 0
        self.epoch = 0
        """Bumped whenever content leaves the cache; lets callers reuse prefix walks."""

    # ------------------------------------------------------------------ accounting

    @property
    def free(self) -> int:
        """Blocks allocatable without evicting anything (FREE + GHOST)."""
        return len(self.free_clean) + len(self.ghost)

    def _grow(self) -> int:
        b = len(self.ref)
        self.ref.append(0)
        self.key.append(0)
        self.where.append(FREE)
        self.owner.append(None)
        self.total += 1
        return b

    def _detach(self, b: int) -> None:
        """Take an idle block out of whichever free/cached structure holds it."""
        w = self.where[b]
        if w == CACHED:
            o = self.owner[b]
            assert o is not None
            del o.cached[b]
            self.n_cached -= 1
            if not o.cached:
                self.agents_with_cache.pop(o, None)
        elif w == GHOST:
            del self.ghost[b]

    def _drop_content(self, b: int) -> None:
        k = self.key[b]
        if k and self.by_key.get(k) == b:
            del self.by_key[k]
            self.epoch += 1
        self.key[b] = 0

    # ------------------------------------------------------------------ requests

    def touch(self, b: int) -> None:
        """A request (or an upload) starts using block ``b``."""
        if self.ref[b] == 0:
            self._detach(b)
            self.where[b] = USED
            self.used += 1
        self.ref[b] += 1

    def release(self, b: int, agent: AgentKv, now: float) -> None:
        """One holder of ``b`` is done; an idle block with content stays cached for ``agent``."""
        r = self.ref[b] - 1
        if r < 0:
            raise PoolInvariantError(f"block {b} released more often than used")
        self.ref[b] = r
        if r:
            return
        self.used -= 1
        if self.key[b] and self.by_key.get(self.key[b]) == b:
            self._cache(b, agent)
        else:
            self.key[b] = 0
            self.where[b] = FREE
            self.owner[b] = None
            self.free_clean.append(b)
        agent.last_used_s = now

    def _cache(self, b: int, agent: AgentKv) -> None:
        self.where[b] = CACHED
        self.owner[b] = agent
        agent.cached[b] = None
        self.n_cached += 1
        self.agents_with_cache[agent] = None

    def register(self, b: int, key: int) -> bool:
        """Block ``b`` now holds the content ``key`` (computed or uploaded)."""
        if key in self.by_key:
            return False
        self.by_key[key] = b
        self.key[b] = key
        return True

    # ------------------------------------------------------------------ allocation

    def allocate(
        self, n: int, victims: Callable[[], list[AgentKv]]
    ) -> tuple[list[int], dict[AgentKv, int]] | None:
        """``n`` blocks for a holder (ref 1 each), evicting in the policy's order if needed.

        Returns the blocks and the evictions per agent, or None (and changes nothing) when
        even eviction cannot free enough.
        """
        out: list[int] = []
        evicted: dict[AgentKv, int] = {}
        if self.unbounded:
            while len(out) < n:
                b = self.free_clean.pop() if self.free_clean else self._grow()
                out.append(b)
        else:
            short = n - self.free
            order: list[AgentKv] = []
            if short > 0:
                order = victims()
                if sum(len(a.cached) for a in order) < short:
                    return None
            while len(out) < n and self.free_clean:
                out.append(self.free_clean.pop())
            while len(out) < n and self.ghost:
                b, _ = self.ghost.popitem(last=False)
                self._drop_content(b)
                out.append(b)
            for agent in order:
                if len(out) >= n:
                    break
                while agent.cached and len(out) < n:
                    b = next(reversed(agent.cached))
                    self._detach(b)
                    self._drop_content(b)
                    out.append(b)
                    evicted[agent] = evicted.get(agent, 0) + 1
        for b in out:
            self.where[b] = USED
            self.owner[b] = None
            self.ref[b] = 1
        self.used += len(out)
        return out, evicted

    # ------------------------------------------------------------------ policy actions

    def lock(self, b: int) -> None:
        """A copy of ``b`` to the host starts: an idle block is not evictable until the last
        copy of it ends (two agents sharing a prefix can offload the same block at once)."""
        held = self.locks.get(b)
        if held is None:
            self.locks[b] = [1, 0]
        else:
            held[0] += 1
        if self.ref[b] == 0:
            self._detach(b)
            self.where[b] = LOCKED

    def unlock(self, b: int, agent: AgentKv, to_ghost: bool) -> None:
        """A copy of ``b`` ended; after the last one an idle block becomes GHOST (some copy
        moved it) or CACHED (copies only)."""
        held = self.locks.get(b)
        if held is not None:
            held[0] -= 1
            held[1] |= int(to_ghost)
            if held[0] > 0:
                return
            del self.locks[b]
            to_ghost = to_ghost or bool(held[1])
        if self.ref[b] > 0:
            return
        self._detach(b)
        if not self.key[b] or self.by_key.get(self.key[b]) != b:
            self.key[b] = 0
            self.where[b] = FREE
            self.free_clean.append(b)
        elif to_ghost:
            self.where[b] = GHOST
            self.owner[b] = None
            self.ghost[b] = None
        else:
            self._cache(b, self.owner[b] or agent)

    def discard(self, agent: AgentKv, limit: int = 0) -> int:
        """Free up to ``limit`` (0: all) of the agent's cached blocks, tail first (a ``Drop``)."""
        n = 0
        victims = list(reversed(agent.cached))
        if limit > 0:
            victims = victims[:limit]
        for b in victims:
            self._detach(b)
            self._drop_content(b)
            self.where[b] = FREE
            self.owner[b] = None
            self.free_clean.append(b)
            n += 1
        return n

    def check(self) -> None:
        """Recount everything; raises PoolInvariantError when the books do not balance."""
        if self.unbounded:
            return
        counts = [0] * 5
        for w in self.where:
            counts[w] += 1
        if sum(counts) != self.total:
            raise PoolInvariantError("block states do not add up to the pool size")
        if counts[FREE] != len(self.free_clean) or counts[GHOST] != len(self.ghost):
            raise PoolInvariantError("free lists disagree with block states")
        if counts[USED] != self.used or counts[CACHED] != self.n_cached:
            raise PoolInvariantError("used/cached counters disagree with block states")
        if any((self.ref[b] > 0) != (self.where[b] == USED) for b in range(self.total)):
            raise PoolInvariantError("a block's refcount disagrees with its state")


class SimHostStore:
    """Host KV blocks keyed by hash chain, LRU-evicted when full (the CPU block buffer)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.lru: OrderedDict[int, AgentKv] = OrderedDict()
        self.writing: set[int] = set()
        self.epoch = 0
        self.unread: set[int] = set()
        """Keys written by an offload and not read (loaded or uploaded) since."""
        self.dropped_unread = 0
        """Blocks that left the store (dropped, evicted) without ever being read."""

    @property
    def free(self) -> int:
        return self.capacity - len(self.lru) - len(self.writing)

    def has(self, key: int) -> bool:
        return key in self.lru

    def touch(self, key: int) -> None:
        """A read (a load or an upload) of ``key``, which is the most recently used."""
        self.lru.move_to_end(key)
        self.unread.discard(key)

    def _gone(self, key: int) -> None:
        if key in self.unread:
            self.unread.discard(key)
            self.dropped_unread += 1

    def reserve(self, keys: list[int]) -> dict[AgentKv, int]:
        """Room for ``keys`` being written, evicting least-recently-used blocks if needed."""
        evicted: dict[AgentKv, int] = {}
        need = len(keys) - self.free
        while need > 0 and self.lru:
            key, owner = self.lru.popitem(last=False)
            self._gone(key)
            self.epoch += 1
            evicted[owner] = evicted.get(owner, 0) + 1
            need -= 1
        if need > 0:
            raise PoolInvariantError("host store reservation exceeds its capacity")
        self.writing.update(keys)
        return evicted

    def commit(self, keys: list[int], owner: AgentKv) -> None:
        for k in keys:
            self.writing.discard(k)
            self.lru[k] = owner
            self.lru.move_to_end(k)
            self.unread.add(k)

    def drop_agent(self, keys: Iterable[int], limit: int = 0) -> int:
        """Forget up to ``limit`` (0: all) of these keys, last first."""
        n = 0
        for k in reversed(list(keys)):
            if limit and n >= limit:
                break
            if self.lru.pop(k, None) is not None:
                self._gone(k)
                n += 1
        self.epoch += 1
        return n
