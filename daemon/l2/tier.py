"""Moves values between the event loop and an L2 backend on worker threads.

The event loop only appends to bounded queues and drains a completion list; it never waits
on the store. Writes (``put``) beyond ``queue_bytes`` of pending payload are dropped and
counted; so are writes offered while the store is known to be down. Reads (``get``) serve
prefetches: a chain of keys in, the longest prefix whose values opened cleanly out. Workers
take reads before writes, batch writes into one pipeline, seal values (checksum) on the way
out and open them on the way in, so a torn, damaged or foreign value is dropped there and
counted, never handed to the event loop.

A backend error opens a breaker: for ``retry_s`` the tier drops writes and answers reads
with a miss without touching the store, then tries again. Correctness never depends on L2:
a lost write is a later miss, and a miss is KV the engine computes itself.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokencake.daemon.l2.backends import L2Backend, L2Error, L2Full
from tokencake.daemon.l2.codec import HEADER_BYTES, CorruptValue, open_value, seal_into

logger = logging.getLogger(__name__)

_LATENCY_BUCKETS: Final = (1e-4, 5e-4, 1e-3, 2e-3, 5e-3, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0)
_LOG_EVERY_S: Final = 10.0


class L2Metrics:
    """The tier's Prometheus series (thread-safe: workers and the loop both count)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry if registry is not None else CollectorRegistry()
        self.registry = r
        self.ops = Counter(
            "tokencake_l2_blocks_total",
            "L2 blocks by operation and result",
            ["op", "result"],
            registry=r,
        )
        self.dropped = Counter(
            "tokencake_l2_dropped_writes_total",
            "Blocks not written to L2, by reason (queue_full, unavailable, full, shutdown)",
            ["reason"],
            registry=r,
        )
        self.rejected = Counter(
            "tokencake_l2_rejected_values_total",
            "Values read from L2 and not served, by reason (torn, foreign, checksum, size)",
            ["reason"],
            registry=r,
        )
        self.bytes = Counter(
            "tokencake_l2_bytes_total",
            "Payload bytes moved to and from L2",
            ["direction"],
            registry=r,
        )
        self.latency = Histogram(
            "tokencake_l2_batch_seconds",
            "Time of one backend call (a pipeline of blocks)",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.queued_bytes = Gauge(
            "tokencake_l2_queued_bytes", "Payload bytes waiting to be written", registry=r
        )
        self.available = Gauge(
            "tokencake_l2_available",
            "1 while the L2 store answers, 0 while the breaker is open",
            registry=r,
        )
        self.available.set(1)

    def value(self, name: str, **labels: str) -> int:
        """One counter's value, e.g. ``value("tokencake_l2_blocks", op="put", ...)``."""
        return int(self.registry.get_sample_value(f"{name}_total", labels) or 0)

    def total(self, name: str) -> int:
        """Sum of a counter over all its labels, e.g. ``total("tokencake_l2_dropped_writes")``."""
        out = 0.0
        for family in self.registry.collect():
            if family.name == name:
                out += sum(s.value for s in family.samples if s.name == f"{name}_total")
        return int(out)


@dataclass(slots=True)
class GetJob:
    """A prefetch: ``keys`` in chain order; ``payloads`` is the clean prefix found."""

    token: Any
    keys: list[bytes]
    payloads: list[memoryview] = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0
    """The backend call's time (0 when the store was not asked)."""


class L2Tier:
    """Bounded queues in front of a backend, served by ``workers`` threads."""

    def __init__(
        self,
        backend: L2Backend,
        *,
        queue_bytes: int,
        workers: int = 2,
        batch: int = 32,
        max_gets: int = 1024,
        retry_s: float = 2.0,
        metrics: L2Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.metrics = metrics if metrics is not None else L2Metrics()
        self._queue_bytes = queue_bytes
        self._batch = max(1, batch)
        self._max_gets = max_gets
        self._retry_s = retry_s
        self._clock = clock
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # workers wait here for work
        self._drained = threading.Condition(lock)  # flush waits here for the queues to empty
        # (key, value buffer: header room + payload) waiting to be sealed and sent.
        self._puts: deque[tuple[bytes, np.ndarray]] = deque()
        # Value buffers come back here after a write: a fresh 256 KiB buffer per block costs
        # page faults (an mmap per allocation) that took longer than the copy itself.
        self._free: dict[int, list[np.ndarray]] = {}
        self._free_bytes = 0
        self._gets: deque[GetJob] = deque()
        self._done: deque[GetJob] = deque()
        self._pending_bytes = 0
        self._gets_in_flight = 0
        self._down_until = 0.0
        self._last_log = -_LOG_EVERY_S
        self._stopping = False
        self._busy = 0
        self._threads = [
            threading.Thread(target=self._work, name=f"tokencake-l2-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for t in self._threads:
            t.start()

    # ------------------------------------------------------------------ event loop side

    @property
    def available(self) -> bool:
        return self._clock() >= self._down_until

    def put(
        self, key: bytes, payload: bytes | np.ndarray, *, wait_until: float | None = None
    ) -> bool:
        """Queue one write; False (and counted) when it is dropped. Never blocks on the store.

        ``payload`` (bytes, or a view into the arena) is copied only when the write is taken.
        ``wait_until`` (a ``time.monotonic`` deadline; shutdown only, never the event loop)
        waits for room in a full queue instead of dropping the write at once.
        """
        if not self.available:
            self.metrics.dropped.labels("unavailable").inc()
            return False
        if isinstance(payload, np.ndarray):
            src = payload.reshape(-1).view(np.uint8)
        else:
            src = np.frombuffer(payload, np.uint8)
        nbytes = src.nbytes
        size = HEADER_BYTES + nbytes
        with self._cond:
            while self._pending_bytes + nbytes > self._queue_bytes:
                left = -1.0 if wait_until is None else wait_until - time.monotonic()
                if left <= 0 or not self._pending_bytes:
                    self.metrics.dropped.labels("queue_full").inc()
                    return False
                self._drained.wait(min(left, 0.05))
            self._pending_bytes += nbytes  # the room is taken now; the block follows
            pool = self._free.get(size)
            buf = pool.pop() if pool else None
            if buf is not None:
                self._free_bytes -= size
        if buf is None:
            buf = np.empty(size, np.uint8)  # not zeroed: every byte is written below
        # Outside the lock, and numpy copies without the GIL: the workers send meanwhile.
        np.copyto(buf[HEADER_BYTES:], src)
        with self._cond:
            self._puts.append((key, buf))
            # Wake a worker when the queue stops being empty or fills another batch, not
            # for every block: each wake-up is a GIL hand-off away from the event loop.
            if len(self._puts) % self._batch == 1 or self._batch == 1:
                self._cond.notify()
        return True

    def get(self, token: Any, keys: Sequence[bytes]) -> bool:
        """Queue one prefetch; its result comes back from :meth:`completed` with ``token``."""
        if not keys:
            return False
        if not self.available:
            self.metrics.ops.labels("get", "unavailable").inc(len(keys))
            return False
        with self._cond:
            if len(self._gets) >= self._max_gets:
                self.metrics.ops.labels("get", "queue_full").inc(len(keys))
                return False
            self._gets.append(GetJob(token, list(keys)))
            self._gets_in_flight += 1
            self._cond.notify()
        return True

    def completed(self, limit: int = 64) -> list[GetJob]:
        """Finished prefetches, oldest first, at most ``limit``."""
        out: list[GetJob] = []
        while self._done and len(out) < limit:
            out.append(self._done.popleft())
        if out:
            with self._cond:
                self._gets_in_flight -= len(out)
        return out

    @property
    def gets_in_flight(self) -> int:
        """Prefetches queued, running, or finished and not yet taken by :meth:`completed`."""
        return self._gets_in_flight

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued write and read finished (tests, benchmarks, shutdown)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._puts or self._gets or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._drained.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        for t in self._threads:
            t.join(timeout=5.0)
        self.backend.close()

    # ------------------------------------------------------------------ workers

    def _work(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._puts or self._gets):
                    self._cond.wait()
                if self._stopping:
                    return
                job: GetJob | None = None
                batch: list[tuple[bytes, np.ndarray]] = []
                if self._gets:
                    job = self._gets.popleft()
                else:
                    while self._puts and len(batch) < self._batch:
                        batch.append(self._puts.popleft())
                    self._pending_bytes -= sum(len(v) - HEADER_BYTES for _, v in batch)
                    if self._puts:
                        self._cond.notify()  # more than a batch waits: another worker
                queued = self._pending_bytes
                self._busy += 1
            self.metrics.queued_bytes.set(queued)
            try:
                if job is not None:
                    self._run_get(job)
                else:
                    self._run_put(batch)
            except Exception:  # a bug must cost one batch, never the worker
                logger.exception("L2 worker failed")
            finally:
                with self._cond:
                    self._busy -= 1
                    self._recycle(batch)
                    # Room in the queue, or all done: flush and a shutdown's puts wait here.
                    self._drained.notify_all()

    def _recycle(self, batch: list[tuple[bytes, np.ndarray]]) -> None:
        """Keep sent buffers for the next writes, up to the queue's size (lock held)."""
        for _, buf in batch:
            if self._free_bytes + len(buf) > self._queue_bytes:
                break
            self._free.setdefault(len(buf), []).append(buf)
            self._free_bytes += len(buf)

    def _run_put(self, batch: list[tuple[bytes, np.ndarray]]) -> None:
        nbytes = sum(len(v) - HEADER_BYTES for _, v in batch)
        if not self.available:
            self.metrics.dropped.labels("unavailable").inc(len(batch))
            return
        values = [(k, v.data) for k, v in batch]
        for k, value in values:
            seal_into(k, value)
        start = time.perf_counter()
        try:
            stored = self.backend.put_many(values)
        except L2Full as exc:
            self.metrics.dropped.labels("full").inc(len(batch))
            self._warn("L2 store full; writes dropped: %s", exc)
            return
        except L2Error as exc:
            self.metrics.dropped.labels("unavailable").inc(len(batch))
            self._trip(exc)
            return
        self.metrics.latency.labels("put").observe(time.perf_counter() - start)
        self.metrics.ops.labels("put", "stored").inc(stored)
        if stored < len(batch):
            self.metrics.dropped.labels("full").inc(len(batch) - stored)
        self.metrics.bytes.labels("out").inc(nbytes * stored // len(batch))
        self._recover()

    def _run_get(self, job: GetJob) -> None:
        try:
            if not self.available:
                self.metrics.ops.labels("get", "unavailable").inc(len(job.keys))
                job.error = "unavailable"
                return
            start = time.perf_counter()
            try:
                values = self.backend.get_many(job.keys)
            except L2Error as exc:
                self.metrics.ops.labels("get", "unavailable").inc(len(job.keys))
                job.error = str(exc)
                self._trip(exc)
                return
            job.seconds = time.perf_counter() - start
            self.metrics.latency.labels("get").observe(job.seconds)
            self._recover()
            for key, value in zip(job.keys, values, strict=True):
                if value is None:
                    break
                try:
                    payload = open_value(key, value)
                except CorruptValue as exc:
                    self.metrics.rejected.labels(exc.reason).inc()
                    self._warn("L2 value not served (%s): %s", exc.reason, exc)
                    break
                job.payloads.append(payload)
            hits = len(job.payloads)
            self.metrics.ops.labels("get", "hit").inc(hits)
            self.metrics.ops.labels("get", "miss").inc(len(job.keys) - hits)
            self.metrics.bytes.labels("in").inc(sum(len(v) for v in job.payloads))
        finally:
            self._done.append(job)

    def _trip(self, exc: Exception) -> None:
        self._down_until = self._clock() + self._retry_s
        self.metrics.available.set(0)
        self._warn("L2 store unavailable for %.1fs: %s", self._retry_s, exc)

    def _recover(self) -> None:
        self.metrics.available.set(1)

    def _warn(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            logger.warning(msg, *args)
