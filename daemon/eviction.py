"""Which ready host blocks to evict when the store runs short of free slots.

A policy sees only evictable slots: ready (committed) and not pinned by a reader. The store
calls the hooks as slots enter and leave that set, so a policy can keep its own O(1)
structures (for example one LRU list per agent priority class, keyed by the slot's ``tag``,
which the scheduler sets to an agent handle). The store validates every victim a policy
returns, so a buggy policy can skip an eviction but never corrupt the store.

Policies are entry points of the ``tokencake.eviction`` group (``tokencake.plugins``), imported
only when named, so a scheduler can plug its own in without the store importing it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Collection
from typing import ClassVar

from tokencake.daemon.slot_table import NO_SLOT, READY, SlotTable
from tokencake.plugins import Registry

logger = logging.getLogger(__name__)


class EvictionPolicy(ABC):
    """Picks victims among evictable (READY, unpinned) slots.

    Hooks receive the slot id and its ``tag``; ``table`` gives read access to every other
    field (``table.tag``, ``table.owner``, ``table.tenant`` ...). Hooks must not mutate it.
    """

    name: ClassVar[str] = ""

    def bind(self, table: SlotTable) -> None:
        """Called once by the store before any other hook."""
        self.table = table

    def on_evictable(self, slot: int, tag: int) -> None:  # noqa: B027 - optional hook
        """``slot`` became ready and unpinned (committed, or its last reader left)."""

    def on_unevictable(self, slot: int, tag: int) -> None:  # noqa: B027 - optional hook
        """``slot`` left the evictable set (pinned by a reader, dropped, or evicted)."""

    def on_access(self, slot: int, tag: int) -> None:  # noqa: B027 - optional hook
        """``slot`` was hit by a lookup or a load."""

    @abstractmethod
    def victims(self, count: int, protected: Collection[int]) -> list[int]:
        """Up to ``count`` distinct evictable slots, best victim first, none in ``protected``.

        Returning fewer is allowed (the reservation then covers a shorter prefix).
        """


class LruPolicy(EvictionPolicy):
    """Least recently used first, using the store's ready list, which is already LRU-ordered.

    O(1) per victim plus one step per protected slot met on the way.
    """

    name = "lru"

    def victims(self, count: int, protected: Collection[int]) -> list[int]:
        table = self.table
        out: list[int] = []
        s = table.first(READY)
        while s != NO_SLOT and len(out) < count:
            if s not in protected:
                out.append(s)
            s = table.after(s)
        return out


REGISTRY = Registry("tokencake.eviction")
"""Eviction policies by name: the ``tokencake.eviction`` entry points (``lru`` is built in)."""


class UnknownEvictionPolicyError(KeyError):
    """No eviction policy registered under that name."""


def register_policy(name: str, target: str) -> None:
    """Register ``"package.module:Class"`` under ``name``; replaces an earlier entry."""
    REGISTRY.register(name, target)


def available_policies() -> list[str]:
    return REGISTRY.names()


def make_policy(name: str) -> EvictionPolicy:
    """Import and instantiate the policy registered as ``name``."""
    try:
        cls = REGISTRY.load(name)
    except KeyError:
        raise UnknownEvictionPolicyError(
            f"unknown eviction policy {name!r}; known: {available_policies()}"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, EvictionPolicy)):
        raise TypeError(f"{REGISTRY.target(name)} is not an EvictionPolicy")
    policy: EvictionPolicy = cls()
    return policy
