"""The client library against a real daemon: async client, timeouts, reconnect, pushes."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import zmq

from tests.conftest import DaemonProcess, start_daemon
from tokencake import protocol as p
from tokencake.clients.client import AsyncTokenCakeClient, DaemonUnavailable, TokenCakeClient
from tokencake.layout import KvLayout

LAYOUT = KvLayout("m", 1, 32, 1, 32, "float16", 4096)


def test_no_daemon_fails_fast(tmp_path: Path) -> None:
    with TokenCakeClient(f"ipc://{tmp_path}/nobody.sock", timeout_s=0.05) as c:
        t0 = time.monotonic()
        with pytest.raises(DaemonUnavailable, match=r"nobody\.sock"):
            c.call(p.Ping())
        assert time.monotonic() - t0 < 0.5


def test_silent_peer_times_out_and_late_replies_are_not_mistaken(tmp_path: Path) -> None:
    """A peer that accepts but answers late: the reply to the timed-out request is dropped."""
    endpoint = f"ipc://{tmp_path}/slow.sock"
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    server = ctx.socket(zmq.ROUTER)
    server.bind(endpoint)
    try:
        with TokenCakeClient(endpoint, timeout_s=0.1) as c:
            with pytest.raises(DaemonUnavailable, match="no reply"):
                c.call(p.Ping())
            ident, _frame = server.recv_multipart()
            server.send_multipart([ident, p.encode_reply("ping", 1, p.PingReply("x", 1, 0.0))])
            # The next request must not take the stale reply for its own.
            with pytest.raises(DaemonUnavailable):
                c.call(p.Ping())
    finally:
        server.close(linger=0)


def test_client_reconnects_after_daemon_restart(tmp_path: Path) -> None:
    d = start_daemon(tmp_path)
    with TokenCakeClient(d.endpoint, timeout_s=2.0) as c:
        assert c.call(p.Ping()).uptime_s >= 0
        d.stop()
        with pytest.raises(DaemonUnavailable):
            c.call(p.Ping())
        d2 = start_daemon(tmp_path, endpoint=d.endpoint)
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    assert c.call(p.Ping()).uptime_s < 30
                    break
                except DaemonUnavailable:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
        finally:
            d2.stop()


def test_async_client_many_in_flight(daemon: DaemonProcess) -> None:
    async def go() -> None:
        async with AsyncTokenCakeClient(daemon.endpoint, timeout_s=5) as c:
            eid = (await c.call(p.RegisterEngine("e", LAYOUT))).engine_id
            replies = await asyncio.gather(*(c.call(p.Ping()) for _ in range(50)))
            assert len(replies) == 50
            slots = (await c.call(p.Reserve(eid, [b"a", b"b"]))).slots
            assert (await c.call(p.Commit(eid, slots))).committed == 2
            assert (await c.call(p.Lookup(eid, [b"a", b"b"]))).hit_blocks == 2
            with pytest.raises(p.RemoteError) as info:
                await c.call(p.Commit(eid, slots))
            assert info.value.code == p.ErrorCode.NOT_OWNER

    asyncio.run(go())


def test_decisions_are_pushed_to_the_registering_engine(daemon: DaemonProcess) -> None:
    """Under memory pressure, a long tool call gets an offload pushed to the engine."""
    with daemon.client() as engine, daemon.client() as app:
        eid = engine.call(p.RegisterEngine("e", LAYOUT, num_gpu_blocks=100)).engine_id
        dag = p.AppDag(nodes=[p.DagNode("slow", expected_tool_s=30.0)])
        app.call(p.RegisterApp("push-app", dag))
        app.call(p.LlmCallStart("push-app", "slow", eid, "r1", prompt_tokens=1600))
        app.call(p.LlmCallFinish("push-app", "slow", "r1", output_tokens=10, kv_blocks=50))
        engine.call(p.EngineHeartbeat(eid, num_gpu_blocks_free=5, num_waiting=4, num_running=2))
        app.call(p.ToolCallStart("push-app", "slow", "tests", predicted_s=30.0, call_id="t"))
        pushes = engine.poll_pushes(timeout_s=2.0)
        offloads = [d for d in pushes if d.kind == "offload"]
        assert offloads, pushes
        assert offloads[0].agent_id == "slow" and offloads[0].blocks == 50
        assert offloads[0].reason.rule.startswith("offload")
        assert app.poll_pushes() == []  # only the engine gets pushes
        recorded = app.call(p.ListDecisions(agent_id="slow")).decisions
        assert any(d.kind == "offload" for d in recorded)
