"""Write-through (``writethrough``): a host copy of KV whose reader is coming, decided by rule.

Decisions, not timings: the property test draws pool states, sizes and costs with fixed
seeds (hypothesis derandomized, no database) and checks that a copy is decided exactly
when the rule says so, and that a copy never moves KV.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokencake.daemon.scheduler import (
    EngineState,
    KvEvicted,
    LlmCallPreempted,
    PolicyConfig,
    TransferDone,
    create_policy,
)
from tokencake.daemon.scheduler.agent_aware import TokenCakePolicy
from tokencake.protocol import (
    URGENT,
    AppDag,
    DagNode,
    DecisionRecord,
    LlmCallAdmitted,
    LlmCallFinish,
    LlmCallStart,
    OffloadDecision,
    PinDecision,
    RegisterApp,
    ToolCallEnd,
    ToolCallStart,
)

MB = 1 << 20
SAVE = "save:reader_coming"


def make(name: str = "tokencake", **cfg: float) -> TokenCakePolicy:
    conf = PolicyConfig(bytes_per_block=MB, d2h_bytes_per_s=1e9, h2d_bytes_per_s=1e9, **cfg)  # type: ignore[arg-type]
    policy = create_policy(name, conf)
    assert isinstance(policy, TokenCakePolicy)
    return policy


def chain() -> AppDag:
    """``a`` calls a tool, then ``b`` reads its context (a successor's prompt starts with it)."""
    return AppDag(
        nodes=[DagNode(id="a", agent_type="w", tool_kind="t"), DagNode(id="b", agent_type="w")],
        edges=[("a", "b")],
    )


def finish_a(p: TokenCakePolicy, blocks: int, t: float = 1.0) -> list[DecisionRecord]:
    p.on_event(RegisterApp("app", chain()), 0.0)
    p.on_event(LlmCallStart("app", "a", request_id="r", blocks=blocks), 0.0)
    p.on_event(LlmCallAdmitted("app", "a", "r", kv_blocks=blocks), 0.1)
    return p.on_event(LlmCallFinish("app", "a", "r", kv_blocks=blocks), t)


def saves(out: list[DecisionRecord]) -> list[OffloadDecision]:
    return [d for d in out if isinstance(d, OffloadDecision) and d.reason.rule == SAVE]


@settings(max_examples=150)
@given(
    gpu=st.integers(100, 5000),
    used_share=st.floats(0.0, 1.0),
    waiting=st.integers(0, 400),
    blocks=st.integers(1, 600),
    host=st.integers(0, 12000),
    recompute_ms=st.floats(0.1, 5.0),
)
def test_successor_copy_is_decided_exactly_by_the_rule(
    gpu: int, used_share: float, waiting: int, blocks: int, host: int, recompute_ms: float
) -> None:
    """A finished node whose successor is still to run: its KV is copied to the host iff
    there is pressure, a reload is cheaper than a recompute and the host keeps a GPU's
    worth of room for offloads after the copy; the copy leaves the KV cached."""
    p = make(host_blocks=host, recompute_s_per_block=recompute_ms / 1e3)
    finish_a(p, blocks)
    free = gpu - int(used_share * gpu)
    out = p.on_event(EngineState(gpu, free, waiting_blocks=waiting), 1.0)
    t_back = p.cost.seconds("h2d", blocks, -(-blocks // p.config.upload_piece_blocks))
    pressure = waiting > 0 or 1.0 - free / gpu >= p.config.offload_usage_floor
    cheaper = t_back < blocks * recompute_ms / 1e3
    room = host - blocks - gpu >= 0
    got = saves(out)
    assert bool(got) == (pressure and cheaper and room)
    if got:
        (save,) = got
        assert not save.free_gpu and save.blocks == blocks
        p.on_event(TransferDone("app", "a", "d2h", blocks), 1.5)
        (agent,) = p.iter_agents()
        assert (agent.gpu_blocks, agent.host_blocks, agent.offloading) == (blocks, blocks, 0)
    # decided once: the next report does not copy the same KV again
    assert not saves(p.on_event(EngineState(gpu, free, waiting_blocks=waiting), 2.0))


def test_no_copy_without_a_reader_or_for_the_spatial_half() -> None:
    under_pressure = EngineState(1000, 100, num_waiting=2, waiting_blocks=300)
    leaf = make(recompute_s_per_block=0.01)
    leaf.on_event(RegisterApp("solo", AppDag(nodes=[DagNode(id="a", agent_type="w")])), 0.0)
    leaf.on_event(LlmCallStart("solo", "a", request_id="r", blocks=200), 0.0)
    leaf.on_event(LlmCallAdmitted("solo", "a", "r", kv_blocks=200), 0.1)
    leaf.on_event(LlmCallFinish("solo", "a", "r", kv_blocks=200), 1.0)
    assert not saves(leaf.on_event(under_pressure, 1.0))  # no successor, no tool call: no reader
    spatial = make("tokencake-spatial", recompute_s_per_block=0.01)
    finish_a(spatial, 200)
    assert not saves(spatial.on_event(under_pressure, 1.0))
    kept = make(recompute_s_per_block=0.01)
    finish_a(kept, 200)
    assert saves(kept.on_event(under_pressure, 1.0))


def copy_in_short_call(p: TokenCakePolicy) -> tuple[PinDecision, PinDecision]:
    """Kept through a 0.2 s call under pressure: pinned to q95, copied, pinned again."""
    p.on_event(EngineState(1000, 400, num_waiting=2, waiting_blocks=300), 0.0)
    finish_a(p, 200)
    out = p.on_event(ToolCallStart("app", "a", "t", 0.2), 1.0)
    assert [d.reason.rule for d in out][:3] == [
        "keep:margin_below_min",
        "pin:kept_through_tool_call",
        SAVE,
    ]
    first, second = out[1], out[3]
    assert isinstance(first, PinDecision) and isinstance(second, PinDecision)
    assert p.gpu_free == 400 - 200  # the pinned blocks are held once in the free count
    return first, second


def waiting_call(p: TokenCakePolicy, llm_s: float, blocks: int) -> None:
    """Another app's request waits for ``blocks``; its DAG node expects an ``llm_s`` call."""
    dag = AppDag(nodes=[DagNode(id="x", agent_type="v", expected_llm_s=llm_s)])
    p.on_event(RegisterApp("other", dag), 0.0)
    p.on_event(LlmCallStart("other", "x", request_id="q", blocks=blocks), 0.0)


def test_tool_call_copy_keeps_the_pin_when_a_late_return_would_wait_a_whole_call() -> None:
    """The waiting request (900 blocks) and the agent's KV (200) do not fit together in the
    1000-block pool, and the tail past the median (~0.3 s) is shorter than the waiting
    request's 5 s call: the pin comes back to its old end, the q95, since a return after
    the median would find the room taken for that whole call."""
    p = make(recompute_s_per_block=0.01)
    waiting_call(p, 5.0, 900)
    first, second = copy_in_short_call(p)
    assert second.reason.rule == "pin:through_short_tail"
    assert second.ttl_s == pytest.approx(first.ttl_s)
    assert second.reason.terms["taker_llm_s"] == 5.0
    assert second.reason.terms["taker_blocks"] == 900


@pytest.mark.parametrize(("llm_s", "blocks"), [(5.0, 300), (0.1, 900)])
def test_tool_call_copy_shortens_the_pin_to_the_median(llm_s: float, blocks: int) -> None:
    """The waiting request fits beside the agent's KV (300 + 200 blocks: a late return finds
    room), or its call is shorter than the tail: the pin ends at the median and the host
    copy insures the rest."""
    p = make(recompute_s_per_block=0.01)
    waiting_call(p, llm_s, blocks)
    first, second = copy_in_short_call(p)
    assert second.reason.rule == "pin:until_median_with_host_copy"
    assert second.ttl_s == pytest.approx(0.2) and second.ttl_s < first.ttl_s


def test_tool_call_copy_keeps_the_pin_only_if_tail_and_reader_are_the_shorter_job() -> None:
    """The same room held, but the waiting request's call (2 s) is not longer than the tail
    (~0.3 s) plus the call that reads the agent's KV next (``b``'s, the 2 s default): kept,
    the room would make it wait for both, so the pin ends at the median (the shorter job
    goes first). Seed 149 of the robustness family: each step of a ReAct chain re-pinned
    the room against a newer app's first call."""
    p = make(recompute_s_per_block=0.01)
    waiting_call(p, 2.0, 900)
    _first, second = copy_in_short_call(p)
    assert second.reason.rule == "pin:until_median_with_host_copy"
    assert second.reason.terms["reader_llm_s"] == 2.0
    assert second.ttl_s == pytest.approx(0.2)


def written_through(p: TokenCakePolicy) -> None:
    p.on_event(EngineState(1000, 400, num_waiting=2, waiting_blocks=300), 0.0)
    finish_a(p, 200)
    assert saves(p.on_event(ToolCallStart("app", "a", "t", 0.2), 1.0))
    p.on_event(TransferDone("app", "a", "d2h", 200), 1.1)


def test_return_uploads_only_what_is_missing_on_the_gpu() -> None:
    cached = make(recompute_s_per_block=0.01)
    written_through(cached)
    out = cached.on_event(ToolCallEnd("app", "a"), 1.2)
    assert not [d for d in out if d.kind == "upload"]  # still cached: nothing to copy
    evicted = make(recompute_s_per_block=0.01)
    written_through(evicted)
    evicted.on_event(KvEvicted("app", "a", 150), 1.15)  # the pin ran out; 150 blocks went
    evicted.on_event(ToolCallEnd("app", "a"), 1.2)
    (agent,) = evicted.iter_agents()
    assert agent.upload_left + agent.uploading == 150
    assert agent.upload_priority == URGENT


def test_failed_upload_piece_keeps_the_host_copy_once_the_reader_is_here() -> None:
    """A piece that found no GPU room: while the agent is in its tool call it is retried;
    once the agent's request waits, the engine loads the host copy on admission, so the
    upload is cancelled and the copy kept (no drop, no retry)."""
    p = make()
    p.on_event(EngineState(1000, 50, num_waiting=1, waiting_blocks=10), 0.0)
    finish_a(p, 100)
    out = p.on_event(ToolCallStart("app", "a", "t", 20.0), 1.0)
    assert [d.kind for d in out] == ["offload"]
    p.on_event(TransferDone("app", "a", "d2h", 100), 1.2)
    p.on_event(ToolCallEnd("app", "a"), 2.0)  # early return: urgent upload
    p.on_event(EngineState(1000, 1000), 2.0)
    (agent,) = p.iter_agents()
    sent = agent.uploading
    assert sent > 0
    p.on_event(LlmCallStart("app", "a", request_id="r2", blocks=110), 2.1)  # the reader is here
    out = p.on_event(TransferDone("app", "a", "h2d", sent, ok=False), 2.2)
    assert not [d for d in out if d.kind in ("drop", "upload")]
    assert (agent.upload_left, agent.uploading, agent.upload_failures) == (0, 0, 0)
    assert agent.host_blocks == 100


def test_failed_upload_piece_is_retried_during_the_tool_call() -> None:
    p = make()
    p.on_event(EngineState(1000, 50, num_waiting=1, waiting_blocks=10), 0.0)
    finish_a(p, 100)
    p.on_event(ToolCallStart("app", "a", "t", 20.0), 1.0)
    p.on_event(TransferDone("app", "a", "d2h", 100), 1.2)
    p.on_event(EngineState(1000, 1000), 1.3)
    (agent,) = p.iter_agents()
    p._start_upload(agent, 64, URGENT, "test_upload", {}, [])
    p.on_event(EngineState(1000, 1000), 1.4)
    sent = agent.uploading
    assert sent > 0
    out = p.on_event(TransferDone("app", "a", "h2d", sent, ok=False), 1.5)
    assert agent.upload_failures == 1
    assert [d.reason.rule for d in out if d.kind == "upload"] == ["retry_failed_piece"]


def test_failed_upload_keeps_the_host_copy_when_retries_run_out() -> None:
    """The pieces of an upload during the tool call keep finding no GPU room: after
    ``MAX_UPLOAD_FAILURES`` the upload is cancelled and the host copy kept (the returning
    call's admission loads it), where the base policy drops it (a recompute instead)."""
    from tokencake.daemon.scheduler.uploads import MAX_UPLOAD_FAILURES

    p = make()
    p.on_event(EngineState(1000, 50, num_waiting=1, waiting_blocks=10), 0.0)
    finish_a(p, 100)
    p.on_event(ToolCallStart("app", "a", "t", 20.0), 1.0)
    p.on_event(TransferDone("app", "a", "d2h", 100), 1.2)
    (agent,) = p.iter_agents()
    p._start_upload(agent, 64, URGENT, "test_upload", {}, [])
    rules: list[str] = []
    for i in range(MAX_UPLOAD_FAILURES):
        p.on_event(EngineState(1000, 1000), 1.3 + i / 10)
        sent = agent.uploading
        assert sent > 0
        out = p.on_event(TransferDone("app", "a", "h2d", sent, ok=False), 1.35 + i / 10)
        rules += [d.reason.rule for d in out]
    assert rules[-1] == "keep:upload_failed_stays_on_host"
    assert "upload_failed" not in rules
    assert (agent.upload_left, agent.uploading, agent.host_blocks) == (0, 0, 100)


def test_preempted_request_is_copied_out_while_it_waits() -> None:
    """A preemption releases the request's blocks, cached, and first in line for eviction;
    the request itself reads them when it is admitted again. They are copied to the host
    (kept cached: ``free_gpu=False``) when a reload beats a recompute, all of them (the
    engine copies only what its host store lacks); otherwise nothing is copied."""
    for recompute_s, copied in ((0.01, True), (1e-6, False)):
        p = make(recompute_s_per_block=recompute_s)
        p.on_event(RegisterApp("app", chain()), 0.0)
        p.on_event(EngineState(1000, 0, num_waiting=1, waiting_blocks=10), 0.0)
        p.on_event(LlmCallStart("app", "a", request_id="r", blocks=300), 0.0)
        p.on_event(LlmCallAdmitted("app", "a", "r", kv_blocks=300), 0.1)
        out = p.on_event(LlmCallPreempted("app", "a", "r", blocks_freed=300), 0.5)
        got = [d for d in out if isinstance(d, OffloadDecision)]
        if not copied:
            assert not got
            continue
        (save,) = got
        assert save.reason.rule == SAVE and save.reason.terms["trigger"] == "preempted"
        assert not save.free_gpu and save.blocks == 300
        p.on_event(TransferDone("app", "a", "d2h", 300), 0.7)
        (agent,) = p.iter_agents()
        assert (agent.host_blocks, agent.offloading) == (300, 0)


def test_host_room_is_the_engines_report_not_the_policys_book() -> None:
    """The policy books a copy's blocks per agent, so a prefix several agents share (a
    fan-out's planner context, a node and its successor) is counted once per copy, while the
    engine stores it once. Once the engine reports its host store, the room for a copy is
    that report (less what was booked since), not the book: here the second copy fits by
    the report (1230 free) and would be refused by the book (1050 free, 50 short)."""
    gpu, host, blocks = 1000, 1250, 200
    p = make(host_blocks=host, recompute_s_per_block=0.01)
    pressure = {"num_waiting": 2, "waiting_blocks": 300}
    finish_a(p, blocks)
    assert saves(p.on_event(EngineState(gpu, 400, **pressure), 1.0))
    p.on_event(TransferDone("app", "a", "d2h", blocks), 1.2)
    assert p.host_free() == host - blocks  # no report yet: the book
    # the engine stored 20 new blocks (the rest it already held for another agent)
    report = EngineState(gpu, 400, host_blocks_total=host, host_blocks_free=host - 20, **pressure)
    p.on_event(report, 1.3)
    assert p.host_free() == host - 20
    p.on_event(RegisterApp("app2", chain()), 1.4)
    p.on_event(LlmCallStart("app2", "a", request_id="r2", blocks=blocks), 1.4)
    p.on_event(LlmCallAdmitted("app2", "a", "r2", kv_blocks=blocks), 1.5)
    p.on_event(LlmCallFinish("app2", "a", "r2", kv_blocks=blocks), 2.0)
    (save,) = saves(p.on_event(report, 2.0))
    assert save.app_id == "app2" and save.blocks == blocks
    assert p.host_free() == host - 20 - blocks  # booked since the report
