"""The critical-inversion guard shared by the daemon's policy and vLLM's scheduler."""

from __future__ import annotations

import pytest

from tokencake import guard


def test_verdict() -> None:
    assert guard.verdict(critical=True, need=30, free=10, protect=8).rule == "allow:critical"
    assert guard.verdict(critical=False, need=30, free=10, protect=0).rule == (
        "allow:nothing_protected"
    )
    assert guard.verdict(critical=False, need=2, free=10, protect=8).allowed
    denied = guard.verdict(critical=False, need=3, free=10, protect=8)
    assert not denied.allowed and denied.rule == "deny:critical_inversion"


@pytest.mark.parametrize(
    ("critical", "phase", "expected"),
    [
        (True, "waiting", 5),  # the request it waits to run
        (True, "tool", 7 + 3),  # its KV on the GPU, and an upload's blocks still to come
        (True, "running", 0),  # it holds its blocks
        (True, "idle", 0),
        (True, "done", 0),
        (False, "waiting", 0),  # off the critical path: nothing is kept for it
        (False, "tool", 0),
    ],
)
def test_protected_blocks(critical: bool, phase: str, expected: int) -> None:
    got = guard.protected_blocks(
        critical=critical, phase=phase, wait_blocks=5, gpu_blocks=7, returning_blocks=3
    )
    assert got == expected


def test_pinned_kv_needs_no_protection() -> None:
    # a pin holds the blocks (they are not counted free): only the upload's are protected
    got = guard.protected_blocks(
        critical=True, phase="tool", wait_blocks=0, gpu_blocks=7, returning_blocks=3, pinned=True
    )
    assert got == 3


def test_cap() -> None:
    assert guard.protect_cap(100, 0.5) == 50
    assert guard.protect_cap(-1, 0.5) == 0
    assert guard.total_protected([30, 40], 50) == 50
    assert guard.total_protected([30, 4], 50) == 34
    assert guard.total_protected([], 50) == 0
