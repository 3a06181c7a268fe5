"""Every registered policy runs inside the daemon: protocol events in, decision records out."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TypeVar

import msgspec
import pytest

from tokencake import protocol as p
from tokencake.daemon.arena import Arena
from tokencake.daemon.config import DaemonConfig
from tokencake.daemon.scheduler import events as ev
from tokencake.daemon.scheduler.policy import list_policies
from tokencake.daemon.server import Daemon
from tokencake.layout import KvLayout

LAYOUT = KvLayout("m", 1, 32, 1, 32, "float16", 4096)
DAG = p.AppDag(
    nodes=[
        p.DagNode("plan", agent_type="planner", expected_tool_s=8.0, tool_kind="search"),
        p.DagNode("code", agent_type="coder", expected_tool_s=5.0, tool_kind="tests"),
        p.DagNode("side", agent_type="helper"),
    ],
    edges=[("plan", "code"), ("plan", "side")],
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_daemon(policy: str, clock: Clock) -> Iterator[Daemon]:
    cfg = DaemonConfig(
        endpoint="ipc:///tmp/unused.sock",
        arena_bytes=4 << 20,
        metrics_port=0,
        instance=f"sched{policy.replace('-', '')}",
        policy=policy,
    )
    daemon = Daemon(cfg, clock=clock)
    daemon.arena = Arena.create(cfg.arena_bytes, instance=cfg.instance)
    try:
        yield daemon
    finally:
        daemon.arena.close()


R = TypeVar("R", bound=msgspec.Struct)


def call(daemon: Daemon, req: p.Request[R]) -> R:
    frame = daemon.handle_frame(b"engine", p.encode_request(req, 1))
    return p.decode_reply_body(p.decode_reply_envelope(frame), req)


@pytest.mark.parametrize("policy", [info.name for info in list_policies()])
def test_policy_runs_in_the_daemon(policy: str) -> None:
    clock = Clock()
    for daemon in make_daemon(policy, clock):
        reg = call(daemon, p.RegisterEngine("e", LAYOUT, num_gpu_blocks=200))
        assert isinstance(reg, p.RegisterEngineReply)
        eid = reg.engine_id
        call(daemon, p.RegisterApp("app", DAG))
        for agent in ("plan", "code"):
            call(daemon, p.LlmCallStart("app", agent, eid, f"{agent}-1", 2000))
            clock.now += 0.5
            call(daemon, p.LlmCallFinish("app", agent, f"{agent}-1", 50, 60))
            call(daemon, p.EngineHeartbeat(eid, 10, 3, 1))
            call(daemon, p.ToolCallStart("app", agent, "search", 8.0, "c"))
            for _ in range(20):
                clock.now += 0.5
                daemon._housekeeping()
            call(daemon, p.ToolCallEnd("app", agent, "c"))
        call(daemon, p.AppEnd("app"))
        clock.now += 1
        daemon._housekeeping()
        records = call(daemon, p.ListDecisions(limit=1000))
        assert isinstance(records, p.ListDecisionsReply)
        for record in records.decisions:
            assert record.policy == policy
            assert record.reason.rule
            msgspec.msgpack.encode(record)  # every reason is wire-safe
        if policy in {"tokencake", "tokencake-temporal"}:
            kinds = {d.kind for d in records.decisions if d.agent_id == "plan"}
            assert "offload" in kinds, records.decisions
        assert daemon.error_counts == {}


def test_offload_of_blocks_already_on_the_host_completes() -> None:
    """A finish-time save stored the agent's blocks; the later offload reserves them again
    (all -1). The scheduler must learn they are on the host, or it waits for them forever."""
    clock = Clock()
    for daemon in make_daemon("tokencake", clock):
        reg = call(daemon, p.RegisterEngine("e", LAYOUT, num_gpu_blocks=200))
        assert isinstance(reg, p.RegisterEngineReply)
        eid = reg.engine_id
        call(daemon, p.RegisterApp("app", DAG))
        hashes = [i.to_bytes(8, "little") for i in range(60)]
        saved = call(daemon, p.Reserve(eid, hashes))
        assert isinstance(saved, p.ReserveReply)
        call(daemon, p.Commit(eid, saved.slots))
        call(daemon, p.LlmCallStart("app", "plan", eid, "r", 2000))
        clock.now += 0.5
        call(daemon, p.LlmCallFinish("app", "plan", "r", 50, 60))
        call(daemon, p.EngineHeartbeat(eid, 10, 3, 1))
        call(daemon, p.ToolCallStart("app", "plan", "search", 8.0, "c"))
        offloads = [
            d for d in daemon.decisions.records if d.kind == "offload" and d.agent_id == "plan"
        ]
        assert offloads and offloads[-1].blocks == 60
        again = call(daemon, p.Reserve(eid, hashes, app_id="app", agent_id="plan"))
        assert isinstance(again, p.ReserveReply) and again.slots == [-1] * 60
        agents = call(daemon, p.ListAgents("app"))
        assert isinstance(agents, p.ListAgentsReply)
        assert {a.agent_id: a.host_blocks for a in agents.agents}["plan"] == 60


@pytest.mark.parametrize("copy_s", [0.004, -1.0])
def test_cost_model_measures_the_copy_not_the_wait(copy_s: float) -> None:
    """An engine that reports how long its copy took (``copy_s``) teaches the cost model the
    copy's bandwidth, however long the blocks waited for the engine's next step before it;
    without the report the daemon falls back to reserve-to-commit time, waiting included."""
    clock = Clock()
    for daemon in make_daemon("tokencake", clock):
        reg = call(daemon, p.RegisterEngine("e", LAYOUT, num_gpu_blocks=200))
        assert isinstance(reg, p.RegisterEngineReply)
        policy = daemon.scheduler._policies[reg.engine_id]
        prior = policy.cost.bandwidth("d2h")  # type: ignore[attr-defined]
        assert prior >= 1e9  # a fresh daemon starts from a sane prior (GB/s)
        hashes = [i.to_bytes(8, "little") for i in range(10)]
        slots = call(daemon, p.Reserve(reg.engine_id, hashes))
        assert isinstance(slots, p.ReserveReply)
        clock.now += 5.0  # the engine's step, the scheduler's queue: not the copy
        call(daemon, p.Commit(reg.engine_id, slots.slots, copy_s))
        learned = policy.cost.bandwidth("d2h")  # type: ignore[attr-defined]
        nbytes = 10 * LAYOUT.bytes_per_block
        if copy_s > 0:
            assert learned > nbytes / 5.0 * 100  # the 4 ms copy, not the 5 s wait
        else:
            assert learned < nbytes / 5.0 * 2


def test_decisions_that_come_due_on_a_measured_copy_are_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Any event runs the policy's timers that are due, a measured copy's too: what they
    decide is kept and pushed like the decisions of any other event, not dropped."""
    clock = Clock()
    for daemon in make_daemon("tokencake", clock):
        reg = call(daemon, p.RegisterEngine("e", LAYOUT, num_gpu_blocks=200))
        assert isinstance(reg, p.RegisterEngineReply)
        policy = daemon.scheduler._policies[reg.engine_id]
        due = p.KeepDecision(at_s=clock.now, agent_id="timer", reason=p.DecisionReason("t"))
        monkeypatch.setattr(policy, "on_event", lambda event, now, due=due: [due])
        hashes = [i.to_bytes(8, "little") for i in range(10)]
        slots = call(daemon, p.Reserve(reg.engine_id, hashes))
        assert isinstance(slots, p.ReserveReply)
        clock.now += 0.5
        call(daemon, p.Commit(reg.engine_id, slots.slots, 0.004))
        assert due in daemon.decisions.records and due.engine_id == reg.engine_id
        assert daemon.scheduler.l2_measured(1 << 20, 0.01, 4) == [due]


