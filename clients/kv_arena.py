"""The daemon's KV arena as an engine sees it: map it by name, copy blocks in and out.

The daemon hands out slot numbers; the engine moves the bytes itself through its own mapping
of the same shared-memory segment, so KV never crosses a socket. Every copy goes straight
between the engine's tensor and the slot (numpy views on both sides, ``np.copyto``), with no
intermediate buffer; runs of consecutive slots and blocks move in one call.

Slot layout: a slot holds one engine block. With one tensor of shape ``(num_blocks, ...)``
the block's bytes fill the slot's head. With vLLM-style per-layer tensors
(``(num_blocks, kv_heads, block_size, 2 * head_dim)`` per layer) the slot holds layer 0's
block, then layer 1's, and so on, back to back.
"""

from __future__ import annotations

import logging
import mmap
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from tokencake.daemon.arena import (
    SHM_DIR,
    SLOT_BASE_OFFSET,
    ArenaError,
    advise_huge_pages,
    prefault,
    segment_path,
    slot_count,
    verify_segment,
)

logger = logging.getLogger(__name__)

# cudaHostRegisterPortable: the pinning is visible to every CUDA context of the process.
_CUDA_HOST_REGISTER_PORTABLE = 1


class KvArenaError(ValueError):
    """Slots or tensors that do not fit the arena."""


