"""The phase machine (``tokencake.phases``) and the policies' copy of the phase agree."""

from __future__ import annotations

import random

import pytest

from tokencake import phases
from tokencake.daemon.scheduler import EngineState, create_policy, list_policies
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

A, B = "a", "b"


def _event(kind: int, agent: str) -> phases.PhaseEvent:
    if kind == 0:
        return LlmCallStart("app", agent, request_id="r", blocks=8)
    if kind == 1:
        return LlmCallAdmitted("app", agent, "r", kv_blocks=8)
    if kind == 2:
        return LlmCallFinish("app", agent, "r", 4, kv_blocks=9)
    if kind == 3:
        return ToolCallStart("app", agent, "search", 1.0, "c")
    return ToolCallEnd("app", agent, "c")


def test_the_table() -> None:
    start, admitted, finish, tool, end = (_event(k, A) for k in range(5))
    assert [phases.after(e) for e in (start, admitted, finish, tool, end)] == [
        phases.WAITING,
        phases.RUNNING,
        phases.IDLE,
        phases.TOOL,
        phases.IDLE,
    ]
    assert phases.fits(phases.IDLE, start) and phases.fits(phases.TOOL, start)
    assert not phases.fits(phases.WAITING, start) and not phases.fits(phases.RUNNING, start)
    assert phases.fits(phases.WAITING, admitted) and not phases.fits(phases.RUNNING, admitted)
    assert phases.fits(phases.WAITING, finish) and not phases.fits(phases.IDLE, finish)
    assert not phases.fits(phases.TOOL, tool) and phases.fits(phases.RUNNING, tool)
    assert phases.fits(phases.TOOL, end) and not phases.fits(phases.IDLE, end)
    assert not any(phases.fits(phases.DONE, _event(k, A)) for k in range(5))


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
        event = _event(rng.randrange(5), agent)
        if not phases.fits(registry[agent], event):
            continue
        now += 0.25
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
