"""``llm_call_preempted`` in the daemon: the agent waits again, and the policy's write-through
copies what the engine says is still cached (in-process daemon, hand-moved clock)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.daemon.test_agent_service import LAYOUT, Clock, call, make_daemon
from tokencake import protocol as p
from tokencake.daemon.server import Daemon

DAG = p.AppDag(nodes=[p.DagNode("plan"), p.DagNode("side")])


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    yield from make_daemon("tokencake", Clock())


@pytest.mark.parametrize("cached", [40, -1])
def test_a_preempted_call_waits_and_its_cached_blocks_are_copied(
    daemon: Daemon, cached: int
) -> None:
    eid = call(daemon, p.RegisterEngine("e", LAYOUT, num_gpu_blocks=200)).engine_id
    call(daemon, p.RegisterApp("app", DAG))
    assert not call(daemon, p.LlmCallPreempted("app", "plan", "r", 60, cached)).accepted  # idle
    call(daemon, p.LlmCallStart("app", "plan", eid, "r", 60 * 32))
    assert not call(daemon, p.LlmCallPreempted("app", "plan", "r", 60, cached)).accepted  # waits
    call(daemon, p.LlmCallAdmitted("app", "plan", "r", 60))
    call(daemon, p.EngineHeartbeat(eid, 0, 1, 1))
    ack = call(daemon, p.LlmCallPreempted("app", "plan", "r", 60, cached))
    assert ack.accepted
    agents = {a.agent_id: a for a in call(daemon, p.ListAgents("app")).agents}
    expected = 60 if cached < 0 else cached
    assert (agents["plan"].state, agents["plan"].kv_blocks) == ("waiting", expected)
    (save,) = [d for d in daemon.decisions.records if isinstance(d, p.OffloadDecision)]
    assert save.reason.rule == "save:reader_coming" and save.reason.terms["trigger"] == "preempted"
    assert (save.blocks, save.free_gpu, save.agent_id) == (expected, False, "plan")
    # readmitted, then finished: the phases go on as usual
    assert call(daemon, p.LlmCallAdmitted("app", "plan", "r", 60)).accepted
    assert call(daemon, p.LlmCallFinish("app", "plan", "r", 10, 61)).accepted
    assert daemon.error_counts == {}
