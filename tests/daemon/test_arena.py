"""The arena is a real /dev/shm segment: created 0600, pre-faulted, unlinked on close."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from tokencake import segment as segment_mod
from tokencake.daemon.arena import Arena, ArenaError, segment_name, verify_segment

MiB = 1 << 20


@pytest.fixture
def shm_dir(tmp_path: object) -> str:
    """A private directory so parallel runs never see each other's segments.

    /dev/shm itself is used by the tests that need the real tmpfs.
    """
    return str(tmp_path)


def test_create_is_0600_sized_and_unlinked_on_close(shm_dir: str) -> None:
    a = Arena.create(4 * MiB, instance="t1", directory=shm_dir)
    st = os.stat(a.path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.getuid()
    assert st.st_size == 4 * MiB == a.size
    assert a.name == f"tokencake-{os.getuid()}-t1-{os.getpid()}"
    v = a.view()
    v[:8] = np.arange(8, dtype=np.uint8)
    assert bytes(v[:8]) == bytes(range(8))
    del v
    a.close()
    assert not os.path.exists(a.path)
    assert a.closed
    a.close()  # idempotent


def test_umask_does_not_weaken_mode(shm_dir: str) -> None:
    old = os.umask(0o277)  # would strip the owner's write bit from 0600
    try:
        a = Arena.create(MiB, instance="umask", directory=shm_dir)
    finally:
        os.umask(old)
    try:
        assert stat.S_IMODE(os.stat(a.path).st_mode) == 0o600
    finally:
        a.close()


def test_second_create_with_same_name_fails(shm_dir: str) -> None:
    with (
        Arena.create(MiB, instance="dup", directory=shm_dir),
        pytest.raises(ArenaError, match="exists"),
    ):
        Arena.create(MiB, instance="dup", directory=shm_dir)


def test_close_with_live_view_raises_but_unlinks(shm_dir: str) -> None:
    a = Arena.create(MiB, instance="views", directory=shm_dir)
    v = a.slots(4096)
    assert v.shape == (255, 4096)  # the first half page is the slot base offset
    with pytest.raises(ArenaError, match="views"):
        a.close()
    assert not os.path.exists(a.path)
    del v
    a.close()
    assert a.closed


def test_bad_instance_names_rejected() -> None:
    for bad in ("", "a/b", "../x", "x" * 65, "sp ace"):
        with pytest.raises(ArenaError):
            segment_name(bad)


def test_prefault_fallback_touches_every_page(
    shm_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With madvise refused (old kernel), pages are touched one by one, contents kept."""
    monkeypatch.setattr(segment_mod, "MADV_POPULATE_WRITE", 0x7FFF)  # EINVAL
    a = Arena.create(2 * MiB, instance="touch", directory="/dev/shm")
    try:
        assert a.prefault_method == "touch"
        assert _rss_shmem_of_segment(a.path) >= 2 * MiB
    finally:
        a.close()


def test_prefault_madvise_populates_real_shm() -> None:
    a = Arena.create(8 * MiB, instance="populate", directory="/dev/shm")
    try:
        assert a.prefault_method in ("madvise", "touch")
        assert _rss_shmem_of_segment(a.path) >= 8 * MiB
    finally:
        a.close()


def test_without_prefault_pages_are_not_resident() -> None:
    a = Arena.create(8 * MiB, instance="lazy", directory="/dev/shm", prefault_pages=False)
    try:
        assert a.prefault_method == "none"
        assert _rss_shmem_of_segment(a.path) < 8 * MiB
    finally:
        a.close()


def _rss_shmem_of_segment(path: str) -> int:
    """Resident bytes of this process's mapping of ``path`` (from /proc/self/smaps)."""
    rss = 0
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            parts = line.split()
            if "-" in parts[0] and len(parts) >= 5 and ":" in parts[3]:
                inside = len(parts) >= 6 and parts[5] == path
            elif inside and parts[0] == "Rss:":
                rss += int(parts[1]) * 1024
    return rss


def test_find_and_remove_stale_only_dead_pids(shm_dir: str) -> None:
    uid = os.getuid()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    stale = os.path.join(shm_dir, f"tokencake-{uid}-old-{dead_pid}")
    live = os.path.join(shm_dir, f"tokencake-{uid}-live-{os.getpid()}")
    other_uid = os.path.join(shm_dir, f"tokencake-{uid + 1}-x-{dead_pid}")
    unrelated = os.path.join(shm_dir, f"somethingelse-{uid}-x-{dead_pid}")
    for p in (stale, live, other_uid, unrelated):
        with open(p, "wb") as f:
            f.write(b"x" * 10)
    found = Arena.find_stale(shm_dir)
    assert [s.name for s in found] == [os.path.basename(stale)]
    assert found[0].pid == dead_pid and found[0].size == 10
    assert Arena.remove_stale(shm_dir) == [os.path.basename(stale)]
    assert not os.path.exists(stale)
    for p in (live, other_uid, unrelated):
        assert os.path.exists(p)


def test_verify_segment_refuses_wrong_mode(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "loose")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.ftruncate(fd, 4096)
        with pytest.raises(ArenaError, match="mode 644"):
            verify_segment(fd, path)
        os.fchmod(fd, 0o600)
        assert verify_segment(fd, path) == 4096
        with pytest.raises(ArenaError, match="at least"):
            verify_segment(fd, path, 8192)
    finally:
        os.close(fd)


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to chown a file to another uid")
def test_verify_segment_refuses_other_owner(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "foreign")
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.fchown(fd, 12345, -1)
        with pytest.raises(ArenaError, match="owned by uid 12345"):
            verify_segment(fd, path)
    finally:
        os.close(fd)
