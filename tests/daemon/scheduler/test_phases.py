"""The phase machine (``tokencake.phases``) and the policies' copy of the phase agree."""

from __future__ import annotations

import random

import pytest

from tokencake import phases
from tokencake.daemon.scheduler import EngineState, create_policy, list_policies
from tokencake.daemon.scheduler.events import ToolCallOver
from tokencake.protocol import (
    AppDag,
    AppEnd,
    DagNode,
    LlmCallAdmitted,
    LlmCallFinish,
    LlmCallPreempted,
    LlmCallStart,
    RegisterApp,
    ToolCallEnd,
    ToolCallStart,
)

A, B = "a", "b"
KINDS = 6


def _event(kind: int, agent: str) -> phases.PhaseEvent:
    if kind == 0:
        return LlmCallStart("app", agent, request_id="r", blocks=8)
    if kind == 1:
        return LlmCallAdmitted("app", agent, "r", kv_blocks=8)
    if kind == 2:
        return LlmCallFinish("app", agent, "r", 4, kv_blocks=9)
    if kind == 3:
        return ToolCallStart("app", agent, "search", 1.0, "c")
    if kind == 4:
        return ToolCallEnd("app", agent, "c")
    return LlmCallPreempted("app", agent, "r", blocks_freed=8)


def test_the_table() -> None:
    start, admitted, finish, tool, end, preempted = (_event(k, A) for k in range(KINDS))
    assert [phases.after(e) for e in (start, admitted, finish, tool, end, preempted)] == [
        phases.WAITING,
        phases.RUNNING,
        phases.IDLE,
        phases.TOOL,
        phases.IDLE,
        phases.WAITING,
    ]
    assert [ph for ph in phases.PHASES if phases.fits(ph, preempted)] == [phases.RUNNING]
    assert phases.fits(phases.IDLE, start) and phases.fits(phases.TOOL, start)
    assert not phases.fits(phases.WAITING, start) and not phases.fits(phases.RUNNING, start)
    assert phases.fits(phases.WAITING, admitted) and not phases.fits(phases.RUNNING, admitted)
    assert phases.fits(phases.WAITING, finish) and not phases.fits(phases.IDLE, finish)
    assert not phases.fits(phases.TOOL, tool) and phases.fits(phases.RUNNING, tool)
    assert phases.fits(phases.TOOL, end) and not phases.fits(phases.IDLE, end)
    assert not any(phases.fits(phases.DONE, _event(k, A)) for k in range(KINDS))


def test_early_ends() -> None:
    """Which ends are held as early, how many, how long, and which start they end."""
    end = ToolCallEnd("app", A)
    assert [ph for ph in phases.PHASES if phases.held_early(ph, end, "")] == [phases.IDLE]
    # an end naming the call that ended last is a duplicate, not early
    assert not phases.held_early(phases.IDLE, ToolCallEnd("app", A, "c1"), "c1")
    assert phases.held_early(phases.IDLE, ToolCallEnd("app", A, "c2"), "c1")
    held: tuple[phases.EarlyEnd, ...] = ()
    for i in range(phases.MAX_EARLY_ENDS + 2):
        held, out = phases.hold(held, phases.EarlyEnd(f"c{i}", 10.0 + i, 9.0))
        assert out == (1 if i >= phases.MAX_EARLY_ENDS else 0)
    assert [e.call_id for e in held] == [f"c{i}" for i in range(2, phases.MAX_EARLY_ENDS + 2)]
    # ids must agree, unless one side has none; the oldest match goes first
    got, rest, stale = phases.take(held, "c3", 12.0)
    assert got is not None and (got.call_id, got.duration_s, stale) == ("c3", 4.0, 0)
    assert len(rest) == phases.MAX_EARLY_ENDS - 1
    assert phases.take(rest, "nope", 12.0)[0] is None
    first = phases.take(rest, "", 12.0)[0]
    assert first is not None and first.call_id == "c2"
    # too old: dropped, matching nothing
    late = held[-1].at + phases.EARLY_END_S + 0.5
    assert phases.take(held, "c3", late) == (None, (), len(held))
    anon = phases.EarlyEnd("", 5.0, 7.0)
    assert anon.ends("c1") and anon.duration_s == 0.0


@pytest.mark.parametrize("name", [info.name for info in list_policies()])
def test_a_policy_moves_as_the_machine_does(name: str) -> None:
    """Fed what the daemon's registry accepts (events that fit), every policy's phase for
    every agent is the registry's, event after event (seeded random order)."""
    rng = random.Random(7)
    policy = create_policy(name)
    dag = AppDag(nodes=[DagNode(id=A), DagNode(id=B)], edges=[(A, B)])
    policy.on_event(RegisterApp("app", dag), 0.0)
    policy.on_event(EngineState(1000, 900), 0.0)
    registry = {A: phases.IDLE, B: phases.IDLE}
    now = 0.0
    moves = 0
    for _ in range(300):
        agent = rng.choice((A, B))
        kind = rng.randrange(KINDS + 1)
        now += 0.25
        if kind == KINDS:
            # A tool call whose end was held: its start, when the agent is idle, is applied
            # as a call that is over, and the phase stays idle.
            if registry[agent] != phases.IDLE:
                continue
            policy.on_event(ToolCallOver("app", agent, "search", 1.0, 0.5), now)
        else:
            event = _event(kind, agent)
            if not phases.fits(registry[agent], event):
                continue
            policy.on_event(event, now)
            registry[agent] = phases.after(event)
        moves += 1
        for key, phase in registry.items():
            view = policy.agent_view("app", key)
            assert view is None or view.state == phase, (name, key, event)
    assert moves > 100
    policy.on_event(AppEnd("app"), now + 1)
    for key in registry:
        view = policy.agent_view("app", key)
        assert view is None or view.state == phases.DONE
