from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import DaemonProcess
from tokencake import protocol as p
from tokencake.clients.client import AppSession, DaemonUnavailable, TokenCakeClient

DAG = p.AppDag(nodes=[p.DagNode("planner"), p.DagNode("coder")], edges=[("planner", "coder")])


def test_session_reports_calls(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        with AppSession(c, "s1", DAG) as app:
            planner = app.agent("planner")
            with planner.llm_call(prompt_tokens=100) as call:
                call.output_tokens, call.kv_blocks = 20, 4
            with planner.tool_call("search", predicted_s=1.0):
                states = {a.agent_id: a.state for a in c.call(p.ListAgents("s1")).agents}
                assert states["planner"] == "tool"
            with pytest.raises(RuntimeError), planner.tool_call("search"):
                raise RuntimeError("tool failed")
            assert {a.agent_id: a.kv_blocks for a in c.call(p.ListAgents("s1")).agents}[
                "planner"
            ] == 4
            with pytest.raises(KeyError):
                app.agent("ghost")
        assert c.call(p.Stats()).apps == 0
        events = c.call(p.Stats()).events
        assert events["tool_call_end"] == 2 and events["app_end"] == 1


def test_session_survives_a_missing_daemon(tmp_path: Path) -> None:
    with TokenCakeClient(f"ipc://{tmp_path}/none.sock", timeout_s=0.05) as c:
        app = AppSession(c, "s2", DAG)
        with app.agent("planner").tool_call("search"):
            pass
        app.end()
        assert app.missed_events == 4
        with pytest.raises(DaemonUnavailable):
            AppSession(c, "s3", DAG, strict=True)


def test_session_raises_daemon_refusals(daemon: DaemonProcess) -> None:
    bad = p.AppDag(nodes=[p.DagNode("a"), p.DagNode("a")])
    with daemon.client() as c, pytest.raises(p.RemoteError):
        AppSession(c, "s4", bad)


def test_session_re_registers_after_a_daemon_restart(tmp_path: Path) -> None:
    from tests.conftest import start_daemon

    d = start_daemon(tmp_path)
    with TokenCakeClient(d.endpoint, timeout_s=2.0) as c:
        app = AppSession(c, "s5", DAG, strict=True)
        d.stop()
        d2 = start_daemon(tmp_path, endpoint=d.endpoint)
        try:
            with app.agent("planner").tool_call("search", predicted_s=1.0):
                pass
            assert app.reregistrations == 1
            assert [a.app_id for a in c.call(p.ListApps()).apps] == ["s5"]
        finally:
            d2.stop()
