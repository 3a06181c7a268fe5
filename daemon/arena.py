"""The daemon's KV arena: one POSIX shared-memory segment holding every host KV slot.

The segment is created by opening ``/dev/shm/<name>`` directly (``O_CREAT | O_EXCL``, mode
0600) rather than through ``multiprocessing.shared_memory``, whose resource tracker unlinks
segments it did not create and warns about ones it thinks leaked. Pages are faulted in once
at start: the first write into a fresh shm page costs a kernel zero-fill, an order of
magnitude slower than a later write, and that cost must not land on an offload.

Names follow ``tokencake-<uid>-<instance>-<pid>`` so a restarted daemon can find segments a
dead predecessor left behind (:meth:`Arena.remove_stale`) without touching live ones or other
users' segments.
"""

from __future__ import annotations

import logging
import mmap
import os
import stat
from dataclasses import dataclass

import numpy as np

from tokencake.segment import (
    NAME_RE,
    SEGMENT_MODE,
    SHM_DIR,
    SLOT_BASE_OFFSET,
    ArenaError,
    advise_huge_pages,
    prefault,
    segment_name,
    segment_path,
    slot_count,
    verify_segment,
)

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StaleSegment:
    name: str
    pid: int
    size: int


class Arena:
    """The daemon-owned shared-memory segment. Create with :meth:`create`.

    The arena is allocated once and never returned to the OS while the daemon runs; the
    host store hands out fixed-size slots inside it.
    """

    def __init__(self, name: str, path: str, fd: int, mm: mmap.mmap, size: int) -> None:
        self._name = name
        self._path = path
        self._fd = fd
        self._mm: mmap.mmap | None = mm
        self._size = size
        self._unlinked = False
        self.prefault_method = "none"

    @classmethod
    def create(
        cls,
        size: int,
        *,
        instance: str = "default",
        directory: str = SHM_DIR,
        prefault_pages: bool = True,
    ) -> Arena:
        """Create, size, map and pre-fault a fresh segment; fails if the name exists."""
        if size <= 0:
            raise ArenaError(f"arena size must be positive, got {size}")
        name = segment_name(instance)
        path = segment_path(name, directory)
        _check_room(directory, size)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW, SEGMENT_MODE)
        except FileExistsError:
            raise ArenaError(f"segment {path} exists; is another daemon running?") from None
        try:
            # The umask may have stripped bits from the create mode: pin it exactly.
            os.fchmod(fd, SEGMENT_MODE)
            os.ftruncate(fd, size)
            verify_segment(fd, path, size)
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        arena = cls(name, path, fd, mm, size)
        advise_huge_pages(mm)
        if prefault_pages:
            try:
                arena.prefault_method = prefault(mm, size)
            except BaseException:
                arena.close()
                raise
        logger.info("arena %s: %d bytes, prefault=%s", name, size, arena.prefault_method)
        return arena

    @property
    def name(self) -> str:
        return self._name

    @property
    def path(self) -> str:
        return self._path

    @property
    def size(self) -> int:
        return self._size

    @property
    def closed(self) -> bool:
        return self._mm is None

    def view(self) -> np.ndarray:
        """A uint8 numpy view of the whole segment. Drop it before :meth:`close`."""
        if self._mm is None:
            raise ArenaError(f"arena {self._name} is closed")
        return np.frombuffer(self._mm, dtype=np.uint8, count=self._size)

    def slots(self, slot_bytes: int) -> np.ndarray:
        """A ``(num_slots, slot_bytes)`` view: row ``i`` is slot ``i``."""
        num = slot_count(self._size, slot_bytes) if slot_bytes > 0 else 0
        if num < 1:
            raise ArenaError(f"slot_bytes {slot_bytes} does not fit arena of {self._size}")
        start = SLOT_BASE_OFFSET
        return self.view()[start : start + num * slot_bytes].reshape(num, slot_bytes)

    def close(self) -> None:
        """Unlink the name, then unmap. Idempotent.

        The name goes first so no new mapping can open it even if unmapping fails because
        numpy views are still alive (that raises :class:`ArenaError`; drop the views and
        call again).
        """
        if not self._unlinked:
            self._unlinked = True
            try:
                os.unlink(self._path)
            except FileNotFoundError:
                logger.warning("arena %s was already unlinked", self._name)
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                raise ArenaError(f"arena {self._name}: views still exported, drop them") from None
            self._mm = None
            os.close(self._fd)

    def __enter__(self) -> Arena:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def find_stale(directory: str = SHM_DIR) -> list[StaleSegment]:
        """Segments named by a daemon of our uid whose pid is no longer alive."""
        uid = os.getuid()
        found: list[StaleSegment] = []
        try:
            entries = os.listdir(directory)
        except OSError:  # missing, not a directory, not readable: Arena.create will say so
            return found
        for entry in entries:
            m = NAME_RE.match(entry)
            if m is None or int(m.group(1)) != uid:
                continue
            pid = int(m.group(3))
            if _pid_alive(pid):
                continue
            try:
                st = os.lstat(os.path.join(directory, entry))
            except FileNotFoundError:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid:
                continue
            found.append(StaleSegment(entry, pid, st.st_size))
        return found

    @classmethod
    def remove_stale(cls, directory: str = SHM_DIR) -> list[str]:
        """Unlink the segments :meth:`find_stale` reports; returns the removed names.

        A pid reused by an unrelated process keeps its segment alive: that errs on the side
        of never deleting a live daemon's arena.
        """
        removed: list[str] = []
        for seg in cls.find_stale(directory):
            try:
                os.unlink(os.path.join(directory, seg.name))
            except FileNotFoundError:
                continue
            logger.warning("removed stale arena %s (%d bytes, pid %d)", seg.name, seg.size, seg.pid)
            removed.append(seg.name)
        return removed


def _check_room(directory: str, size: int) -> None:
    """Refuse an arena the filesystem cannot hold. A sparse ``ftruncate`` succeeds at any
    size on tmpfs, and pre-faulting then fills shared memory (host RAM) until the kernel
    gives up, taking other processes' memory with it; fail fast with a clear message."""
    try:
        st = os.statvfs(directory)
    except OSError as exc:
        raise ArenaError(f"cannot use {directory} for shared memory: {exc}") from None
    if st.f_blocks == 0:
        return  # no size limit on this mount (hugetlbfs without size=): the pool decides
    free = st.f_bavail * st.f_frsize
    if size > free:
        raise ArenaError(f"an arena of {size} bytes does not fit in {directory}: {free} bytes free")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
