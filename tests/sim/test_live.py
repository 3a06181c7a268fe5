"""Live mode: the simulator's engine replaying workloads against a real ``tokencaked``.

Every test runs a daemon process (``tests.procs``) and talks to it over its socket. The
workload is the fidelity bench's shape on the ``tiny-llama-cpu`` profile (39 GPU blocks):
four ``a -> b`` agent chains whose ``a`` ends in a 4 s ``search`` tool, and plain 500-token
requests arriving while the tools run, which evict whatever the agents left on the GPU.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.conftest import start_daemon
from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.sim.cli import main
from tokencake.sim.live import DaemonLost, DaemonPolicy, LiveResult, run_live
from tokencake.sim.profiles import get_profile
from tokencake.sim.workload import AppSpec, NodeSpec, SegmentIds, ToolSpec, Trace, compose

PROFILE = get_profile("tiny-llama-cpu")
AGENTS = 4
FILLER_AT = (0.5, 1.0, 1.5, 2.0, 2.5)


def agent_trace(tool_s: float = 4.0, fillers: tuple[float, ...] = FILLER_AT) -> Trace:
    ids = SegmentIds()
    apps: list[AppSpec] = []
    for a in range(AGENTS):
        tool = ToolSpec("search", tool_s, 40, predicted_s=tool_s)
        nodes = [
            NodeSpec("a", "agent", output_tokens=8, tool=tool),
            NodeSpec("b", "agent", predecessors=("a",), output_tokens=8),
        ]
        apps.append(AppSpec(f"app-{a}", "live", nodes, 150, arrival_s=0.0))
    for f, at in enumerate(fillers):
        nodes = [NodeSpec("f", "filler", output_tokens=4)]
        apps.append(AppSpec(f"filler-{f}", "live", nodes, 500, arrival_s=at, plain=True))
    for app in apps:
        compose(app, ids)
    return Trace("live", 0, 0.0, apps)


def _run(tmp_path: Path, policy: str) -> tuple[LiveResult, Trace, Any, Any, list[Any]]:
    d = start_daemon(tmp_path, "--policy", policy)
    try:
        trace = agent_trace()
        live = run_live(trace, PROFILE, d.endpoint, scale=0.05, app_prefix="t-")
        with d.client() as client:
            apps = {a.app_id: a for a in client.call(p.ListApps()).apps}
            stats = client.call(p.Stats())
            decisions = client.call(p.ListDecisions(limit=1000)).decisions
            assert client.call(p.ListEngines()).engines == []  # unregistered at the end
    finally:
        d.stop()
    return live, trace, apps, stats, decisions


def test_replay_drives_the_daemon(tmp_path: Path) -> None:
    live, trace, apps, stats, _ = _run(tmp_path, "tokencake")
    # Every application finished, the plain ones included.
    assert len(live.result.app_latency_s) == len(trace.apps)
    assert live.daemon_policy == "tokencake"
    # The daemon heard of every agent app (never of the plain traffic), and all ended.
    assert set(apps) == {f"t-app-{a}" for a in range(AGENTS)}
    assert all(a.state == "ended" for a in apps.values())
    assert all(set(a.node_states) == {"a", "b"} for a in apps.values())
    ev = stats.events
    assert ev["register_app"] == AGENTS and ev["app_end"] == AGENTS
    assert ev["llm_call_start"] == 2 * AGENTS and ev["llm_call_finish"] == 2 * AGENTS
    assert ev["llm_call_admitted"] >= 2 * AGENTS
    assert ev["tool_call_start"] == AGENTS and ev["tool_call_end"] == AGENTS
    assert ev["engine_heartbeat"] == live.stats.heartbeats > 0
    # Admission order and the guard come from the daemon's list_agents.
    assert ev["list_agents"] > 0 and live.stats.refreshes > 0
    assert live.stats.events_refused == 0 and live.stats.events_not_accepted == 0


def test_daemon_decisions_are_carried_out_and_confirmed(tmp_path: Path) -> None:
    """InferCept's daemon policy swaps every tool call's KV out and back (tokencake's own
    choice on this 39-block pool depends on the pressure it sees at that instant)."""
    live, trace, _, stats, decisions = _run(tmp_path, "infercept")
    assert len(live.result.app_latency_s) == len(trace.apps)
    kinds = [x.kind for x in decisions]
    assert kinds.count("offload") == AGENTS and kinds.count("upload") >= 1
    # Carried out by the engine...
    c = live.result.counters
    assert c.decisions.get("offload", 0) == AGENTS and c.decisions.get("upload", 0) >= 1
    assert c.offload_blocks > 0 and c.upload_blocks > 0
    # ...and confirmed to the daemon through host-slot ops, as the connector does.
    ev = stats.events
    assert ev["reserve"] >= 1 and ev["commit"] >= 1
    assert ev["load_begin"] >= 1 and ev["load_end"] >= 1
    assert live.stats.slots_committed > 0 and live.stats.slots_loaded > 0
    assert stats.bytes_offloaded > 0 and stats.bytes_uploaded > 0
    pushed = ("offload", "upload", "drop", "pin", "unpin")
    assert live.stats.pushes == {k: kinds.count(k) for k in set(kinds) if k in pushed}


def test_daemon_death_mid_run_is_a_typed_error(tmp_path: Path) -> None:
    d = start_daemon(tmp_path, "--policy", "tokencake")
    # A 20 s tool at scale 0.25: the replay needs about 5 s of wall time; kill at 0.5 s.
    killer = threading.Timer(0.5, d.kill9)
    killer.start()
    try:
        with pytest.raises(DaemonLost, match="stopped answering"):
            run_live(agent_trace(tool_s=20.0), PROFILE, d.endpoint, scale=0.25, timeout_s=1.0)
    finally:
        killer.cancel()
        d.stop()


def test_no_daemon_is_a_typed_error(tmp_path: Path) -> None:
    endpoint = f"ipc://{tmp_path}/none.sock"
    with TokenCakeClient(endpoint, timeout_s=0.3) as client, pytest.raises(DaemonLost):
        DaemonPolicy(client, PROFILE, scale=0.05)


def test_cli_live_embedded_writes_live_records(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", "--workload", "code-writer", "--qps", "1", "--apps", "1", "--no-plots"]
    res = CliRunner().invoke(
        main,
        [*args, "--out", str(out), "--live-embedded", "--time-scale", "0.02"],
    )
    assert res.exit_code == 0, res.output
    (rec,) = json.loads((out / "results.json").read_text())["records"]
    assert rec["mode"] == "live" and rec["time_scale"] == 0.02
    assert rec["policy"] == "tokencake" and rec["engine_policy"] == "live:tokencake"
    assert rec["completed_apps"] == 1 and rec["error"] is None
    assert rec["live"]["events_sent"] > 0


def test_cli_live_rejects_several_policies(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        main,
        [
            "run",
            "--out",
            str(tmp_path),
            "--live-embedded",
            "--policies",
            "tokencake,vllm",
        ],
    )
    assert res.exit_code == 2
    assert "live mode runs one policy" in res.output
