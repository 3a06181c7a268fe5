"""Tables the policy learns into, keyed by names clients choose: bounded.

Agent types and tool kinds come from the apps' DAGs and events. A framework that names
them per instance (``agent-7f3c``, ``search:<query id>``) would otherwise add an entry per
app to every learned table, forever: the soak's fixed names never showed it, a daemon
running such apps for a month would. Each table keeps at most ``LEARNED_KEYS_MAX`` keys and
forgets the one updated longest ago; a forgotten key is a cold key again (the hint, the
tool kind's history or the default), as on a fresh daemon. Counters that return to zero
leave their table.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

K = TypeVar("K")
V = TypeVar("V")

LEARNED_KEYS_MAX = 1024
"""Keys per learned table: far above the (agent type, tool kind) pairs of real workloads,
and a few hundred KB at most per table."""


def learned(table: dict[K, V], key: K, make: Callable[[], V]) -> V:
    """``table[key]`` (made with ``make`` if absent), now the most recently updated key;
    past ``LEARNED_KEYS_MAX`` keys the least recently updated one is dropped."""
    value = table.pop(key, None)
    if value is None:
        value = make()
        while len(table) >= LEARNED_KEYS_MAX:
            del table[next(iter(table))]
    table[key] = value
    return value


def add_count(table: dict[K, int], key: K, delta: int) -> None:
    """``table[key] += delta``; a count back at zero is removed (absent reads as zero)."""
    value = table.get(key, 0) + delta
    if value:
        table[key] = value
    else:
        table.pop(key, None)