def test_decisions_of_an_admission_implied_by_the_finish_are_applied(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A finish with no ``llm_call_admitted`` before it implies the admission; what the policy
    decides on that admission is kept like any other decision."""
    clock = Clock()
    for daemon in make_daemon("tokencake", clock):
        reg = call(daemon, p.RegisterEngine("e", LAYOUT, num_gpu_blocks=200))
        assert isinstance(reg, p.RegisterEngineReply)
        call(daemon, p.RegisterApp("app", DAG))
        call(daemon, p.LlmCallStart("app", "plan", reg.engine_id, "r", 2000))
        policy = daemon.scheduler._policies[reg.engine_id]
        on_event = policy.on_event
        due = p.KeepDecision(at_s=clock.now, agent_id="plan", reason=p.DecisionReason("t"))

        def admitted_decides(
            event: ev.Event,
            now: float,
            on_event: Callable[..., list[p.DecisionRecord]] = on_event,
            due: p.KeepDecision = due,
        ) -> list[p.DecisionRecord]:
            out = on_event(event, now)
            return [*out, due] if isinstance(event, p.LlmCallAdmitted) else out

        monkeypatch.setattr(policy, "on_event", admitted_decides)
        clock.now += 0.5
        call(daemon, p.LlmCallFinish("app", "plan", "r", 50, 60))
        assert due in daemon.decisions.records and due.engine_id == reg.engine_id


def test_one_way_events_are_answered_only_when_they_fail() -> None:
    """``"ack": false``: a success changes the daemon as an acknowledged event would and sends
    nothing back; a failure still gets its error reply, with the request's id, and is counted
    like any other; a bad one-way frame is an error reply, not a crash."""
    clock = Clock()
    for daemon in make_daemon("tokencake", clock):
        call(daemon, p.RegisterApp("app", DAG))
        start = p.encode_request(p.LlmCallStart("app", "plan", request_id="r"), 5, ack=False)
        assert daemon.handle_frame(b"app", start) == b""
        assert daemon.event_counts["llm_call_start"] == 1
        [plan] = [a for a in call(daemon, p.ListAgents("app")).agents if a.agent_id == "plan"]
        assert plan.state == "waiting"
        late = p.encode_request(p.ToolCallEnd("app", "nobody", call_id="c"), 6, ack=False)
        env = p.decode_reply_envelope(daemon.handle_frame(b"app", late))
        assert (env.id, env.ok, env.error and env.error.code) == (6, False, "unknown_agent")
        assert daemon.error_counts == {"unknown_agent": 1}
        bad = msgspec.msgpack.encode({"v": 1, "op": "llm_call_start", "id": 7, "ack": "no"})
        env = p.decode_reply_envelope(daemon.handle_frame(b"app", bad))
        assert (env.ok, env.error and env.error.code) == (False, "bad_frame")
        acked = p.encode_request(p.LlmCallFinish("app", "plan", request_id="r"), 8)
        assert p.decode_reply_envelope(daemon.handle_frame(b"app", acked)).ok
