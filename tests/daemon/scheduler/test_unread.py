"""Offloads nobody reads back are counted, and learnt from: TokenCake stops offloading the KV
of tool calls whose KV, in past calls of the same agent type and tool kind, nobody read
afterwards. And the uploads already queued on the host link count in an offload's cost."""

from __future__ import annotations

from tests.daemon.scheduler.test_agent_aware import make
from tokencake.daemon.scheduler import (
    EngineState,
    TransferDone,
)
from tokencake.daemon.scheduler.agent_aware import TokenCakePolicy
from tokencake.protocol import (
    AppDag,
    AppEnd,
    DagNode,
    DecisionRecord,
    LlmCallAdmitted,
    LlmCallFinish,
    LlmCallStart,
    RegisterApp,
    ToolCallEnd,
    ToolCallStart,
)


def _app(p: TokenCakePolicy, i: int, read_after: bool) -> list[DecisionRecord]:
    """App ``i``: agent "a" calls a 5 s tool under pressure; then "b" (its DAG successor,
    which reads a's context) runs, or the app ends with a's KV unread."""
    t = 100.0 * i
    app = f"app{i}"
    nodes = [DagNode(id="a", agent_type="leaf", expected_tool_s=5, tool_kind="lint")]
    nodes.append(DagNode(id="b", agent_type="next"))
    p.on_event(RegisterApp(app, AppDag(nodes=nodes, edges=[("a", "b")])), t)
    p.on_event(EngineState(1000, 50, num_waiting=3, waiting_blocks=200), t)
    p.on_event(LlmCallStart(app, "a", request_id="r", blocks=100), t)
    p.on_event(LlmCallAdmitted(app, "a", "r", kv_blocks=100), t + 0.1)
    p.on_event(LlmCallFinish(app, "a", "r", kv_blocks=100), t + 1)
    out = p.on_event(ToolCallStart(app, "a", "lint", 5.0), t + 1)
    if any(d.kind == "offload" for d in out):
        p.on_event(TransferDone(app, "a", "d2h", 100), t + 1.5)
    p.on_event(ToolCallEnd(app, "a"), t + 6)
    if read_after:
        p.on_event(LlmCallStart(app, "b", request_id="rb", blocks=110), t + 6)
    p.on_event(AppEnd(app), t + 7)
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
        p.on_event(RegisterApp(app, AppDag(nodes=[DagNode(id="a", agent_type="w")])), t)
        p.on_event(EngineState(10000, 5000, num_waiting=3, waiting_blocks=200), t)
        p.on_event(LlmCallStart(app, "a", request_id="r", blocks=100), t)
        p.on_event(LlmCallAdmitted(app, "a", "r", kv_blocks=100), t)
        p.on_event(LlmCallFinish(app, "a", "r", kv_blocks=100), t + 0.5)
        return p.on_event(ToolCallStart(app, "a", "run", 2.0), t + 0.5)

    idle = make()
    assert [d.kind for d in tool_start(idle, "x", 0.0)] == ["offload"]
    busy = make()
    big = AppDag(nodes=[DagNode(id="a", agent_type="big")])
    busy.on_event(RegisterApp("big", big), 0.0)
    busy.on_event(EngineState(10000, 9000), 0.0)
    busy.on_event(LlmCallStart("big", "a", request_id="r", blocks=3000), 0.0)
    busy.on_event(LlmCallAdmitted("big", "a", "r", kv_blocks=3000), 0.0)
    busy.on_event(LlmCallFinish("big", "a", "r", kv_blocks=3000), 0.1)
    busy.on_event(EngineState(10000, 5000, num_waiting=3, waiting_blocks=3000), 0.1)
    out = busy.on_event(ToolCallStart("big", "a", "long", 600.0), 0.1)
    assert [d.kind for d in out] == ["offload"]
    busy.on_event(TransferDone("big", "a", "d2h", 3000), 3.5)
    busy.on_event(ToolCallEnd("big", "a"), 3.6)  # returns: urgent upload of 3,000 blocks
    for k in range(8):  # each report releases more pieces (upload_pieces_per_tick)
        busy.on_event(EngineState(10000, 9000), 3.6 + 0.01 * k)
    assert busy.h2d_in_flight == 3000
    out = tool_start(busy, "x", 3.7)
    assert [d.kind for d in out] == ["keep", "pin", "offload", "pin"]  # kept, written through
    assert out[0].reason.rule == "keep:margin_below_min"
    queue = out[0].reason.terms["h2d_queue_s"]
    assert isinstance(queue, float) and queue > 2.0
