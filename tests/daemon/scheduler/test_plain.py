"""Plain traffic (requests of no application the policy knows): ranked as an app registered
``PLAIN_HEAD_START_S`` before the request, in the admission order and in the guard."""

from __future__ import annotations

from tests.daemon.scheduler.test_agent_aware import dag, make
from tokencake.daemon.scheduler import (
    EngineState,
    WaitingRequest,
)
from tokencake.daemon.scheduler.agent_aware import TokenCakePolicy
from tokencake.guard import PLAIN_HEAD_START_S, plain_rank
from tokencake.protocol import (
    LlmCallStart,
    RegisterApp,
)

H = PLAIN_HEAD_START_S


def _app_waiting(registered: float, start: float) -> TokenCakePolicy:
    p = make("tokencake-spatial")
    p.on_event(RegisterApp("app", dag()), registered)
    p.on_event(LlmCallStart("app", "a", request_id="ra", blocks=12), start)  # critical "a" waits
    p.on_event(EngineState(100, 30), start)
    return p


def test_plain_goes_ahead_of_apps_younger_than_the_head_start() -> None:
    p = _app_waiting(0.0, 10.0)
    agent = WaitingRequest("ra", "app", "a", 12, 10.0)
    plain = WaitingRequest("q1", "plain-1", "request", 5, 12.0)
    assert [w.request_id for w in p.admission_order([agent, plain], 12.0)] == ["q1", "ra"]
    late = WaitingRequest("q2", "plain-2", "request", 5, H + 1.0)
    order = p.admission_order([late, agent, plain], H + 1.0)
    assert [w.request_id for w in order] == ["q1", "ra", "q2"]  # the app is older than H
    assert plain_rank(12.0) == 12.0 - H


def test_the_guard_holds_plain_traffic_back_only_for_older_apps() -> None:
    young = _app_waiting(0.0, 10.0)
    ok, why = young.allocation_verdict("plain-1", "request", 19, 12.0)  # 30 - 19 < 12
    assert ok and why.rule == "allow:nothing_protected"
    assert not young.may_allocate("app", "b", 19, 12.0)  # a non-critical agent of the app is
    old = _app_waiting(0.0, H + 10.0)
    ok, why = old.allocation_verdict("plain-2", "request", 19, H + 12.0)
    assert not ok and why.rule == "deny:critical_inversion"
    assert old.may_allocate("plain-2", "request", 18, H + 12.0)
