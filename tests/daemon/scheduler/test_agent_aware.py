"""Unit tests of TokenCake's temporal and spatial decisions, with their reasons."""

from __future__ import annotations

import pytest

from tokencake.daemon.scheduler import (
    CachedKv,
    EngineState,
    PolicyConfig,
    TransferDone,
    WaitingRequest,
    create_policy,
)
from tokencake.daemon.scheduler.agent_aware import TokenCakePolicy
from tokencake.daemon.scheduler.policy import EventOrderError
from tokencake.protocol import (
    PREDICTIVE,
    URGENT,
    AppDag,
    AppEnd,
    DagNode,
    DecisionRecord,
    LlmCallAdmitted,
    LlmCallFinish,
    LlmCallStart,
    OffloadDecision,
    PartitionDecision,
    PinDecision,
    RegisterApp,
    ToolCallEnd,
    ToolCallStart,
)

MB = 1 << 20


def make(name: str = "tokencake", **cfg: float) -> TokenCakePolicy:
    conf = PolicyConfig(bytes_per_block=MB, d2h_bytes_per_s=1e9, h2d_bytes_per_s=1e9, **cfg)  # type: ignore[arg-type]
    policy = create_policy(name, conf)
    assert isinstance(policy, TokenCakePolicy)
    return policy


def dag() -> AppDag:
    return AppDag(
        nodes=[
            DagNode(id="a", agent_type="coder", expected_tool_s=5, tool_kind="test"),
            DagNode(id="b", agent_type="helper"),
            DagNode(id="c", agent_type="coder"),
        ],
        edges=[("a", "c"), ("b", "c")],
    )


def to_tool(
    p: TokenCakePolicy, blocks: int, hint: float | None, t: float = 1.0
) -> list[DecisionRecord]:
    p.on_event(RegisterApp("app", dag()), 0.0)
    p.on_event(LlmCallStart("app", "a", request_id="r", blocks=blocks), 0.0)
    p.on_event(LlmCallAdmitted("app", "a", "r", kv_blocks=blocks), 0.1)
    p.on_event(LlmCallFinish("app", "a", "r", kv_blocks=blocks), t)
    return p.on_event(ToolCallStart("app", "a", "test", hint), t)


def kinds(ds: list[DecisionRecord]) -> list[str]:
    return [d.kind for d in ds]


def test_offloads_when_stall_beats_round_trip_under_pressure() -> None:
    p = make()
    p.on_event(EngineState(1000, 50, num_waiting=3, waiting_blocks=200), 0.0)
    out = to_tool(p, 100, hint=5.0)
    assert kinds(out) == ["offload"]
    r = out[0].reason
    assert r.rule == "offload:stall_exceeds_round_trip"
    assert r.terms["t_d2h_s"] == pytest.approx(100 * MB / 1e9 + 0.002, rel=1e-3)
    margin = r.terms["margin_s"]
    assert isinstance(margin, float) and margin > 1.0
    upload_at = r.terms["upload_at_s"]
    assert isinstance(upload_at, float) and 1.0 < upload_at < 1.0 + 5.0
    assert isinstance(out[0], OffloadDecision) and out[0].free_gpu


def test_keeps_when_margin_too_small_and_says_why() -> None:
    p = make()
    p.on_event(EngineState(1000, 50, num_waiting=3, waiting_blocks=200), 0.0)
    out = to_tool(p, 100, hint=0.15)  # round trip ~0.2 s
    assert kinds(out) == ["keep", "pin", "offload", "pin"]
    assert out[0].reason.rule == "keep:margin_below_min"
    # kept on the GPU: pinned until the call's q95, so that the return finds it there
    pin = out[1]
    assert isinstance(pin, PinDecision)
    assert pin.reason.rule == "pin:kept_through_tool_call"
    assert pin.reason.terms["kept_because"] == "keep:margin_below_min"
    assert 0.15 < pin.ttl_s < 0.5
    # under pressure the returning call's KV is written through (a copy: it stays cached),
    # and the pin, which the copy ended, comes back up to the predicted median only
    save, repin = out[2], out[3]
    assert isinstance(save, OffloadDecision) and not save.free_gpu
    assert save.reason.rule == "save:reader_coming" and save.blocks == 100
    assert isinstance(repin, PinDecision)
    assert repin.reason.rule == "pin:until_median_with_host_copy"
    assert repin.ttl_s == pytest.approx(0.15) and repin.ttl_s < pin.ttl_s
    assert p.gpu_free == 50 - 100  # the pinned blocks are held (once), not free


