"""The daemon's opt-in memory reports (``debug_memory_file``) and the allocator trim."""

from __future__ import annotations

import json
import os
import tracemalloc
from pathlib import Path

import pytest

from tokencake.daemon.config import ConfigError, DaemonConfig, load_config
from tokencake.daemon.memwatch import MemoryWatch, container_sizes, obmalloc_stats
from tokencake.daemon.timers import Timers


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Parts:
    def __init__(self) -> None:
        self.items: dict[str, int] = {"a": 1, "b": 2}
        self.queue: list[int] = [1, 2, 3]
        self.count = 7


def test_reports_every_interval_and_at_stop(tmp_path: Path) -> None:
    assert not tracemalloc.is_tracing()
    clock = Clock()
    timers = Timers(clock)
    out = tmp_path / "memory.jsonl"
    watch = MemoryWatch(str(out), lambda: container_sizes(parts=Parts()))
    watch.start(timers, 60.0)
    assert tracemalloc.is_tracing()
    clock.now = 61.0
    timers.run_due()
    clock.now = 122.0
    timers.run_due()
    watch.stop()
    assert not tracemalloc.is_tracing()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 4  # at start, two ticks, at stop
    last = lines[-1]
    assert last["rss_kib"] > 0 and last["fds"] > 0 and last["traced_bytes"] >= 0
    assert last["sizes"] == {"parts.items": 2, "parts.queue": 3}
    assert isinstance(last["top_growth"], list)
    clock.now = 200.0
    timers.run_due()  # a tick queued before stop writes nothing
    assert len(out.read_text().splitlines()) == 4


def test_an_unwritable_report_file_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    watch = MemoryWatch(str(tmp_path / "missing-dir" / "m.jsonl"), dict)
    watch.start(Timers(Clock()), 60.0)
    watch.stop()
    assert "memory report not written" in caplog.text


@pytest.mark.parametrize(
    "key, value",
    [("debug_memory_s", 0.5), ("debug_memory_s", 1e9), ("app_idle_timeout_s", -1.0)],
)
def test_bad_settings_are_one_line_errors(key: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        DaemonConfig(**{key: value})  # type: ignore[arg-type]
    assert key in str(info.value) and "\n" not in str(info.value)


def test_reports_without_tracing_keep_the_allocator_figures(tmp_path: Path) -> None:
    assert not tracemalloc.is_tracing()
    out = tmp_path / "memory.jsonl"
    watch = MemoryWatch(str(out), lambda: container_sizes(parts=Parts()), trace=False)
    watch.start(Timers(Clock()), 60.0)
    assert not tracemalloc.is_tracing()
    watch.stop()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 2
    last = lines[-1]
    assert "traced_bytes" not in last and "top_growth" not in last
    assert last["rss_kib"] > 0 and last["gc_objects"] > 0 and len(last["gc_collected"]) == 3
    assert len(last["gc_collections"]) == 3
    assert last["sizes"] == {"parts.items": 2, "parts.queue": 3}
    if "mallinfo2" in last:  # glibc >= 2.33
        assert last["mallinfo2"]["uordblks"] > 0 and "ordblks" in last["mallinfo2"]


def test_the_trace_setting_is_read_from_the_environment() -> None:
    cfg = load_config(environ={"TOKENCAKE_DEBUG_MEMORY_TRACE": "off"})
    assert cfg.debug_memory_trace is False
    assert DaemonConfig().debug_memory_trace is True


def test_pymalloc_statistics_are_read_and_stderr_is_restored(
    capfd: pytest.CaptureFixture[str],
) -> None:
    stats = obmalloc_stats()
    assert stats["arenas"] >= 1 and stats["arenas_highwater"] >= stats["arenas"]
    assert stats["arena_bytes"] >= stats["allocated_bytes"] > 0
    held = [bytearray(64) for _ in range(100_000)]  # small objects: pymalloc's
    assert obmalloc_stats()["allocated_bytes"] > stats["allocated_bytes"] + 64 * 100_000
    del held
    assert capfd.readouterr().err == ""  # the statistics went to the temporary file
    os.write(2, b"still stderr\n")
    assert capfd.readouterr().err == "still stderr\n"
