"""Opt-in memory reports of a running tokencaked, for soak runs (``bench/bench_soak.py``).

Off by default. With ``debug_memory_file`` set (``TOKENCAKE_DEBUG_MEMORY_FILE``), the daemon
appends one JSON line to that file every ``debug_memory_s`` seconds and once at exit: the
process's RSS and open descriptors, glibc's own allocator totals (``mallinfo2``), CPython's
small-object allocator's arenas and blocks (:func:`obmalloc_stats`), the live object count,
the cycle collector's runs and what they freed, and the sizes of the daemon's long-lived
containers. With ``debug_memory_trace`` (the default) it also starts :mod:`tracemalloc`
(one frame per allocation) and adds the Python heap it sees and the allocation sites that
grew most since the first report; turned off, the traces' own memory stays out of the RSS
being measured. Nothing goes over the wire and no KV or names are written, only sizes and
source lines. Tracing costs CPU and memory; leave it off in production.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import logging
import os
import re
import sys
import tempfile
import time
import tracemalloc
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokencake.daemon.timers import Timers

logger = logging.getLogger(__name__)

TOP_SITES = 12
"""Allocation sites listed per report (largest growth since the first report)."""


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _load_mallinfo2() -> Callable[[], _MallInfo2] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        fn = ctypes.CDLL(name).mallinfo2
    except (OSError, AttributeError):  # not glibc, or glibc < 2.33
        return None
    fn.restype = _MallInfo2
    fn.argtypes = []
    return fn


_OBMALLOC_LINES = {
    "arenas allocated current": "arenas",
    "arenas highwater mark": "arenas_highwater",
    "bytes in allocated blocks": "allocated_bytes",
    "bytes in available blocks": "available_bytes",
}
_OBMALLOC_RE = re.compile(r"^# ([a-z ]+?)\s+=\s+([\d,]+)$", re.MULTILINE)
_ARENA_BYTES_RE = re.compile(r"^(\d+) arenas \* (\d+) bytes/arena", re.MULTILINE)


def obmalloc_stats() -> dict[str, int]:
    """CPython's small-object allocator (pymalloc), which glibc's ``mallinfo2`` does not see:
    arenas held now and at most, their bytes, and the bytes of blocks in use and free in them.

    ``sys._debugmallocstats`` prints to the C stderr, so fd 2 points at a temporary file for
    the call (anything another thread writes to stderr meanwhile lands there too: debug
    reports only). Empty where the interpreter has no pymalloc."""
    if not hasattr(sys, "_debugmallocstats"):
        return {}
    with tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        tmp.seek(0)
        text = tmp.read().decode("ascii", "replace")
    out = {
        _OBMALLOC_LINES[name]: int(value.replace(",", ""))
        for name, value in _OBMALLOC_RE.findall(text)
        if name in _OBMALLOC_LINES
    }
    if m := _ARENA_BYTES_RE.search(text):
        out["arena_bytes"] = int(m.group(1)) * int(m.group(2))
    return out


def proc_status(pid: int | str = "self") -> dict[str, int]:
    """VmRSS, RssAnon (KiB), open descriptors and how many of them are sockets."""
    out = {"rss_kib": 0, "anon_kib": 0, "fds": 0, "socket_fds": 0}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
            elif line.startswith("RssAnon:"):
                out["anon_kib"] = int(line.split()[1])
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        out["fds"] += 1
        try:
            if os.readlink(f"{fd_dir}/{fd}").startswith("socket:"):
                out["socket_fds"] += 1
        except OSError:
            pass  # closed between listdir and readlink
    return out


def container_sizes(**objects: object) -> dict[str, int]:
    """``len`` of every dict, list, set and deque attribute of each object (one level deep)."""
    out: dict[str, int] = {}
    for prefix, obj in objects.items():
        attrs = getattr(obj, "__dict__", None) or {
            n: getattr(obj, n) for n in getattr(obj, "__slots__", ()) if hasattr(obj, n)
        }
        for name, value in attrs.items():
            if isinstance(value, (dict, list, set, frozenset, deque)):
                out[f"{prefix}.{name}"] = len(value)
    return out


class MemoryWatch:
    """Appends memory reports to ``path``; ``sizes`` names the containers to count."""

    def __init__(self, path: str, sizes: Callable[[], dict[str, int]], trace: bool = True) -> None:
        self.path = Path(path)
        self._sizes = sizes
        self._trace = trace
        self._mallinfo2 = _load_mallinfo2()
        self._first: tracemalloc.Snapshot | None = None
        self._t0 = time.monotonic()
        self._started_tracing = False
        self._running = False

    def start(self, timers: Timers, every_s: float) -> None:
        """Start tracing, report now and then every ``every_s`` on the loop's timers."""
        if self._trace and not tracemalloc.is_tracing():
            tracemalloc.start(1)
            self._started_tracing = True
        self._running = True
        self.report()

        def tick() -> None:
            if self._running:
                self.report()
                timers.schedule(every_s, tick)

        timers.schedule(every_s, tick)

    def stop(self) -> None:
        """A last report, then tracing off (timers still queued do nothing)."""
        if self._running:
            self._running = False
            self.report()
        if self._started_tracing:
            tracemalloc.stop()
            self._started_tracing = False

    def report(self) -> None:
        """One JSON line; an unwritable file is logged, never raised into the loop."""
        try:
            line = json.dumps(self._report(), separators=(",", ":"))
            with self.path.open("a") as f:
                f.write(line + "\n")
        except OSError as exc:
            logger.error("memory report not written", extra={"error": str(exc)})

    def _report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "t": round(time.monotonic() - self._t0, 3),
            **proc_status(),
            "gc_objects": len(gc.get_objects()),
            "gc_collected": [g["collected"] for g in gc.get_stats()],  # cyclic garbage freed
            "gc_collections": [g["collections"] for g in gc.get_stats()],
            "sizes": self._sizes(),
        }
        if tracemalloc.is_tracing():
            out.update(self._traced())
        if self._mallinfo2 is not None:
            mi = self._mallinfo2()
            out["mallinfo2"] = {f[0]: getattr(mi, f[0]) for f in _MallInfo2._fields_}
        out["obmalloc"] = obmalloc_stats()
        return out

    def _traced(self) -> dict[str, Any]:
        """The traced heap and the sites that grew most since the first snapshot."""
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, tracemalloc.__file__)]
        )
        if self._first is None:
            self._first = snap
        current, peak = tracemalloc.get_traced_memory()
        top = snap.compare_to(self._first, "lineno")[:TOP_SITES]
        return {
            "traced_bytes": current,
            "traced_peak_bytes": peak,
            "top_growth": [
                {
                    "site": f"{s.traceback[0].filename}:{s.traceback[0].lineno}",
                    "size_diff": s.size_diff,
                    "count_diff": s.count_diff,
                    "size": s.size,
                }
                for s in top
            ],
        }
