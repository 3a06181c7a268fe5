"""The engine's side of the block-ownership protocol for daemon-driven GPU copies.

An engine lends GPU blocks to the daemon's copy worker for one copy at a time and must not
reuse a lent block until the copy is over. ``BlockLedger`` is that rule as a state machine,
with no I/O; ``DaemonCopies`` drives it over a ``Client``.

    lend ----------> LENT --- status done/failed/unknown ------------> settled (blocks free)
                      |
                      +-- daemon lost (no reply, restart, re-registration)
                      v
                   ORPHANED --- the worker's process is gone, or deadline_s passed --> settled
                                (failed)

A settled load that did not succeed leaves its blocks' contents unknown: the engine must
recompute them, never serve them. "unknown" from the daemon (it forgot the copy, or is a new
daemon) is a failure, and ORPHANED waits for the old worker first because only a dead
process is sure to move no more bytes.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from tokencake import protocol as p
from tokencake.clients.client import DaemonUnavailable, TokenCakeClient
from tokencake.protocol import RemoteError

logger = logging.getLogger(__name__)

Direction = Literal["upload", "offload"]


class BlockBusy(ValueError):
    """A block is already lent to a copy still in flight."""


@dataclass(slots=True)
class Loan:
    copy_id: int
    blocks: tuple[int, ...]
    slots: tuple[int, ...]
    direction: Direction
    worker_pid: int
    orphaned_at: float = -1.0


@dataclass(slots=True, frozen=True)
class Settled:
    """A loan that is over: its blocks are the engine's again."""

    copy_id: int
    blocks: tuple[int, ...]
    slots: tuple[int, ...]
    direction: Direction
    ok: bool
    reason: str = ""


