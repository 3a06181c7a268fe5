"""One copy interface for every path that moves KV blocks to and from the arena.

A ``BlockMover`` copies whole engine blocks into arena slots (``store``) and back
(``load``). Each call returns a ``CopyHandle``: a synchronous path returns one that is done
already, an asynchronous path one that completes when the device has moved the last byte.
Whoever lent the blocks and slots keeps them until ``poll()`` says done: nothing may reuse
a block, or commit a slot, with a copy in flight.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    import numpy as np


class CopyError(RuntimeError):
    """A copy that could not be started, or that the device reported as failed."""


class HostArena(Protocol):
    """What a copy needs of the arena: its slots as one ``(num_slots, slot_bytes)`` array."""

    @property
    def name(self) -> str: ...

    @property
    def slot_bytes(self) -> int: ...

    @property
    def num_slots(self) -> int: ...

    def slots_view(self) -> np.ndarray: ...


A = TypeVar("A", bound=HostArena, contravariant=True)


class CopyHandle(ABC):
    """Completion of one copy. ``copy_s`` is the copy's own duration when it is known."""

    copy_s: float | None = None

    @abstractmethod
    def poll(self) -> bool:
        """True once every byte has landed; raises ``CopyError`` if the copy failed."""

    @abstractmethod
    def wait(self) -> None:
        """Block until the copy is done; raises ``CopyError`` if it failed."""


class Completed(CopyHandle):
    """A copy that finished before its call returned."""

    def __init__(self, copy_s: float) -> None:
        self.copy_s = copy_s

    def poll(self) -> bool:
        return True

    def wait(self) -> None:
        return None


class BlockMover(ABC, Generic[A]):
    """Copies engine blocks (every layer of each) to and from arena slots.

    ``path`` names the implementation for logs and benches; ``bytes_per_block`` is what one
    block of all layers occupies in a slot.
    """

    path: str
    num_blocks: int
    bytes_per_block: int

    @abstractmethod
    def store(self, arena: A, blocks: Sequence[int], slots: Sequence[int]) -> CopyHandle:
        """Start copying ``blocks[i]`` into ``slots[i]``."""

    @abstractmethod
    def load(self, arena: A, slots: Sequence[int], blocks: Sequence[int]) -> CopyHandle:
        """Start copying ``slots[i]`` into ``blocks[i]``."""

    def release(self, arena: A) -> None:
        """Undo what was set up for ``arena`` (page-locking) before it is unmapped."""

    def close(self) -> None:
        """Wait for copies in flight and free what the mover holds."""

    def check(self, arena: A, blocks: Sequence[int], slots: Sequence[int]) -> None:
        """Refuse, before anything moves, a call whose ids do not fit."""
        check_ids(blocks, slots, self.num_blocks, arena.num_slots)
        if arena.slot_bytes < self.bytes_per_block:
            raise CopyError(f"slot of {arena.slot_bytes} B < block of {self.bytes_per_block} B")


def check_ids(blocks: Sequence[int], slots: Sequence[int], num_blocks: int, num_slots: int) -> None:
    """Same lengths, every id in range, and no id written twice (either side may be written)."""
    if len(blocks) != len(slots):
        raise CopyError(f"{len(slots)} slots for {len(blocks)} blocks")
    if not blocks:
        return
    if min(blocks) < 0 or max(blocks) >= num_blocks:
        raise CopyError(f"engine block id outside 0..{num_blocks - 1}")
    if min(slots) < 0 or max(slots) >= num_slots:
        raise CopyError(f"arena slot outside 0..{num_slots - 1}")
    if len(set(blocks)) != len(blocks) or len(set(slots)) != len(slots):
        raise CopyError("a block or slot appears twice in one copy")


def timed(started: float) -> Completed:
    return Completed(time.perf_counter() - started)
