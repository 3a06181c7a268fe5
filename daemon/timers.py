"""The event loop's timers: a heap of (due time, callback) on the daemon's monotonic clock.

The loop asks ``run_due`` for the time to the next timer and uses it as its receive timeout,
so timers run between messages, on the loop's one thread.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

IDLE_TIMEOUT_MS = 1000
"""The loop's receive timeout when no timer is due sooner."""


class Timers:
    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0

    def schedule(self, delay_s: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` once, ``delay_s`` from now."""
        self._seq += 1
        heapq.heappush(self._heap, (self._clock() + delay_s, self._seq, fn))

    def run_due(self) -> int:
        """Run every timer that is due; return milliseconds to the next one (at most 1 s).

        A failing timer is logged and does not stop the others.
        """
        now = self._clock()
        while self._heap and self._heap[0][0] <= now:
            _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:
                logger.exception("timer failed")
            now = self._clock()
        if not self._heap:
            return IDLE_TIMEOUT_MS
        return max(0, min(IDLE_TIMEOUT_MS, int((self._heap[0][0] - now) * 1000) + 1))
