"""Offloads nobody reads back are counted, and learnt from: TokenCake stops offloading the KV
of tool calls whose KV, in past calls of the same agent type and tool kind, nobody read
afterwards. And the uploads already queued on the host link count in an offload's cost."""

from __future__ import annotations

from tests.daemon.scheduler.test_agent_aware import make
from tokencake.daemon.scheduler import (
    AppEnd,
    AppRegistered,
    EngineState,
    LlmCallAdmitted,
    LlmCallFinish,
    LlmCallStart,
    ToolCallEnd,
    ToolCallStart,
    TransferDone,
)
from tokencake.daemon.scheduler.agent_aware import TokenCakePolicy
from tokencake.protocol import AppDag, DagNode, DecisionRecord


def _app(p: TokenCakePolicy, i: int, read_after: bool) -> list[DecisionRecord]:
    """App ``i``: agent "a" calls a 5 s tool under pressure; then "b" (its DAG successor,
    which reads a's context) runs, or the app ends with a's KV unread."""
    t = 100.0 * i
    app = f"app{i}"
    nodes = [DagNode(id="a", agent_type="leaf", expected_tool_s=5, tool_kind="lint")]
    nodes.append(DagNode(id="b", agent_type="next"))
    p.on_event(AppRegistered(t, app, AppDag(nodes=nodes, edges=[("a", "b")])))
    p.on_event(EngineState(t, 1000, 50, num_waiting=3, waiting_blocks=200))
    p.on_event(LlmCallStart(t, app, "a", "r", blocks=100))
    p.on_event(LlmCallAdmitted(t + 0.1, app, "a", "r", blocks=100))
    p.on_event(LlmCallFinish(t + 1, app, "a", "r", kv_blocks=100))
    out = p.on_event(ToolCallStart(t + 1, app, "a", "lint", 5.0))
    if any(d.kind == "offload" for d in out):
        p.on_event(TransferDone(t + 1.5, app, "a", "d2h", 100))
    p.on_event(ToolCallEnd(t + 6, app, "a"))
    if read_after:
        p.on_event(LlmCallStart(t + 6, app, "b", "rb", blocks=110))
    p.on_event(AppEnd(t + 7, app))
    return out


def test_tool_calls_whose_kv_nobody_reads_stop_being_offloaded() -> None:
    p = make()
    first = [_app(p, i, read_after=False) for i in range(3)]
    assert all([d.kind for d in out] == ["offload"] for out in first)
    assert p.offloads_unread == 3 and p.offload_unread_blocks == 300
    share, n = p.unread_share("leaf", "lint")
    assert share == 1.0 and 2.7 < n < 2.72  # decayed: 1 + 0.9 + 0.81
    out = _app(p, 3, read_after=False)  # still 2.71 outcomes when it starts: offloaded
    assert [d.kind for d in out] == ["offload"]
    out = _app(p, 4, read_after=False)
    assert [d.kind for d in out] == ["keep", "pin"]  # pinned still: a wrong verdict is cheap
    assert out[0].reason.rule == "keep:not_read_after_tool"
    assert p.offloads_unread == 4  # the kept call cost no copy


def test_tool_calls_whose_kv_is_read_keep_being_offloaded() -> None:
    p = make()
    outs = [_app(p, i, read_after=True) for i in range(6)]
    assert all([d.kind for d in out] == ["offload"] for out in outs)
    assert p.offloads_unread == 0
    assert p.unread_share("leaf", "lint")[0] == 0.0


def test_uploads_already_queued_count_in_the_round_trip() -> None:
    """Same call, same pressure: offloaded on an idle host link, kept when 3,000 blocks of
    uploads (about 3 s at 1 GB/s) are in flight ahead of the one it would need."""

    def tool_start(p: TokenCakePolicy, app: str, t: float) -> list[DecisionRecord]:
        p.on_event(AppRegistered(t, app, AppDag(nodes=[DagNode(id="a", agent_type="w")])))
        p.on_event(EngineState(t, 10000, 5000, num_waiting=3, waiting_blocks=200))
        p.on_event(LlmCallStart(t, app, "a", "r", blocks=100))
        p.on_event(LlmCallAdmitted(t, app, "a", "r", blocks=100))
        p.on_event(LlmCallFinish(t + 0.5, app, "a", "r", kv_blocks=100))
        return p.on_event(ToolCallStart(t + 0.5, app, "a", "run", 2.0))

    idle = make()
    assert [d.kind for d in tool_start(idle, "x", 0.0)] == ["offload"]
    busy = make()
    big = AppDag(nodes=[DagNode(id="a", agent_type="big")])
    busy.on_event(AppRegistered(0.0, "big", big))
    busy.on_event(EngineState(0.0, 10000, 9000))
    busy.on_event(LlmCallStart(0.0, "big", "a", "r", blocks=3000))
    busy.on_event(LlmCallAdmitted(0.0, "big", "a", "r", blocks=3000))
    busy.on_event(LlmCallFinish(0.1, "big", "a", "r", kv_blocks=3000))
    busy.on_event(EngineState(0.1, 10000, 5000, num_waiting=3, waiting_blocks=3000))
    out = busy.on_event(ToolCallStart(0.1, "big", "a", "long", 600.0))
    assert [d.kind for d in out] == ["offload"]
    busy.on_event(TransferDone(3.5, "big", "a", "d2h", 3000))
    busy.on_event(ToolCallEnd(3.6, "big", "a"))  # returns: urgent upload of 3,000 blocks
    for k in range(8):  # each report releases more pieces (upload_pieces_per_tick)
        busy.on_event(EngineState(3.6 + 0.01 * k, 10000, 9000))
    assert busy.h2d_in_flight == 3000
    out = tool_start(busy, "x", 3.7)
    assert [d.kind for d in out] == ["keep", "pin", "offload", "pin"]  # kept, written through
    assert out[0].reason.rule == "keep:margin_below_min"
    queue = out[0].reason.terms["h2d_queue_s"]
    assert isinstance(queue, float) and queue > 2.0