class BlockLedger:
    """Which GPU blocks are lent, and when they come back. Pure state; the clock is injected."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._loans: dict[int, Loan] = {}
        self._lent: dict[int, int] = {}  # block -> copy id
        self._ids = itertools.count(1)

    def lend(
        self, blocks: Sequence[int], slots: Sequence[int], direction: Direction, worker_pid: int
    ) -> Loan:
        if len(blocks) != len(slots) or len(set(blocks)) != len(blocks):
            raise ValueError("one slot per block, no block twice")
        busy = [b for b in blocks if b in self._lent]
        if busy:
            raise BlockBusy(f"blocks {busy[:8]} are lent to copy {self._lent[busy[0]]}")
        loan = Loan(next(self._ids), tuple(blocks), tuple(slots), direction, worker_pid)
        self._loans[loan.copy_id] = loan
        for b in blocks:
            self._lent[b] = loan.copy_id
        return loan

    def is_lent(self, block: int) -> bool:
        return block in self._lent

    def running(self) -> list[int]:
        """Copy ids the daemon may still report on (lent, not orphaned)."""
        return [c for c, loan in self._loans.items() if loan.orphaned_at < 0]

    def orphaned(self) -> list[int]:
        return [c for c, loan in self._loans.items() if loan.orphaned_at >= 0]

    def settle(self, copy_id: int, ok: bool, reason: str = "") -> Settled | None:
        """The copy is over; None when it is not lent (already settled, or never)."""
        loan = self._loans.pop(copy_id, None)
        if loan is None:
            return None
        for b in loan.blocks:
            del self._lent[b]
        return Settled(copy_id, loan.blocks, loan.slots, loan.direction, ok, reason)

    def orphan(self, copy_id: int) -> None:
        """Nobody will report this loan any more, but its copy may still be running."""
        loan = self._loans.get(copy_id)
        if loan is not None and loan.orphaned_at < 0:
            loan.orphaned_at = self._clock()

    def orphan_all(self) -> None:
        """The daemon that held the loans is lost."""
        for copy_id in self.running():
            self.orphan(copy_id)

    def reap(self, deadline_s: float, worker_gone: Callable[[int], bool]) -> list[Settled]:
        """Settle (as failed) the orphans that can no longer be written: their worker's
        process is gone, or ``deadline_s`` has passed since they were orphaned."""
        now = self._clock()
        due = [
            c
            for c, loan in self._loans.items()
            if loan.orphaned_at >= 0
            and (now - loan.orphaned_at >= deadline_s or worker_gone(loan.worker_pid))
        ]
        out = [self.settle(c, False, "the daemon was lost while the copy ran") for c in due]
        return [s for s in out if s is not None]


class WorkerWatch:
    """Whether the copy worker's process is gone, by pidfd where the kernel offers one (no
    pid reuse can fool it), else never known (the caller's deadline decides)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._fd = -1
        with contextlib.suppress(OSError, AttributeError):
            self._fd = os.pidfd_open(pid)

    def gone(self) -> bool:
        if self._fd < 0:
            return False
        readable, _, _ = select.select([self._fd], [], [], 0)
        return bool(readable)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class DaemonCopies:
    """Lend blocks to the daemon's copy worker and learn when they come back.

    ``share`` after every registration (a new daemon, or a re-registration, knows nothing of
    the tensors); ``lend`` per copy; ``poll`` once per engine step: it returns the loans that
    are over, each exactly once.
    """

    def __init__(
        self, client: TokenCakeClient, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.client = client
        self.ledger = BlockLedger(clock)
        self.engine_id = ""
        self.deadline_s = 0.0
        self.worker_pid = 0
        self._watches: dict[int, WorkerWatch] = {}

    def share(
        self,
        engine_id: str,
        tensors: list[p.GpuKvTensor],
        num_blocks: int,
        timeout_s: float | None = None,
    ) -> p.ShareGpuKvReply:
        """Raises ``RemoteError`` (refused: ``gpu_copies`` off, another device kind) or
        ``DaemonUnavailable``. ``timeout_s``: for this call, else the client's."""
        # Loans made before: a new daemon never heard of them, and the same daemon forgets
        # them when tensors are shared again (killing the worker if they still ran).
        self.ledger.orphan_all()
        reply = self.client.call(p.ShareGpuKv(engine_id, num_blocks, tensors), timeout_s=timeout_s)
        self.engine_id = engine_id
        self.deadline_s = max(self.deadline_s, reply.deadline_s)
        self.worker_pid = reply.worker_pid
        if reply.worker_pid not in self._watches:
            self._watches[reply.worker_pid] = WorkerWatch(reply.worker_pid)
        return reply

    def lend(
        self, direction: Direction, blocks: Sequence[int], slots: Sequence[int], after: bytes = b""
    ) -> Loan:
        """Raises ``BlockBusy`` (nothing lent), or ``RemoteError`` (the daemon refused:
        nothing lent). No reply at all leaves the loan orphaned: the copy may be running.
        ``after``: the IPC handle of an event recorded on the compute stream; keep the event
        itself alive until the loan is settled."""
        if not self.engine_id:
            raise RuntimeError("share the KV tensors first")
        loan = self.ledger.lend(blocks, slots, direction, self.worker_pid)
        req = p.GpuCopy(self.engine_id, loan.copy_id, direction, list(blocks), list(slots), after)
        try:
            self.client.call(req)
        except RemoteError:
            self.ledger.settle(loan.copy_id, False, "refused")
            raise
        except DaemonUnavailable:
            self.ledger.orphan_all()
        return loan

    def poll(self) -> list[Settled]:
        out: list[Settled] = []
        ids = self.ledger.running()
        if ids:
            try:
                reply = self.client.call(p.GpuCopyStatus(self.engine_id, ids))
            except (DaemonUnavailable, RemoteError) as exc:
                logger.warning("copy status unavailable (%s); lent blocks wait", exc)
                self.ledger.orphan_all()
            else:
                for copy_id, state, error in zip(ids, reply.states, reply.errors, strict=True):
                    if state == "unknown":  # not this daemon's, or a reply was lost
                        self.ledger.orphan(copy_id)
                    elif state != "running":
                        settled = self.ledger.settle(copy_id, state == "done", error or state)
                        if settled is not None:
                            out.append(settled)
        out += self.ledger.reap(self.deadline_s, self._worker_gone)
        return out

    def _worker_gone(self, pid: int) -> bool:
        watch = self._watches.get(pid)
        return watch is not None and watch.gone()

    def close(self) -> None:
        for w in self._watches.values():
            w.close()
        self._watches = {}
