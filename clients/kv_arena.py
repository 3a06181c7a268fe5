"""The daemon's KV arena as an engine sees it: map it by name, copy blocks in and out.

The daemon hands out slot numbers; the engine moves the bytes itself through its own mapping
of the same shared-memory segment, so KV never crosses a socket. No transfer loops over
blocks in Python:

- the default: one call into a small C kernel (``clients/_kvcopy.c``, built at install time
  and loaded with ctypes, which releases the GIL) moves every (slot, layer) piece with
  ``memmove``, the pairs sorted by the side being read. It needs no Python headers and loads
  nothing else into the process (numba, which did the same job before, breaks vLLM 0.32's
  Triton dispatcher in any process that loaded it);
- the fallback, where the kernel was not built (no C compiler at install time) or
  ``TOKENCAKE_COPY_KERNEL=numpy``: engine block ids that form one increasing run move in one
  numpy scatter or gather per layer; scattered ids (vLLM's case) go through a ~1 MiB staging
  buffer per layer (gather, then scatter), about half as fast. :func:`copy_path` says which
  path a process uses, and a missing kernel is logged once.

Every index is checked before the first byte moves (the kernel checks nothing), so a bad
call changes nothing.

Slot layout: a slot holds one engine block. With one tensor of shape ``(num_blocks, ...)``
the block's bytes fill the slot's head. With vLLM-style per-layer tensors
(``(num_blocks, kv_heads, block_size, 2 * head_dim)`` per layer) the slot holds layer 0's
block, then layer 1's, and so on, back to back.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import logging
import math
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokencake.segment import (
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

# Staging buffer for transfers whose both sides are indexed: big enough that a chunk costs far
# more than the two numpy calls that move it, small enough to stay in L2.
STAGE_BYTES = 1 << 20
# Smallest piece the arena is cut into for a gather; below it, a strided view (and a copy).
MIN_ROW_BYTES = 256


COPY_KERNEL_ENV = "TOKENCAKE_COPY_KERNEL"
"""``native`` (the default): the compiled kernel when it was built; ``numpy``: never it."""
_LIB_STEM = "_kvcopy"
_LIB_ABI = 1

_native: Any = None  # the loaded kernel; False once it proved absent or switched off


def native_copy() -> Any:
    """The compiled copy kernel (``clients/_kvcopy.c``, built at install time), or None.

    None when ``TOKENCAKE_COPY_KERNEL=numpy`` or when the library was not built (no C
    compiler at install time); copies then take the numpy path, and that is logged once.
    """
    global _native
    if _native is None:
        _native = _load_native() or False
    return _native or None


def copy_path() -> str:
    """Which path moves scattered blocks in this process: ``native`` or ``numpy``."""
    return "native" if native_copy() is not None else "numpy"


def _load_native() -> _NativeCopy | None:
    choice = os.environ.get(COPY_KERNEL_ENV, "native")
    if choice == "numpy":
        return None
    if choice != "native":
        logger.warning("%s=%r: expected native or numpy; using native", COPY_KERNEL_ENV, choice)
    here = os.path.dirname(os.path.abspath(__file__))
    names = [_LIB_STEM + suffix for suffix in importlib.machinery.EXTENSION_SUFFIXES]
    found = [os.path.join(here, n) for n in names if os.path.exists(os.path.join(here, n))]
    if not found:
        logger.warning(
            "copy kernel %s not built (no C compiler at install?); arena copies use numpy, "
            "about half as fast for scattered block ids",
            os.path.join(here, _LIB_STEM + ".c"),
        )
        return None
    try:
        return _NativeCopy(ctypes.CDLL(found[0]))
    except (OSError, AttributeError, KvArenaError) as exc:
        logger.warning("copy kernel %s unusable (%s); arena copies use numpy", found[0], exc)
        return None


class _NativeCopy:
    """``tc_copy_layers`` through ctypes, which releases the GIL for the call.

    Raw addresses: the caller has checked every index against the arena and the layers and
    keeps every array alive for the call; the kernel checks nothing.
    """

    def __init__(self, lib: ctypes.CDLL) -> None:
        abi = lib.tc_kvcopy_abi
        abi.restype, abi.argtypes = ctypes.c_int, ()
        if abi() != _LIB_ABI:
            raise KvArenaError(f"ABI {abi()}, expected {_LIB_ABI}: rebuild it")
        fn = lib.tc_copy_layers
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.restype = None
        fn.argtypes = (ptr, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int)
        self._fn = fn

    def __call__(
        self,
        arena: int,
        slot_bytes: int,
        bases: np.ndarray,
        sizes: np.ndarray,
        offsets: np.ndarray,
        slots: np.ndarray,
        blocks: np.ndarray,
        to_arena: bool,
    ) -> None:
        """Slot ``slots[i]`` holds block ``blocks[i]`` of each layer at ``offsets[layer]``;
        every array is C-contiguous int64."""
        self._fn(
            arena,
            slot_bytes,
            _address(bases),
            _address(sizes),
            _address(offsets),
            len(bases),
            _address(slots),
            _address(blocks),
            len(slots),
            int(to_arena),
        )


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

    def slots_view(self) -> np.ndarray:
        """``(num_slots, slot_bytes)`` uint8 view of the arena. Drop it before :meth:`close`."""
        if self._slots is None:
            raise ArenaError(f"arena mapping {self._name} is closed")
        return self._slots

    # ------------------------------------------------------------------ one tensor

    def write_blocks(self, slots: Sequence[int], src: Any) -> None:
        """Copy ``src[i]`` into slot ``slots[i]``; ``src`` is ``(n, ...)`` numpy or CPU torch."""
        blocks = _as_block_bytes(src)
        self._copy_layers(slots, [blocks], range(blocks.shape[0]), to_arena=True)

    def read_blocks(self, slots: Sequence[int], dst: Any) -> None:
        """Copy slot ``slots[i]`` into ``dst[i]``; ``dst`` is ``(n, ...)`` numpy or CPU torch."""
        blocks = _as_block_bytes(dst)
        self._copy_layers(slots, [blocks], range(blocks.shape[0]), to_arena=False)

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
        checked = self._check(slots, layers, block_ids, to_arena)
        if checked is None:
            return
        views, slot_ids, blocks = checked
        # Taken only now: an error raised above must not hold a view (the mapping could not
        # close while its traceback lives).
        arena = self.slots_view()
        kernel = native_copy()
        if kernel is not None:
            # One compiled loop for the whole transfer, reading in address order.
            order = np.argsort(blocks if to_arena else slot_ids, kind="stable")
            sizes = np.array([v.shape[1] for v in views], dtype=np.int64)
            offsets = np.cumsum(sizes) - sizes
            bases = np.array([_address(v) for v in views], dtype=np.int64)
            kernel(
                _address(arena),
                self._slot_bytes,
                bases,
                sizes,
                offsets,
                np.ascontiguousarray(slot_ids[order]),
                np.ascontiguousarray(blocks[order]),
                to_arena,
            )
            return
        run = bool((np.diff(blocks) == 1).all())
        plan = _Plan.make(slot_ids, blocks, run, max(v.shape[1] for v in views))
        offset = 0
        for v in views:
            nb = v.shape[1]
            if nb:
                plan.copy_layer(arena, v, offset, to_arena)
            offset += nb

    def _check(
        self, slots: Sequence[int], layers: Sequence[Any], block_ids: Sequence[int], to_arena: bool
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray] | None:
        """Every index and size of a transfer, checked before any byte moves: the copy kernel
        trusts them. Returns the layers as byte views and the ids, or None for a no-op."""
        views = [_as_block_bytes(layer) for layer in layers]
        slot_ids = _ids(slots, "slot")
        blocks = _ids(block_ids, "block id")
        if len(blocks) != len(slot_ids):
            raise KvArenaError(f"{len(slot_ids)} slots for {len(blocks)} blocks")
        total = sum(v.shape[1] for v in views)
        if total > self._slot_bytes:
            raise KvArenaError(f"{total}-byte blocks exceed {self._slot_bytes}-byte slots")
        if not len(slot_ids):
            return None
        lo, hi = int(slot_ids.min()), int(slot_ids.max())
        if lo < 0 or hi >= self._num_slots:
            bad = lo if lo < 0 else hi
            raise KvArenaError(f"slot {bad} outside 0..{self._num_slots - 1}")
        if not views:
            return None
        lo, hi = int(blocks.min()), int(blocks.max())
        for v in views:
            if lo < 0 or hi >= v.shape[0]:
                bad = lo if lo < 0 else hi
                raise KvArenaError(f"block id {bad} outside a layer of {v.shape[0]} blocks")
            if not to_arena and not v.flags.writeable:
                raise KvArenaError("a destination layer is read-only")
        # Two blocks written into one place would leave either; refuse rather than guess.
        dest, what = (slot_ids, "slot") if to_arena else (blocks, "block id")
        if len(np.unique(dest)) != len(dest):
            raise KvArenaError(f"a {what} appears twice in one copy")
        return views, slot_ids, blocks

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        """Unmap (the daemon owns the name; nothing is unlinked). Idempotent."""
        if self._mm is None:
            return
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


def _address(arr: np.ndarray) -> int:
    """Where ``arr`` starts. Not ``arr.ctypes.data``: that leaves a reference cycle holding
    the array, and with it the arena's buffer, until the garbage collector runs."""
    address: int = arr.__array_interface__["data"][0]
    return address


