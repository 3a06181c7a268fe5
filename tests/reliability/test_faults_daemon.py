"""Faults inside the daemon's own loop: apps whose client went away, and housekeeping that
must go on after one of its parts fails. Both found by the hour-long soak
(``bench/bench_soak.py``): the first grew the daemon by every app left without
``app_end``; the second stopped lease expiry for good after one exception.

In-process daemon (``harness.InProcessDaemon``), fake clock, deterministic.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.common.fuzz_harness import DAG, FakeClock, InProcessDaemon
from tokencake import protocol as p


class TickingClock(FakeClock):
    """Moves a microsecond on every read, as a real clock does between two reads."""

    def __call__(self) -> float:
        self.now += 1e-6
        return self.now


@pytest.fixture
def ipd() -> Iterator[InProcessDaemon]:
    with tempfile.TemporaryDirectory(prefix="tchk-") as tmp:
        d = InProcessDaemon(Path(tmp))
        d.clock.__class__ = TickingClock  # every part holds this one clock object
        d.daemon.config = d.daemon.config.with_overrides({"app_idle_timeout_s": 60.0})
        d.seed()
        yield d
        d.close()


def _live(ipd: InProcessDaemon) -> set[str]:
    return {a.app_id for a in ipd.daemon.apps.apps() if not a.ended}


def test_apps_left_without_app_end_are_ended_by_housekeeping(
    ipd: InProcessDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    eng = ipd.engine_id("eng")
    ipd.ok(p.RegisterApp("gone", DAG, tenant="t1"))
    ipd.ok(p.LlmCallStart("gone", "plan", eng, "r1", 64))
    ipd.ok(p.RegisterApp("alive", DAG, tenant="t1"))
    ipd.clock.advance(45.0)
    ipd.ok(p.LlmCallStart("alive", "plan", eng, "r2", 64))
    ipd.daemon._housekeeping()
    assert {"gone", "alive"} <= _live(ipd)
    ipd.clock.advance(30.0)  # "gone" silent for 75 s, "alive" for 30 s
    ipd.daemon._housekeeping()
    assert "gone" not in _live(ipd) and "alive" in _live(ipd)
    assert "gone" not in ipd.daemon.scheduler._apps
    assert "timer failed" not in caplog.text
    ipd.clock.advance(0.5)
    ipd.daemon._housekeeping()  # the scheduler's next tick after an app ended: in order
    assert "timer failed" not in caplog.text and "EventOrderError" not in caplog.text


def test_housekeeping_goes_on_after_a_part_fails(
    ipd: InProcessDaemon, caplog: pytest.LogCaptureFixture
) -> None:
    """One exception in housekeeping is logged; the next round still runs and still
    reclaims an expired lease."""
    d = ipd.daemon
    calls = {"n": 0}
    original = d.introspection.refresh_gauges

    def flaky() -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected")
        original()

    d.introspection.refresh_gauges = flaky  # type: ignore[method-assign]
    d.timers.schedule(0.0, d._housekeeping)
    d.timers.run_due()
    assert "injected" in caplog.text
    store = d.store
    assert store is not None
    eng = ipd.engine_id("eng")
    slots = ipd.ok(p.Reserve(eng, [b"lease-me"], "t1")).slots
    writing = store.stats().writing
    assert writing >= 1 and slots[0] >= 0
    ipd.clock.advance(d.config.lease_s + 1.0)
    d.timers.run_due()
    assert calls["n"] >= 2
    assert store.stats().writing < writing  # the lease ran out and the slot was reclaimed