def test_keeps_without_pressure_and_with_full_host() -> None:
    p = make()
    p.on_event(EngineState(1000, 900), 0.0)
    pin = "pin:kept_through_tool_call"
    assert [d.reason.rule for d in to_tool(p, 100, hint=5.0)] == ["keep:no_pressure", pin]
    p = make(host_blocks=10)
    p.on_event(EngineState(1000, 50, num_waiting=3, waiting_blocks=200), 0.0)
    # no host room for the offload, nor for a copy (it would leave none for offloads)
    full = ["keep:host_full", pin, "keep:host_room_for_offloads"]
    assert [d.reason.rule for d in to_tool(p, 100, hint=5.0)] == full
    # a call predicted to outlast tool_pin_max_s is not pinned: the eviction order decides
    p = make(tool_pin_max_s=3.0)
    p.on_event(EngineState(1000, 900), 0.0)
    assert [d.reason.rule for d in to_tool(p, 100, hint=5.0)] == ["keep:no_pressure"]


def test_predictive_upload_lands_before_predicted_return() -> None:
    p = make()
    p.on_event(EngineState(1000, 50, num_waiting=1, waiting_blocks=10), 0.0)
    to_tool(p, 100, hint=5.0)
    p.on_event(TransferDone("app", "a", "d2h", 100), 1.2)
    p.on_event(EngineState(1000, 400, num_waiting=0), 1.3)
    # a is critical (q10 of a 5 s hint with sigma 0.5 is about 2.6 s): nothing before that
    t = 1.3
    first = None
    while t < 6.0 and first is None:
        t = round(t + 0.05, 3)
        ups = [d for d in p.tick(t) if d.kind == "upload"]
        if ups:
            first = (t, ups)
    assert first is not None
    t_up, ups = first
    assert 1.0 + 2.0 < t_up < 1.0 + 5.0  # after the stall starts, before the median return
    assert all(getattr(u, "priority", None) == PREDICTIVE for u in ups)
    assert ups[0].reason.rule == "predictive_upload"
    # uploads come in pieces of at most upload_piece_blocks
    assert all(u.blocks <= p.config.upload_piece_blocks for u in ups)


def test_early_return_uploads_urgently_and_late_return_stays_on_host() -> None:
    p = make()
    p.on_event(EngineState(1000, 50, num_waiting=1, waiting_blocks=10), 0.0)
    to_tool(p, 100, hint=20.0)
    p.on_event(TransferDone("app", "a", "d2h", 100), 1.2)
    out = p.on_event(ToolCallEnd("app", "a"), 1.5)
    assert out and all(d.kind == "upload" and getattr(d, "priority", None) == URGENT for d in out)
    assert out[0].reason.rule == "urgent_upload:early_return"

    p = make()
    p.on_event(EngineState(1000, 50, num_waiting=5, waiting_blocks=5000), 0.0)  # no room
    to_tool(p, 100, hint=2.0)
    p.on_event(TransferDone("app", "a", "d2h", 100), 1.2)
    rules = [d.reason.rule for t in range(2, 12) for d in p.tick(float(t))]
    assert "keep:late_return_stays_on_host" in rules
    assert p.agent_view("app", "a") is not None
    view = p.agent_view("app", "a")
    assert view is not None and view.host_blocks == 100 and view.state == "tool"


def test_forgotten_tool_call_releases_memory() -> None:
    p = make(deadline_min_s=10, deadline_max_s=10, host_ttl_s=5)
    p.on_event(EngineState(1000, 900), 0.0)  # no pressure: KV stays on the GPU at start
    to_tool(p, 100, hint=1.0)
    rules = []
    for t in range(2, 20):
        for d in p.tick(float(t)):
            rules.append(d.reason.rule)
            if d.kind == "offload":
                p.on_event(TransferDone("app", "a", "d2h", d.blocks), float(t))
    assert "offload:safety_deadline" in rules
    assert "host_ttl_expired" in rules
    view = p.agent_view("app", "a")
    assert view is not None and view.gpu_blocks == 0 and view.host_blocks == 0


