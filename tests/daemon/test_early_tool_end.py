"""A tool call's end read before its start (two senders), in the daemon: the end is held, and
the start that follows is applied as a call that is over (``tokencake.phases``, "Early
ends"). The daemon object runs in-process with a hand-moved clock: no timing, no sockets."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TypeVar

import msgspec
import pytest

from tests.daemon.test_agent_service import LAYOUT, Clock, call, make_daemon
from tokencake import phases
from tokencake import protocol as p
from tokencake.daemon.server import Daemon

DAG = p.AppDag(nodes=[p.DagNode("plan", agent_type="planner", tool_kind="search")])
R = TypeVar("R", bound=msgspec.Struct)


class Run:
    """A daemon with one engine (under memory pressure) and one app, events sent in order."""

    def __init__(self, daemon: Daemon, clock: Clock) -> None:
        self.daemon, self.clock = daemon, clock
        reg = self.call(p.RegisterEngine("e", LAYOUT, num_gpu_blocks=200))
        self.engine_id = reg.engine_id
        self.call(p.RegisterApp("app", DAG))

    def call(self, req: p.Request[R]) -> R:
        return call(self.daemon, req)

    def llm_call(self, req_id: str, blocks: int = 60) -> None:
        self.call(p.LlmCallStart("app", "plan", self.engine_id, req_id, blocks * 32))
        self.clock.now += 0.5
        self.call(p.LlmCallFinish("app", "plan", req_id, 10, blocks))
        self.call(p.EngineHeartbeat(self.engine_id, 5, 2, 1))  # 5 of 200 blocks free

    def state(self) -> str:
        (agent,) = self.call(p.ListAgents("app")).agents
        return agent.state

    def early(self) -> dict[str, int]:
        return self.call(p.Stats()).early_tool_ends

    def offloads(self) -> list[p.DecisionRecord]:
        return [d for d in self.daemon.decisions.records if d.kind == "offload"]

    def learnt_s(self) -> float:
        (policy,) = self.daemon.scheduler._policies.values()
        return float(policy.mean_predictor.predict_s("planner", "search", None))  # type: ignore[attr-defined]


@pytest.fixture
def run() -> Iterator[Run]:
    clock = Clock()
    for daemon in make_daemon("tokencake", clock):
        yield Run(daemon, clock)


def test_in_order_the_tool_call_is_offloaded(run: Run) -> None:
    """The reference: start, then end. Under pressure the call's KV is offloaded."""
    run.llm_call("r1")
    assert run.call(p.ToolCallStart("app", "plan", "search", 8.0, "r1")).accepted
    assert run.state() == "tool" and run.offloads()
    run.clock.now += 2.0
    assert run.call(p.ToolCallEnd("app", "plan")).accepted
    assert run.state() == "idle" and run.learnt_s() == pytest.approx(2.0)


def test_an_end_before_its_start_is_held_and_the_start_applied_as_over(run: Run) -> None:
    """The engine bench's race: the app's end is read before the connector's start. The end
    is held; the start ends the call at once: the agent stays idle (not stuck in ``tool``),
    no offload is decided for a call that is over, and its length (finish to end) is
    learnt."""
    run.llm_call("r1")
    run.clock.now += 2.0
    ack = run.call(p.ToolCallEnd("app", "plan"))
    assert (ack.accepted, ack.held, ack.decisions) == (True, True, 0)
    assert run.state() == "idle"
    run.clock.now += 0.3
    ack = run.call(p.ToolCallStart("app", "plan", "search", 8.0, "r1"))
    assert ack.accepted and not ack.held
    assert run.state() == "idle"
    assert not run.offloads()
    assert run.learnt_s() == pytest.approx(2.0)
    assert run.early() == {"held": 1, "applied": 1}
    record = run.daemon.apps.agent("app", "plan")
    assert (record.tool_calls, record.tool_kind, record.tool_call_id) == (1, "search", "r1")
    # The agent's next call and tool call run as usual.
    run.llm_call("r2")
    assert run.call(p.ToolCallStart("app", "plan", "search", 8.0, "r2")).accepted
    assert run.state() == "tool" and run.offloads()


def test_a_stale_early_end_is_dropped(run: Run) -> None:
    run.llm_call("r1")
    assert run.call(p.ToolCallEnd("app", "plan")).held
    run.clock.now += phases.EARLY_END_S + 1.0
    assert run.call(p.ToolCallStart("app", "plan", "search", 8.0, "r1")).accepted
    assert run.state() == "tool"
    assert run.early() == {"held": 1, "dropped": 1}


def test_a_new_llm_call_drops_what_is_held(run: Run) -> None:
    """The agent called the model again: no held end can be for a tool call still to come."""
    run.llm_call("r1")
    assert run.call(p.ToolCallEnd("app", "plan")).held
    run.llm_call("r2")
    assert run.call(p.ToolCallStart("app", "plan", "search", 8.0, "r2")).accepted
    assert run.state() == "tool"
    assert run.early() == {"held": 1, "dropped": 1}


def test_ends_that_are_not_early_are_refused_as_before(run: Run) -> None:
    """A duplicate end (its call id is the call that ended), an end while the call runs or
    waits, and an end naming another call during a tool call change nothing."""
    run.llm_call("r1")
    assert run.call(p.ToolCallStart("app", "plan", "search", 8.0, "c1")).accepted
    assert not run.call(p.ToolCallEnd("app", "plan", "c2")).accepted
    assert run.call(p.ToolCallEnd("app", "plan", "c1")).accepted
    ack = run.call(p.ToolCallEnd("app", "plan", "c1"))
    assert not ack.accepted and not ack.held
    run.call(p.LlmCallStart("app", "plan", run.engine_id, "r2", 1000))
    assert not run.call(p.ToolCallEnd("app", "plan")).accepted  # waiting
    run.call(p.LlmCallAdmitted("app", "plan", "r2", 40))
    assert not run.call(p.ToolCallEnd("app", "plan")).accepted  # running
    assert run.early() == {}


def test_an_early_end_waits_for_its_own_call_id(run: Run) -> None:
    """Ids that disagree do not match: the start of another call runs as usual, and the
    held end stays for its own start."""
    run.llm_call("r1")
    assert run.call(p.ToolCallEnd("app", "plan", "c9")).held
    assert run.call(p.ToolCallStart("app", "plan", "search", 8.0, "c1")).accepted
    assert run.state() == "tool"
    assert run.call(p.ToolCallEnd("app", "plan", "c1")).accepted
    assert run.call(p.ToolCallStart("app", "plan", "search", 8.0, "c9")).accepted
    assert run.state() == "idle"
    assert run.early() == {"held": 1, "applied": 1}


def test_app_end_drops_what_is_held(run: Run) -> None:
    run.llm_call("r1")
    assert run.call(p.ToolCallEnd("app", "plan")).held
    assert run.call(p.AppEnd("app")).accepted
    assert run.early() == {"held": 1, "dropped": 1}
