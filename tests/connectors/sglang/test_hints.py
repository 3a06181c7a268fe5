"""Agent metadata on SGLang requests (TokenCake keys, SGLang's proposed agent_hints,
sessions) and the daemon events it stands for, against a real tokencaked."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from bench.common import sglang_env
from tests.procs import Proc
from tokencake import protocol as p
from tokencake.clients.client import AppSession
from tokencake.connectors.sglang import AgentEventReporter, agent_call, strip_hints

PAGE = 4


def test_agent_hints_map_onto_tokencake_params() -> None:
    call = agent_call(
        {
            "text": "hi",
            "rid": "r-9",
            "agent_hints": {
                "workflow_id": "wf-1",
                "agent_id": "coder",
                "step_id": "s3",
                "parent_step_id": "s2",
                "expected_tool_duration_ms": 8000,
                "cache_ttl_ms": 60000,
                "reuse_hint": "keep",
            },
        }
    )
    assert call is not None and call.source == "agent_hints"
    assert (call.params.app_id, call.params.agent_id, call.request_id) == ("wf-1", "coder", "s3")
    assert call.params.tool is not None and call.params.tool.predicted_s == 8.0
    assert (call.parent_step_id, call.cache_ttl_ms, call.reuse_hint) == ("s2", 60000.0, "keep")


def test_tokencake_keys_win_and_sessions_name_agents() -> None:
    both = agent_call(
        {
            "tokencake": {"app_id": "a", "agent_id": "x", "tool": {"kind": "pytest"}},
            "agent_hints": {"workflow_id": "b", "agent_id": "y"},
        }
    )
    assert both is not None and both.source == "tokencake"
    assert (both.params.app_id, both.params.agent_id) == ("a", "x")
    assert both.params.tool is not None and both.params.tool.kind == "pytest"

    nv = agent_call(
        {"session_params": {"id": "sess-7"}, "nvext": {"agent_hints": {"workflow_id": "w"}}}
    )
    assert nv is not None and nv.params.agent_id == "sess-7" and nv.params.tool is None


def test_malformed_or_absent_metadata_is_ignored() -> None:
    assert agent_call({"text": "plain"}) is None
    assert agent_call({"agent_hints": {"agent_id": "x"}}) is None  # no workflow
    assert agent_call({"agent_hints": {"workflow_id": "w"}}) is None  # no agent, no session
    bad_ms = {"workflow_id": "w", "agent_id": "x", "expected_tool_duration_ms": -1}
    assert agent_call({"agent_hints": bad_ms}) is None
    assert agent_call({"agent_hints": "w/x"}) is None
    assert agent_call({"tokencake": {"app_id": "a"}}) is None


def test_strip_hints_leaves_what_sglang_reads() -> None:
    body = {
        "text": "hi",
        "tokencake": {},
        "agent_hints": {},
        "nvext": {"agent_hints": {}, "other": 1},
        "session_params": {"id": "s"},
    }
    assert strip_hints(body) == {"text": "hi", "nvext": {"other": 1}, "session_params": {"id": "s"}}
    assert strip_hints({"nvext": {"agent_hints": {}}}) == {}


def agent_state(daemon: Proc, app_id: str, agent_id: str) -> str:
    with daemon.client() as client:
        agents = client.call(p.ListAgents(app_id)).agents
    return next(a.state for a in agents if a.agent_id == agent_id)


def test_reporter_drives_the_agent_through_llm_and_tool_calls(daemon: Proc) -> None:
    with daemon.client() as client:
        reporter = AgentEventReporter(client)
        hints = {"workflow_id": "wf-r", "agent_id": "coder", "expected_tool_duration_ms": 4000}
        with reporter.request({"agent_hints": {**hints, "step_id": "s1"}}) as call:
            assert call is not None
            assert agent_state(daemon, "wf-r/coder", "coder") == "waiting"
            call.output_tokens = 12
        assert agent_state(daemon, "wf-r/coder", "coder") == "tool"
        with daemon.client() as peek:
            tool = next(a for a in peek.call(p.ListAgents("wf-r/coder")).agents)
        assert tool.tool_kind == "tool" and tool.tool_predicted_s == 4.0
        # The agent's next request means its tool returned.
        with reporter.request({"agent_hints": {"workflow_id": "wf-r", "agent_id": "coder"}}):
            assert agent_state(daemon, "wf-r/coder", "coder") == "waiting"
        assert agent_state(daemon, "wf-r/coder", "coder") == "idle"
        reporter.close()
        with pytest.raises(p.RemoteError, match="no live app"):
            agent_state(daemon, "wf-r/coder", "coder")
        assert all(app.missed_events == 0 for app in reporter.apps.values())


def test_declared_dags_and_the_session_helper(daemon: Proc) -> None:
    dag = p.AppDag(
        nodes=[p.DagNode(id="planner"), p.DagNode(id="coder")], edges=[("planner", "coder")]
    )
    with daemon.client() as client:
        # The app declares its DAG with the session helper, unchanged ...
        with AppSession(client, "wf-d", dag) as app, app.agent("planner").llm_call():
            assert agent_state(daemon, "wf-d", "planner") == "waiting"
        # ... or lets the reporter declare it: both agents land in one app.
        reporter = AgentEventReporter(client, dags={"wf-e": dag})
        for agent in ("planner", "coder"):
            with reporter.request({"agent_hints": {"workflow_id": "wf-e", "agent_id": agent}}):
                pass
        assert {agent_state(daemon, "wf-e", a) for a in ("planner", "coder")} == {"idle"}
        reporter.close()


def test_reporter_with_the_daemon_down(tmp_path: Any) -> None:
    from tokencake.clients.client import TokenCakeClient

    with TokenCakeClient(f"ipc://{tmp_path}/none.sock", timeout_s=0.05) as client:
        reporter = AgentEventReporter(client)
        body = {
            "agent_hints": {"workflow_id": "w", "agent_id": "a", "expected_tool_duration_ms": 1}
        }
        with reporter.request(body) as call:
            assert call is not None
        assert sum(app.missed_events for app in reporter.apps.values()) == 4


def test_a_stalled_agents_pages_come_back_from_the_daemon(daemon: Proc, make_backend: Any) -> None:
    """The temporal path in SGLang terms: the agent's pages are written through to the
    daemon while it runs, its tool call starts, SGLang drops the pages from its own host
    tier, and the agent's next call prefetches them back (batch_exists + batch_get_v1)."""
    import torch

    pool = sglang_env.host_pool()
    backend = make_backend(pool)
    ks = [hashlib.sha256(f"agent-page{i}".encode()).hexdigest() for i in range(4)]
    idx = pool.alloc(4 * PAGE)
    gen = torch.Generator().manual_seed(7)
    for i in idx[::PAGE].tolist():
        page = pool.get_data_page(i, flat=True)
        pool.set_from_flat_data_page(i, torch.randn(page.numel(), generator=gen).to(page.dtype))
    before = [pool.get_data_page(i, flat=True).clone() for i in idx[::PAGE].tolist()]

    with daemon.client() as client:
        reporter = AgentEventReporter(client)
        hints = {"workflow_id": "wf-t", "agent_id": "a", "expected_tool_duration_ms": 2000}
        with reporter.request({"agent_hints": hints}):
            assert backend.batch_set_v1(ks, idx) == [True] * 4  # SGLang's write-through
        assert agent_state(daemon, "wf-t/a", "a") == "tool"
        pool.free(idx)  # SGLang evicts the agent's pages from its host tier
        with reporter.request({"agent_hints": {"workflow_id": "wf-t", "agent_id": "a"}}):
            assert backend.batch_exists(ks) == 4
            back = pool.alloc(4 * PAGE)
            pool.kv_buffer.zero_()
            assert backend.batch_get_v1(ks, back) == [True] * 4
        reporter.close()
    after = [pool.get_data_page(i, flat=True) for i in back[::PAGE].tolist()]
    assert all(torch.equal(a, b) for a, b in zip(after, before, strict=True))