def test_app_end_drops_host_copies() -> None:
    p = make()
    p.on_event(EngineState(1000, 50, num_waiting=1, waiting_blocks=10), 0.0)
    to_tool(p, 100, hint=5.0)
    p.on_event(TransferDone("app", "a", "d2h", 100), 1.2)
    out = p.on_event(AppEnd("app"), 2.0)
    assert [(d.kind, d.blocks) for d in out] == [("drop", 100)]
    assert p.host_used == 0 and "app" not in p.apps


def test_events_must_not_go_back_in_time() -> None:
    p = make()
    p.tick(5.0)
    with pytest.raises(EventOrderError):
        p.tick(4.0)


def test_admission_puts_critical_agents_first_and_guard_blocks_inversion() -> None:
    p = make()
    p.on_event(RegisterApp("app", dag()), 0.0)
    p.on_event(EngineState(100, 30, num_waiting=2), 0.0)
    p.on_event(LlmCallStart("app", "b", request_id="rb", blocks=20), 0.0)  # off the critical path
    p.on_event(LlmCallStart("app", "a", request_id="ra", blocks=25), 0.1)  # critical
    waiting = [WaitingRequest("rb", "app", "b", 20, 0.0), WaitingRequest("ra", "app", "a", 25, 0.1)]
    assert [w.request_id for w in p.admission_order(waiting, 0.2)] == ["ra", "rb"]
    ok, why = p.allocation_verdict("app", "b", 20, 0.2)
    assert not ok and why.rule == "deny:critical_inversion"
    assert p.may_allocate("app", "a", 25, 0.2)
    p.on_event(LlmCallAdmitted("app", "a", "ra", kv_blocks=25), 0.3)
    assert p.may_allocate("app", "b", 5, 0.3)  # nothing critical waits any more
    # the ablation without the spatial scheduler is FCFS and never refuses
    t = make("tokencake-temporal")
    t.on_event(RegisterApp("app", dag()), 0.0)
    assert [w.request_id for w in t.admission_order(waiting, 0.2)] == ["rb", "ra"]


def test_older_app_goes_first_and_newer_critical_agents_do_not_block_it() -> None:
    p = make()
    p.on_event(RegisterApp("old", dag()), 0.0)
    p.on_event(RegisterApp("new", dag()), 1.0)
    p.on_event(EngineState(100, 30, num_waiting=2), 1.0)
    p.on_event(LlmCallStart("new", "a", request_id="rn", blocks=25), 1.0)  # critical, newer app
    p.on_event(LlmCallStart("old", "b", request_id="ro", blocks=20), 1.1)  # off the path, older app
    waiting = [WaitingRequest("rn", "new", "a", 25, 1.0), WaitingRequest("ro", "old", "b", 20, 1.1)]
    assert [w.request_id for w in p.admission_order(waiting, 1.2)] == ["ro", "rn"]
    ok, why = p.allocation_verdict("old", "b", 20, 1.2)
    assert ok and why.rule == "allow:nothing_protected"
    # the newer app's own non-critical agent still yields to its critical one
    p.on_event(LlmCallStart("new", "b", request_id="rb", blocks=20), 1.2)
    ok, why = p.allocation_verdict("new", "b", 20, 1.3)
    assert not ok and why.rule == "deny:critical_inversion"


def chain_dag(tool_s: float) -> AppDag:
    """Two 2 s LLM steps around a tool call: a critical path of 4 s + ``tool_s``."""
    return AppDag(
        nodes=[
            DagNode(
                id="a", agent_type="x", expected_llm_s=2.0, expected_tool_s=tool_s, tool_kind="t"
            ),
            DagNode(id="b", agent_type="x", expected_llm_s=2.0),
        ],
        edges=[("a", "b")],
    )


