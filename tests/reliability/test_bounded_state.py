"""Memory a long-running daemon keeps per name a client chose stays bounded.

Apps whose agent types and tool kinds are new each time (a framework naming them per
instance) used to add an entry per app to the policy's learned tables (the tool-duration
predictors, the unread-after-tool statistics) and its per-class counters, forever: the
soak's fixed names did not show it. In-process daemon, fake clock, deterministic.
"""

from __future__ import annotations

import gc
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.common.fuzz_harness import InProcessDaemon
from tokencake import protocol as p
from tokencake.daemon.scheduler import learned
from tokencake.daemon.scheduler.accounting import AccountingPolicy
from tokencake.daemon.scheduler.timers import TimedPolicy
from tokencake.layout import KvLayout

LAYOUT = KvLayout("bounded", 1, 16, 1, 16, "float16", 1024)
CAP = 8


@pytest.fixture
def ipd() -> Iterator[InProcessDaemon]:
    with tempfile.TemporaryDirectory(prefix="tcbounded-") as tmp:
        d = InProcessDaemon(Path(tmp), arena_bytes=4 << 20)
        try:
            yield d
        finally:
            d.close()


def _one_app(ipd: InProcessDaemon, engine: str, i: int) -> None:
    """An app whose only agent has a type and a tool kind no other app uses."""
    app, kind = f"app{i}", f"kind-{i}"
    node = p.DagNode("agent", agent_type=f"type-{i}", expected_tool_s=2.0, tool_kind=kind)
    ipd.ok(p.RegisterApp(app, p.AppDag(nodes=[node])))
    ipd.ok(p.LlmCallStart(app, "agent", engine, f"r{i}", 256))
    ipd.ok(p.LlmCallFinish(app, "agent", f"r{i}", 32, 8))
    ipd.ok(p.ToolCallStart(app, "agent", kind, 2.0, f"c{i}"))
    ipd.clock.advance(1.0)
    ipd.ok(p.ToolCallEnd(app, "agent", f"c{i}"))
    ipd.ok(p.LlmCallStart(app, "agent", engine, f"s{i}", 300))
    ipd.ok(p.LlmCallFinish(app, "agent", f"s{i}", 32, 8))
    ipd.ok(p.AppEnd(app))
    ipd.clock.advance(1.0)


def test_names_chosen_per_app_leave_the_policy_bounded(
    ipd: InProcessDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(learned, "LEARNED_KEYS_MAX", CAP)
    engine = ipd.ok(p.RegisterEngine("e0", LAYOUT, 64)).engine_id
    ipd.ok(p.EngineHeartbeat(engine, 2, 4, 8))  # a pool under pressure: tool calls offload
    for i in range(5 * CAP):
        _one_app(ipd, engine, i)
    ipd.clock.advance(4000.0)  # past every timer the ended apps left
    ipd.ok(p.EngineHeartbeat(engine, 2, 4, 8))
    (policy,) = ipd.daemon.scheduler._policies.values()
    assert isinstance(policy, AccountingPolicy)
    sizes = {
        "reader_stats": len(policy.reader_stats),
        "by_key": len(policy.predictor._by_key),
        "by_kind": len(policy.predictor._by_kind),
        "mean_sums": len(policy.mean_predictor._sums),
    }
    assert sizes == dict.fromkeys(sizes, CAP), sizes
    # The newest names are the ones kept: the last app's type and kind are still learned.
    last = 5 * CAP - 1
    assert (f"type-{last}", f"kind-{last}") in policy.predictor._by_key
    assert ("type-0", "kind-0") not in policy.predictor._by_key
    # Per-class counters of classes no agent uses any more are gone, not kept at zero; what
    # is left are the few ended apps whose blocks the engine still caches (bounded by its
    # pool: 64 blocks here).
    held = {agent.klass for app in policy.apps.values() for agent in app.agents.values()}
    assert len(policy.apps) < CAP and set(policy.class_usage) <= held
    assert 0 not in policy.class_usage.values() and 0 not in policy.class_crit_usage.values()


def test_a_learned_key_updated_again_is_kept_over_older_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(learned, "LEARNED_KEYS_MAX", 3)
    table: dict[str, list[int]] = {}
    for key in "abc":
        learned.learned(table, key, lambda: [0])[0] += 1
    learned.learned(table, "a", lambda: [0])[0] += 1  # "a" is now the most recent
    learned.learned(table, "d", lambda: [0])[0] += 1  # drops "b", the oldest update
    assert table == {"c": [1], "a": [2], "d": [1]}
    counts: dict[str, int] = {}
    learned.add_count(counts, "x", 3)
    learned.add_count(counts, "x", -3)
    learned.add_count(counts, "y", -1)
    assert counts == {"y": -1}


def test_an_ended_app_is_freed_at_once_not_left_to_the_cycle_collector(
    ipd: InProcessDaemon,
) -> None:
    """App and agent states point at each other; once the policy forgets an ended app the
    cycle is cut, so they go when their last reference does. Left to the collector, the
    daemon's heap swung by tens of thousands of objects between full collections at soak
    rates, and each new peak kept pymalloc arenas for good."""
    engine = ipd.ok(p.RegisterEngine("e0", LAYOUT, 64)).engine_id
    ipd.ok(p.EngineHeartbeat(engine, 32, 0, 0))
    (policy,) = ipd.daemon.scheduler._policies.values()
    assert isinstance(policy, TimedPolicy)
    gc.collect()
    gc.disable()
    try:
        _one_app(ipd, engine, 0)
        ipd.clock.advance(4000.0)  # past the timers that still name its agent
        ipd.ok(p.EngineHeartbeat(engine, 32, 0, 0))
        assert "app0" not in policy.apps  # ended, nothing in flight: forgotten
        assert not policy._timers
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage = [type(o).__name__ for o in gc.garbage]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert "AppState" not in garbage and "AgentState" not in garbage, garbage


def test_an_ended_apps_unreported_copies_are_written_off_after_host_ttl(
    ipd: InProcessDaemon,
) -> None:
    """A copy the policy decided and the engine never reports (an agent its connector does
    not track, a lost push, fewer blocks copied than decided) kept the ended app in the
    policy until the engine left. After ``host_ttl_s`` it is counted as failed and the app
    is forgotten."""
    engine = ipd.ok(p.RegisterEngine("e0", LAYOUT, 64)).engine_id
    ipd.ok(p.EngineHeartbeat(engine, 2, 4, 8))  # a pool under pressure: tool calls offload
    (policy,) = ipd.daemon.scheduler._policies.values()
    assert isinstance(policy, TimedPolicy)
    for i in range(10):  # new names: nothing learned, so each tool call is offloaded
        _one_app(ipd, engine, i)  # the engine carries out and reports none of it
    held = [a for a in policy.apps.values() if any(g.offloading for g in a.agents.values())]
    assert held  # ended, waiting on copies that will never be reported
    ipd.clock.advance(policy.config.host_ttl_s - 30.0)
    ipd.ok(p.EngineHeartbeat(engine, 2, 4, 8))
    assert all(a.app_id in policy.apps for a in held)  # a copy may still be reported
    ipd.clock.advance(60.0)
    ipd.ok(p.EngineHeartbeat(engine, 2, 4, 8))
    assert not any(a.app_id in policy.apps for a in held)