def _ids(ids: Sequence[int], what: str) -> np.ndarray:
    """``ids`` as a 1-D int64 array; anything but integers is refused, never truncated."""
    if isinstance(ids, range):
        return np.arange(ids.start, ids.stop, ids.step, dtype=np.int64)
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise KvArenaError(f"{what}s must be a flat list of integers, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64, copy=False)


@dataclass(slots=True)
class _Plan:
    """How one transfer's (slot, block) pairs are walked, shared by all of its layers.

    ``chunk`` is None when the block ids are one increasing run: each layer then moves in one
    call, straight between the tensor slice and the slots. Otherwise the pairs are sorted by
    slot (the arena is walked forward) and cut into chunks of ``chunk`` pairs that go through
    ``stage``; a chunk whose block ids happen to be a run skips the stage.
    """

    slots: np.ndarray
    blocks: np.ndarray
    chunk: int | None
    runs: np.ndarray
    stage: np.ndarray

    @classmethod
    def make(cls, slots: np.ndarray, blocks: np.ndarray, run: bool, max_block_bytes: int) -> _Plan:
        n = len(slots)
        if run:
            return cls(slots, blocks, None, np.empty(0, dtype=bool), np.empty(0, dtype=np.uint8))
        order = np.argsort(slots, kind="stable")
        slots, blocks = slots[order], blocks[order]
        chunk = max(1, min(n, STAGE_BYTES // max(1, max_block_bytes)))
        stage = np.empty(chunk * max_block_bytes, dtype=np.uint8)
        return cls(slots, blocks, chunk, np.diff(blocks) == 1, stage)

    def copy_layer(self, arena: np.ndarray, layer: np.ndarray, offset: int, to_arena: bool) -> None:
        """Move this layer's ``nb``-byte blocks to or from bytes ``offset..offset+nb`` of slots."""
        nb = layer.shape[1]
        slot_bytes = arena.shape[1]
        # The arena as C-contiguous rows of ``unit`` bytes, so np.take reads it in place: a
        # block is ``nb // unit`` consecutive rows (one row when slots hold whole blocks).
        unit = math.gcd(slot_bytes, nb, offset)
        if unit >= MIN_ROW_BYTES:
            rows: np.ndarray = arena.reshape(-1, unit)
            first = (self.slots * slot_bytes + offset) // unit
            where = first[:, None] + np.arange(nb // unit, dtype=np.int64)
        else:  # odd sizes: a strided column; gathers from it allocate
            rows = arena[:, offset : offset + nb]
            where = self.slots[:, None]
            unit = nb
        n = len(where)
        step = self.chunk or n
        for i in range(0, n, step):
            j = min(n, i + step)
            ids = self.blocks[i:j]
            if self.chunk is None or self.runs[i : j - 1].all():
                part = layer[int(ids[0]) : int(ids[0]) + j - i]
                _move(rows, where[i:j], part.reshape(j - i, -1, unit), to_arena)
            elif to_arena:
                stage = self._stage(j - i, nb)
                np.take(layer, ids, axis=0, out=stage, mode="clip")
                _move(rows, where[i:j], stage.reshape(j - i, -1, unit), to_arena)
            else:
                stage = self._stage(j - i, nb)
                _move(rows, where[i:j], stage.reshape(j - i, -1, unit), to_arena)
                layer[ids] = stage

    def _stage(self, m: int, nb: int) -> np.ndarray:
        return self.stage[: m * nb].reshape(m, nb)


def _move(rows: np.ndarray, where: np.ndarray, blocks: np.ndarray, to_arena: bool) -> None:
    """``rows[where] <-> blocks`` in one numpy call; ``blocks`` is contiguous. Indices are
    checked by the caller; ``mode="clip"`` keeps np.take from buffering its output."""
    if to_arena:
        rows[where] = blocks
    elif rows.flags.c_contiguous:
        np.take(rows, where, axis=0, out=blocks, mode="clip")
    else:
        blocks[...] = rows[where]
