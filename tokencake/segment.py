"""The arena segment as both sides see it: its name, its byte layout, and the checks.

The daemon creates one POSIX shared-memory segment for every host KV slot
(``tokencake.daemon.arena``); engines map the same segment (``tokencake.clients.kv_arena``).
What both must agree on lives here: where the segment is (``/dev/shm/<name>``, names
``tokencake-<uid>-<instance>-<pid>``), where slot ``i`` starts, what makes a segment
trustworthy (a regular file we own with mode 0600), and how a mapping is faulted in.
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import stat
from typing import Final

import numpy as np

SHM_DIR: Final = "/dev/shm"
NAME_PREFIX: Final = "tokencake"
SEGMENT_MODE: Final = 0o600

SLOT_BASE_OFFSET: Final = 2048
"""Slot ``i`` starts at byte ``SLOT_BASE_OFFSET + i * slot_bytes`` of the segment.

Engine tensors are page-aligned plus a small header offset (glibc puts large allocations at
16 or 64 bytes into a page). A slot at offset 0 of a page then sits a few bytes below its
copy destination modulo 4 KiB, and x86 memcpy loses 2-3x to 4K aliasing (loads falsely
wait on stores to addresses 4 KiB apart): measured here, reading 1 GiB out of the arena ran
at 2.4 GB/s with (dst - src) % 4096 = 16 and at 6.1-6.5 GB/s with 1040..3088. Half a page
keeps both copy directions far from that case for any small header offset."""


def slot_count(size: int, slot_bytes: int) -> int:
    """How many slots of ``slot_bytes`` a segment of ``size`` bytes holds."""
    return max(0, (size - SLOT_BASE_OFFSET) // slot_bytes)


# Linux >= 5.14; the mmap module only names it from Python 3.13 on.
MADV_POPULATE_WRITE: Final = getattr(mmap, "MADV_POPULATE_WRITE", 23)
PAGE_SIZE: Final = mmap.PAGESIZE

_INSTANCE_RE: Final = re.compile(r"^[A-Za-z0-9_.]{1,64}$")
NAME_RE: Final = re.compile(r"^tokencake-(\d+)-([A-Za-z0-9_.]{1,64})-(\d+)$")
_SEGMENT_NAME_RE: Final = re.compile(r"^[A-Za-z0-9_.\-]{1,200}$")


class ArenaError(OSError):
    """A segment that cannot be created, mapped or trusted."""


def segment_name(instance: str, pid: int | None = None, uid: int | None = None) -> str:
    """The segment name a daemon instance uses: ``tokencake-<uid>-<instance>-<pid>``."""
    if not _INSTANCE_RE.match(instance):
        raise ArenaError(f"instance name {instance!r} must match {_INSTANCE_RE.pattern}")
    uid = os.getuid() if uid is None else uid
    pid = os.getpid() if pid is None else pid
    return f"{NAME_PREFIX}-{uid}-{instance}-{pid}"


def segment_path(name: str, shm_dir: str = SHM_DIR) -> str:
    if not _SEGMENT_NAME_RE.match(name):
        raise ArenaError(f"bad segment name {name!r}")
    return os.path.join(shm_dir, name)


def verify_segment(fd: int, path: str, min_bytes: int = 0) -> int:
    """Check that an open segment is a regular file we own with mode 0600; return its size.

    A segment owned by someone else or readable by others could leak or corrupt another
    tenant's KV bytes, so it is refused rather than used.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ArenaError(f"{path} is not a regular file")
    if st.st_uid != os.getuid():
        raise ArenaError(f"{path} is owned by uid {st.st_uid}, not by us ({os.getuid()})")
    if stat.S_IMODE(st.st_mode) != SEGMENT_MODE:
        raise ArenaError(f"{path} has mode {stat.S_IMODE(st.st_mode):o}, expected 600")
    if st.st_size < min_bytes:
        raise ArenaError(f"{path} holds {st.st_size} bytes, expected at least {min_bytes}")
    return st.st_size


def prefault(mm: mmap.mmap, size: int) -> str:
    """Fault every page of a shared mapping in for writing; returns the method used.

    ``MADV_POPULATE_WRITE`` does it in the kernel in one call; older kernels get one
    written byte per page (the byte is rewritten with its own value, so contents survive).
    """
    if size == 0:
        return "none"
    try:
        mm.madvise(MADV_POPULATE_WRITE, 0, size)
        return "madvise"
    except (OSError, ValueError) as exc:
        if isinstance(exc, OSError) and exc.errno not in (errno.EINVAL, errno.ENOSYS):
            raise
    view = np.frombuffer(mm, dtype=np.uint8, count=size)
    try:
        pages = view[::PAGE_SIZE]
        # Copy from a snapshot: numpy elides a plain self-assignment, which would touch nothing.
        pages[...] = pages.copy()
    finally:
        del view
    return "touch"


def advise_huge_pages(mm: mmap.mmap) -> bool:
    """Ask for transparent huge pages on a shared mapping; True when the kernel accepted.

    Reads out of 4 KiB pages run at about half the speed of reads out of huge pages on the
    machines we measured, so this matters for uploads (arena -> engine). It only takes
    effect where ``/sys/kernel/mm/transparent_hugepage/shmem_enabled`` is ``advise``,
    ``within_size`` or ``always``; with ``never`` (a common default) the arena stays on
    4 KiB pages. Must be called before the pages are faulted in.
    """
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None:
        return False
    try:
        mm.madvise(advice)
    except OSError:
        return False
    return True
