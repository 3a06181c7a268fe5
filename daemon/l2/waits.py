"""Lookups that wait a little for L2 (``l2_lookup_wait_ms``), without holding the loop.

A lookup whose chain goes on past the host's blocks, while a prefetch of the rest is in
flight, is answered later: when that prefetch has been placed in the arena (the KV service
polls for it) or when the bound runs out, whichever is first. Meanwhile the loop serves
other requests. The late answer is an ordinary lookup of the store, so it reports only
blocks in the arena: whole, of the right size, their checksums checked on the worker.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from tokencake.daemon.timers import Timers

MAX_WAITING: Final = 4096
"""Lookups waiting at most; more are answered at once with what the host has."""

ChainStart = tuple[int, str, bytes]
"""``(layout, salt, first missing hash)``: the prefetch a lookup waits for."""


@dataclass(slots=True, eq=False)
class _Wait:
    start: ChainStart
    answer: Callable[[], None]


class LookupWaits:
    def __init__(self, timers: Timers) -> None:
        self._timers = timers
        self._waiting: dict[int, _Wait] = {}
        self._next = 0

    def __len__(self) -> int:
        return len(self._waiting)

    @property
    def full(self) -> bool:
        return len(self._waiting) >= MAX_WAITING

    def add(self, start: ChainStart, wait_s: float, answer: Callable[[], None]) -> None:
        """``answer()`` runs once: when :meth:`settle` finds ``start`` no longer in flight,
        or after ``wait_s``."""
        self._next += 1
        ident = self._next
        self._waiting[ident] = _Wait(start, answer)
        self._timers.schedule(wait_s, lambda: self._finish(ident))

    def settle(self, in_flight: Callable[[ChainStart], bool]) -> None:
        """Answer the lookups whose prefetch has finished (after the bridge's ``poll``)."""
        for ident in [i for i, w in self._waiting.items() if not in_flight(w.start)]:
            self._finish(ident)

    def answer_all(self) -> None:
        """Answer every waiting lookup now (the daemon is stopping)."""
        for ident in list(self._waiting):
            self._finish(ident)

    def _finish(self, ident: int) -> None:
        wait = self._waiting.pop(ident, None)
        if wait is not None:  # else answered already
            wait.answer()