def test_a_long_app_just_after_a_short_one_goes_first_within_its_lead() -> None:
    """The tail guard: an app ranks as if registered half its expected critical path
    earlier, at most TAIL_LEAD_MAX_S (10 s), so a long chain that arrives just after a
    short app starts first; an app older than that lead still goes first, and the ablation
    without the spatial half has none."""
    short = AppDag(nodes=[DagNode(id="a", agent_type="x", expected_llm_s=2.0)], edges=[])
    p = make()
    p.on_event(RegisterApp("short", short), 0.0)  # critical path 2 s: ranks at -1
    p.on_event(RegisterApp("long", chain_dag(14.0)), 5.0)  # 18 s: lead 9, ranks at -4
    p.on_event(RegisterApp("huge", chain_dag(96.0)), 9.5)  # 100 s: lead capped at 10: -0.5
    p.on_event(RegisterApp("late", chain_dag(14.0)), 12.0)  # ranks at 3: behind them all
    waiting = [
        WaitingRequest(f"r{app}", app, "a", 10, t)
        for app, t in (("short", 0.0), ("long", 5.0), ("huge", 9.5), ("late", 12.0))
    ]
    for w in waiting:
        p.on_event(LlmCallStart(w.app_id, "a", request_id=w.request_id, blocks=10), 12.0)
    order = [w.app_id for w in p.admission_order(waiting, 12.0)]
    assert order == ["long", "short", "huge", "late"]
    view = p.agent_view("long", "a")
    assert view is not None and view.app_lead_s == pytest.approx(9.0)
    assert view.app_registered_s == 5.0
    assert p.agent_view("huge", "a").app_lead_s == pytest.approx(10.0)  # type: ignore[union-attr]
    t = make("tokencake-temporal")
    t.on_event(RegisterApp("long", chain_dag(14.0)), 5.0)
    t.on_event(LlmCallStart("long", "a", request_id="rl", blocks=10), 5.0)
    assert t.agent_view("long", "a").app_lead_s == 0.0  # type: ignore[union-attr]


def test_kept_kv_is_offloaded_once_waiting_demand_appears() -> None:
    p = make()
    p.on_event(EngineState(1000, 900), 0.0)
    rules = [d.reason.rule for d in to_tool(p, 100, hint=10.0)]
    assert rules == ["keep:no_pressure", "pin:kept_through_tool_call"]
    view = p.agent_view("app", "a")
    assert view is not None and view.protect_blocks == 0  # pinned: held, not counted free
    # a request arrives that the pool cannot serve without this KV's memory
    out = p.on_event(EngineState(1000, 150, num_waiting=1, waiting_blocks=200), 3.0)
    assert [d.kind for d in out if d.kind != "partition"] == ["offload"]  # ends the pin
    offload = [d for d in out if d.kind == "offload"]
    assert len(offload) == 1 and offload[0].blocks == 100
    assert offload[0].reason.terms["trigger"] == "waiting_demand"
    # the stall left (q10 of 10 s, less the 2 s gone) is what was weighed
    stall = offload[0].reason.terms["stall_quantile_s"]
    assert isinstance(stall, float) and stall < 10.0 - 2.0
    assert not [
        d for d in p.on_event(EngineState(1000, 40, 1, 0, 200), 3.1) if d.kind != "partition"
    ]
    p.on_event(TransferDone("app", "a", "d2h", 100), 3.5)
    view = p.agent_view("app", "a")
    assert view is not None and view.protect_blocks == 0  # parked on the host: not protected
    assert p.gpu_free >= 140


def test_guard_keeps_a_critical_agents_kv_through_its_tool_call() -> None:
    p = make("tokencake-spatial")  # KV stays on the GPU: the guard alone
    to_tool(p, blocks=12, hint=60.0)  # critical "a" leaves 12 blocks cached, calls a tool
    p.on_event(EngineState(100, 30), 1.0)
    view = p.agent_view("app", "a")
    assert view is not None and view.state == "tool" and view.protect_blocks == 12
    assert view.app_registered_s == 0.0
    ok, why = p.allocation_verdict("app", "b", 19, 1.1)  # 30 - 19 = 11 < 12
    assert not ok and why.rule == "deny:critical_inversion"
    assert why.terms["protected_for_critical"] == 12
    assert p.may_allocate("app", "b", 18, 1.1)
    # a request of an unknown agent of this app ranks behind it
    assert p.may_allocate("app", "zz", 18, 1.1) and not p.may_allocate("app", "zz", 19, 1.1)
    p.on_event(ToolCallEnd("app", "a"), 2.0)
    assert p.agent_view("app", "a").protect_blocks == 0  # type: ignore[union-attr]
    assert p.may_allocate("app", "b", 30, 2.0)


