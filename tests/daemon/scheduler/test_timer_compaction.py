"""The policy's timer heap drops timers that can no longer fire (found by the hour-long
soak: until due, ``host_ttl_s`` later, each kept its ended app in memory, and the daemon's
heap rose and fell with them). Compaction must change no decision."""

from __future__ import annotations

import random

import msgspec
import pytest

from tokencake.daemon.scheduler import (
    EngineState,
    PolicyConfig,
    create_policy,
    timers,
)
from tokencake.protocol import (
    AppDag,
    AppEnd,
    DagNode,
    LlmCallAdmitted,
    LlmCallFinish,
    LlmCallStart,
    RegisterApp,
    ToolCallEnd,
    ToolCallStart,
)

MB = 1 << 20
THRESHOLD = 64


def _run(seed: int) -> tuple[list[object], int]:
    """Many short agent lives under memory pressure; (decisions, most timers held)."""
    conf = PolicyConfig(bytes_per_block=MB, d2h_bytes_per_s=1e9, h2d_bytes_per_s=1e9)
    policy = create_policy("tokencake", conf)
    rng = random.Random(seed)
    dag = AppDag(nodes=[DagNode(id="a", agent_type="coder", expected_tool_s=2, tool_kind="t")])
    out: list[object] = []
    most = 0
    t = 0.0
    for i in range(3000):
        app = f"app{i}"
        out += policy.on_event(EngineState(1000, rng.randint(0, 60)), t)
        out += policy.on_event(RegisterApp(app, dag), t)
        out += policy.on_event(LlmCallStart(app, "a", request_id="r", blocks=20), t)
        out += policy.on_event(LlmCallAdmitted(app, "a", "r", kv_blocks=20), t)
        t += 0.01
        out += policy.on_event(LlmCallFinish(app, "a", "r", kv_blocks=20), t)
        out += policy.on_event(ToolCallStart(app, "a", "t", rng.choice([None, 1.0, 3.0])), t)
        t += rng.random() * 0.05
        if rng.random() < 0.8:
            out += policy.on_event(ToolCallEnd(app, "a", "c"), t)
        out += policy.on_event(AppEnd(app), t)
        most = max(most, len(policy._timers))  # type: ignore[attr-defined]
    return [msgspec.to_builtins(d) for d in out], most


def test_compaction_changes_no_decision_and_bounds_the_heap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(timers, "COMPACT_MIN", THRESHOLD)
    compacted, most = _run(7)
    monkeypatch.setattr(timers, "COMPACT_MIN", 10**9)
    kept, most_without = _run(7)
    assert compacted == kept
    assert most_without > 4 * THRESHOLD  # without it, every stale timer stays until due
    assert most <= 2 * THRESHOLD  # with it, within twice the threshold here
