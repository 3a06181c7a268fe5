from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from tests.conftest import DaemonProcess
from tokencake import protocol as p
from tokencake.clients.ctl import EXIT_UNAVAILABLE, main
from tokencake.layout import KvLayout


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output


def test_every_command_text_and_json(daemon: DaemonProcess) -> None:
    with daemon.client() as c:
        eid = c.call(p.RegisterEngine("e", KvLayout("m", 1, 32, 1, 32, "float16", 4096))).engine_id
        dag = p.AppDag(
            nodes=[p.DagNode("a", expected_tool_s=3.0), p.DagNode("b")], edges=[("a", "b")]
        )
        c.call(p.RegisterApp("ctl-app", dag))
        c.call(p.LlmCallStart("ctl-app", "a", eid))
    ep = ("--endpoint", daemon.endpoint)
    for cmd in ("status", "engines", "agents", "apps", "pool", "config", "decisions"):
        code, out = run(*ep, cmd)
        assert code == 0, out
        code, out = run(*ep, cmd, "--json")
        assert code == 0, out
        json.loads(out)
    code, out = run(*ep, "apps")
    assert "ctl-app" in out and "a->b" in out
    code, out = run(*ep, "agents", "--json")
    agents = json.loads(out)["agents"]
    assert {a["agent_id"]: a["state"] for a in agents} == {"a": "waiting", "b": "idle"}
    code, out = run(*ep, "top", "--iterations", "1", "--interval", "0", "--json")
    assert code == 0
    code, out = run(*ep, "agents", "--app", "nope")
    assert code != 0 and "unknown_app" in out


def test_daemon_down_is_one_line_and_nonzero(tmp_path: Path) -> None:
    code, out = run("--endpoint", f"ipc://{tmp_path}/gone.sock", "--timeout", "0.1", "status")
    assert code == EXIT_UNAVAILABLE
    assert out.strip().count("\n") == 0 and "gone.sock" in out


def test_no_socket_file_fails_without_waiting(tmp_path: Path) -> None:
    """With no socket file there is no daemon: said at once, not after --timeout (the
    client's message for a timeout is "not reachable", this one only comes from the check)."""
    code, out = run("--endpoint", f"ipc://{tmp_path}/gone.sock", "--timeout", "60", "status")
    assert code == EXIT_UNAVAILABLE
    assert out.strip() == f"tokencake-ctl: daemon not running: no socket at {tmp_path}/gone.sock"


def test_status_counts_agree_with_agents(daemon: DaemonProcess) -> None:
    """`agents` lists ended apps' agents (state done); `status` counts them apart."""
    dag = p.AppDag(nodes=[p.DagNode("planner"), p.DagNode("coder")], edges=[("planner", "coder")])
    with daemon.client() as c:
        c.call(p.RegisterApp("app-ended", dag))
        c.call(p.AppEnd("app-ended"))
        c.call(p.RegisterApp("app-live", dag))
    ep = ("--endpoint", daemon.endpoint)
    code, out = run(*ep, "agents", "--json")
    states = {(a["app_id"], a["state"]) for a in json.loads(out)["agents"]}
    assert ("app-ended", "done") in states and len(json.loads(out)["agents"]) == 4
    code, out = run(*ep, "status")
    assert code == 0, out
    assert "apps          1 live, 1 ended (kept for `agents` and `apps`)" in out
    assert "agents        2 in live apps, 2 in ended apps" in out
    code, out = run(*ep, "status", "--json")
    assert (json.loads(out)["apps"], json.loads(out)["agents"]) == (1, 2)


def test_policies_without_daemon() -> None:
    code, out = run("policies", "--json")
    assert code == 0
    names = {p["name"] for p in json.loads(out)}
    assert {"tokencake", "vllm", "lru-offload", "infercept", "continuum", "kvflow"} <= names