class ArenaMapping:
    """An engine's read/write mapping of the daemon's arena. Create with :meth:`open`."""

    def __init__(self, name: str, mm: mmap.mmap, size: int, slot_bytes: int) -> None:
        self._name = name
        self._mm: mmap.mmap | None = mm
        self._size = size
        self._slot_bytes = slot_bytes
        self._num_slots = slot_count(size, slot_bytes)
        self._flat: np.ndarray | None = np.frombuffer(mm, dtype=np.uint8, count=size)
        start = SLOT_BASE_OFFSET
        self._slots: np.ndarray | None = self._flat[
            start : start + self._num_slots * slot_bytes
        ].reshape(self._num_slots, slot_bytes)
        self._pinned_by: str | None = None

    @classmethod
    def open(
        cls,
        name: str,
        slot_bytes: int,
        *,
        min_bytes: int = 0,
        directory: str = SHM_DIR,
        populate: bool = True,
    ) -> ArenaMapping:
        """Map an existing segment after checking it is ours and 0600.

        ``populate`` fills this process's page tables up front so the first copy into each
        page does not pay a fault.
        """
        if slot_bytes <= 0:
            raise KvArenaError(f"slot_bytes must be positive, got {slot_bytes}")
        path = segment_path(name, directory)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise ArenaError(f"no arena {path}; is the daemon running?") from None
        try:
            size = verify_segment(fd, path, max(min_bytes, slot_bytes))
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        advise_huge_pages(mm)
        if populate:
            prefault(mm, size)
        return cls(name, mm, size, slot_bytes)

    @property
    def name(self) -> str:
        return self._name

    @property
    def size(self) -> int:
        return self._size

    @property
    def slot_bytes(self) -> int:
        return self._slot_bytes

    @property
    def num_slots(self) -> int:
        return self._num_slots

    @property
    def pinned(self) -> bool:
        return self._pinned_by is not None

    def slots_view(self) -> np.ndarray:
        """``(num_slots, slot_bytes)`` uint8 view of the arena. Drop it before :meth:`close`."""
        if self._slots is None:
            raise ArenaError(f"arena mapping {self._name} is closed")
        return self._slots

    # ------------------------------------------------------------------ one tensor

    def write_blocks(self, slots: Sequence[int], src: Any) -> None:
        """Copy ``src[i]`` into slot ``slots[i]``; ``src`` is ``(n, ...)`` numpy or CPU torch."""
        arena = self.slots_view()
        blocks = _as_block_bytes(src)
        self._check(slots, blocks.shape[0], blocks.shape[1])
        nb = blocks.shape[1]
        for slot, block, run in _runs(slots, range(len(slots))):
            np.copyto(arena[slot : slot + run, :nb], blocks[block : block + run])

    def read_blocks(self, slots: Sequence[int], dst: Any) -> None:
        """Copy slot ``slots[i]`` into ``dst[i]``; ``dst`` is ``(n, ...)`` numpy or CPU torch."""
        arena = self.slots_view()
        blocks = _as_block_bytes(dst)
        self._check(slots, blocks.shape[0], blocks.shape[1])
        nb = blocks.shape[1]
        for slot, block, run in _runs(slots, range(len(slots))):
            np.copyto(blocks[block : block + run], arena[slot : slot + run, :nb])

    # ------------------------------------------------------------------ per-layer tensors

    def write_layers(
        self, slots: Sequence[int], layers: Sequence[Any], block_ids: Sequence[int]
    ) -> None:
        """Copy block ``block_ids[i]`` of every layer into slot ``slots[i]``, layer after layer."""
        self._copy_layers(slots, layers, block_ids, to_arena=True)

    def read_layers(
        self, slots: Sequence[int], layers: Sequence[Any], block_ids: Sequence[int]
    ) -> None:
        """Copy slot ``slots[i]`` back into block ``block_ids[i]`` of every layer."""
        self._copy_layers(slots, layers, block_ids, to_arena=False)

    def _copy_layers(
        self, slots: Sequence[int], layers: Sequence[Any], block_ids: Sequence[int], to_arena: bool
    ) -> None:
        arena = self.slots_view()
        if len(block_ids) != len(slots):
            raise KvArenaError(f"{len(slots)} slots for {len(block_ids)} block ids")
        views = [_as_block_bytes(layer) for layer in layers]
        total = sum(v.shape[1] for v in views)
        self._check(slots, len(slots), total)
        for v in views:
            for b in block_ids:
                if not 0 <= b < v.shape[0]:
                    raise KvArenaError(f"block id {b} outside a layer of {v.shape[0]} blocks")
        runs = list(_runs(slots, block_ids))
        offset = 0
        for v in views:
            nb = v.shape[1]
            for slot, block, run in runs:
                part = arena[slot : slot + run, offset : offset + nb]
                if to_arena:
                    np.copyto(part, v[block : block + run])
                else:
                    np.copyto(v[block : block + run], part)
            offset += nb

    def _check(self, slots: Sequence[int], n: int, block_bytes: int) -> None:
        if len(slots) != n:
            raise KvArenaError(f"{len(slots)} slots for {n} blocks")
        if block_bytes > self._slot_bytes:
            raise KvArenaError(f"{block_bytes}-byte blocks exceed {self._slot_bytes}-byte slots")
        for s in slots:
            if not 0 <= s < self._num_slots:
                raise KvArenaError(f"slot {s} outside 0..{self._num_slots - 1}")

    # ------------------------------------------------------------------ pinning

    def register_pinned(self) -> bool:
        """Page-lock the mapping for CUDA (cudaHostRegister) so copies run at DMA speed.

        Returns False when neither torch with CUDA nor cupy with a device is present.
        UNTESTED ON HARDWARE: written against torch's ``cudart()`` and cupy's runtime
        bindings, exercised only in its no-CUDA branch on CPU machines.
        """
        if self._pinned_by is not None:
            return True
        ptr, size = self.slots_view().ctypes.data, self._size
        try:
            import torch

            if torch.cuda.is_available():
                err = torch.cuda.cudart().cudaHostRegister(ptr, size, _CUDA_HOST_REGISTER_PORTABLE)
                if int(getattr(err, "value", err)) != 0:
                    raise ArenaError(f"cudaHostRegister failed: {err}")
                self._pinned_by = "torch"
                return True
        except ImportError:
            pass
        try:
            import cupy  # type: ignore[import-not-found, unused-ignore]

            if cupy.cuda.runtime.getDeviceCount() > 0:
                cupy.cuda.runtime.hostRegister(ptr, size, _CUDA_HOST_REGISTER_PORTABLE)
                self._pinned_by = "cupy"
                return True
        except ImportError:
            pass
        except Exception as exc:  # cupy raises its own CUDARuntimeError without a device
            logger.debug("cupy cannot pin the arena: %s", exc)
        return False

    def _unregister_pinned(self) -> None:
        if self._pinned_by is None or self._flat is None:
            return
        ptr = self._flat.ctypes.data
        if self._pinned_by == "torch":
            import torch

            torch.cuda.cudart().cudaHostUnregister(ptr)
        else:
            import cupy

            cupy.cuda.runtime.hostUnregister(ptr)
        self._pinned_by = None

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Unmap (the daemon owns the name; nothing is unlinked). Idempotent."""
        if self._mm is None:
            return
        self._unregister_pinned()
        self._slots = None
        self._flat = None
        try:
            self._mm.close()
        except BufferError:
            raise ArenaError(f"arena mapping {self._name}: views still exported") from None
        self._mm = None

    def __enter__(self) -> ArenaMapping:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _as_block_bytes(x: Any) -> np.ndarray:
    """A ``(num_blocks, bytes_per_block)`` uint8 numpy view of ``x``, never a copy."""
    if isinstance(x, np.ndarray):
        arr = x
    elif type(x).__module__.startswith("torch"):
        if x.device.type != "cpu":
            raise KvArenaError(f"tensor on {x.device}: copy through a CPU tensor or CUDA IPC")
        if not x.is_contiguous():
            raise KvArenaError("tensor must be contiguous (a copy would double the traffic)")
        import torch

        arr = x.reshape(x.shape[0], -1).view(torch.uint8).numpy()
    else:
        raise KvArenaError(f"expected a numpy array or a torch CPU tensor, got {type(x)}")
    if arr.ndim < 1 or not arr.flags.c_contiguous:
        raise KvArenaError("array must be C-contiguous (a copy would double the traffic)")
    if arr.shape[0] == 0:
        return np.empty((0, 0), dtype=np.uint8)
    return arr.reshape(arr.shape[0], -1).view(np.uint8)


def _runs(slots: Sequence[int], blocks: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Maximal ``(slot, block, length)`` runs where both slot and block ids step by one."""
    n = len(slots)
    i = 0
    while i < n:
        j = i + 1
        while j < n and slots[j] == slots[j - 1] + 1 and blocks[j] == blocks[j - 1] + 1:
            j += 1
        yield int(slots[i]), int(blocks[i]), j - i
        i = j
