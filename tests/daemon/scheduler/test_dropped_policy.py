"""A policy the daemon drops (its engine left, or a policy switch) is freed at once, with
everything it holds: no reference cycle is left for the collector.

Each engine has its own policy; the soak's engines come and go every few minutes. The
policy kept its event handlers as bound methods (a cycle through itself) and its live apps
and their agents refer to each other, so each dropped policy, its apps, agents, timers and
predictions (thousands of objects) waited for a full collection. Those collections came
minutes apart, and each new peak of live objects took pymalloc arenas the daemon never gave
back: the steps of the soak's memory line (docs/benchmarks.md, the memory line). Counted
with the collector off, so the counts are exact.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from tokencake import protocol as p
from tokencake.daemon.scheduler import PolicyConfig, create_policy, list_policies
from tokencake.daemon.scheduler.events import EngineState
from tokencake.daemon.scheduler.policy import Policy

MB = 1 << 20
N_APPS = 12


@pytest.fixture
def no_collector() -> Iterator[None]:
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _busy_policy(name: str) -> Policy:
    """A policy with live apps mid-tool-call (timers, predictions, GPU and host blocks)
    and ended ones, on a pool under pressure."""
    policy = create_policy(name, PolicyConfig(bytes_per_block=MB, host_blocks=256))
    now = 0.0
    policy.on_event(EngineState(64, 2, 4, 8), now)
    dag = p.AppDag(
        nodes=[
            p.DagNode("a", agent_type="coder", expected_tool_s=2.0, tool_kind="test"),
            p.DagNode("b", agent_type="helper"),
        ],
        edges=[("a", "b")],
    )
    for i in range(N_APPS):
        app = f"app{i}"
        policy.on_event(p.RegisterApp(app, dag), now)
        policy.on_event(p.LlmCallStart(app, "a", "e0", f"r{i}", 256), now)
        policy.on_event(p.LlmCallFinish(app, "a", f"r{i}", 32, 8), now)
        policy.on_event(p.ToolCallStart(app, "a", "test", 2.0, f"c{i}"), now)
        now += 0.5
        if i % 3 == 0:
            policy.on_event(p.ToolCallEnd(app, "a", f"c{i}"), now)
            policy.on_event(p.AppEnd(app), now)
    return policy


@pytest.mark.parametrize("name", [info.name for info in list_policies()])
def test_a_dropped_policy_leaves_no_cycle(name: str, no_collector: None) -> None:
    _busy_policy(name)  # first use: lazily imported modules and classes (cycles of their own)
    gc.collect()
    policy = _busy_policy(name)
    apps = list(getattr(policy, "apps", {}).values())
    assert any(app.agents for app in apps), "the policy holds live apps with agents"
    gone = weakref.ref(policy)
    del policy
    assert gone() is None, "freed when its last reference went, not by the collector"
    assert all(not app.agents for app in apps), "the app-agent cycles were cut"
    del apps
    assert gc.collect() == 0