def test_guard_never_holds_back_more_than_the_cap() -> None:
    p = make("tokencake-spatial", max_reserve_fraction=0.1)
    to_tool(p, blocks=40, hint=60.0)
    p.on_event(EngineState(100, 30), 1.0)
    ok, why = p.allocation_verdict("app", "b", 20, 1.1)  # 30 - 20 >= 10 (the cap)
    assert ok and why.terms["protected_for_critical"] == 10
    assert not p.may_allocate("app", "b", 21, 1.1)


def test_priority_terms_are_reported() -> None:
    p = make()
    p.on_event(RegisterApp("app", dag()), 0.0)
    p.on_event(LlmCallStart("app", "b", request_id="rb", blocks=1), 0.0)
    agent = p._agent("app", "b", create=False)
    assert agent is not None
    score, terms = p.priority(agent, 10.0)
    assert set(terms) >= {"crit", "remaining", "fanout", "join", "wait", "preempt", "progress"}
    wait = terms["wait"]
    assert isinstance(wait, float) and wait > 0 and score > 1.0


def test_eviction_prefers_kv_whose_next_use_is_far() -> None:
    p = make()
    p.on_event(EngineState(1000, 900), 0.0)  # no pressure: no offload, KV stays cached
    to_tool(p, 100, hint=30.0)
    p.on_event(LlmCallStart("app", "b", request_id="rb", blocks=10), 1.0)
    p.on_event(LlmCallAdmitted("app", "b", "rb", kv_blocks=10), 1.0)
    p.on_event(LlmCallFinish("app", "b", "rb", kv_blocks=10), 2.0)  # b feeds c soon
    cands = [CachedKv("app", "b", 10, 2.0), CachedKv("app", "a", 100, 1.0)]
    order = p.eviction_order(cands, 2.5)
    assert [c.agent_id for c in order] == ["a", "b"]


def test_eviction_follows_the_consumer_and_the_app_order() -> None:
    p = make()
    p.on_event(EngineState(1000, 900), 0.0)
    p.on_event(RegisterApp("old", dag()), 0.0)
    p.on_event(RegisterApp("new", dag()), 1.0)
    for app in ("old", "new"):
        p.on_event(LlmCallStart(app, "b", request_id=f"{app}b", blocks=10), 1.0)
        p.on_event(LlmCallAdmitted(app, "b", f"{app}b", kv_blocks=10), 1.0)
    for app in ("old", "new"):
        p.on_event(LlmCallFinish(app, "b", f"{app}b", kv_blocks=10), 2.0)
    cands = [CachedKv("old", "b", 10, 2.0), CachedKv("new", "b", 10, 2.0)]
    assert [c.app_id for c in p.eviction_order(cands, 2.5)] == ["new", "old"]
    # old/b's consumer c ran: nobody reads what is left under b's name, it goes first
    p.on_event(LlmCallStart("old", "c", request_id="oldc", blocks=12), 3.0)
    p.on_event(LlmCallAdmitted("old", "c", "oldc", kv_blocks=12), 3.0)
    p.on_event(LlmCallFinish("old", "c", "oldc", kv_blocks=12), 4.0)
    assert [c.app_id for c in p.eviction_order(cands, 4.5)] == ["old", "new"]


def test_partition_follows_critical_demand() -> None:
    p = make(partition_interval_s=0.5)
    p.on_event(RegisterApp("app", dag()), 0.0)
    p.on_event(LlmCallStart("app", "a", request_id="ra", blocks=300), 0.0)
    out = p.on_event(EngineState(1000, 100, num_waiting=1), 1.0)
    parts = [d for d in out if isinstance(d, PartitionDecision)]
    assert len(parts) == 1
    assert parts[0].reservations == {"coder": 300}
    assert parts[0].shared_blocks == 700
