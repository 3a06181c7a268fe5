"""Every op of the protocol against a real tokencaked subprocess, good and bad inputs."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import zmq

from tests.conftest import DaemonProcess
from tokencake import PROTOCOL_VERSION
from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.layout import KvLayout
from tokencake.protocol import ErrorCode, RemoteError

LAYOUT = KvLayout("tiny-llama", 2, 32, 2, 32, "float32", 2 * 2 * 32 * 2 * 32 * 4)
DAG = p.AppDag(
    nodes=[
        p.DagNode("plan", agent_type="planner", importance=2.0, expected_tool_s=4.0),
        p.DagNode("code", agent_type="coder"),
        p.DagNode("test", agent_type="tester"),
    ],
    edges=[("plan", "code"), ("code", "test")],
)


def snapshot(c: TokenCakeClient) -> dict[str, Any]:
    """Everything a failed request must leave unchanged (counters of requests excluded)."""
    stats = msgspec.to_builtins(c.call(p.Stats()))
    for key in ("uptime_s", "events", "errors"):
        stats.pop(key)
    return {
        "stats": stats,
        "pool": msgspec.to_builtins(c.call(p.Pool())),
        "apps": [
            {k: v for k, v in a.items() if k != "age_s"}
            for a in msgspec.to_builtins(c.call(p.ListApps()))["apps"]
        ],
        "agents": [
            {k: v for k, v in a.items() if k != "state_for_s"}
            for a in msgspec.to_builtins(c.call(p.ListAgents()))["agents"]
        ],
        "engines": [
            {k: v for k, v in e.items() if k != "last_seen_s_ago"}
            for e in msgspec.to_builtins(c.call(p.ListEngines()))["engines"]
        ],
    }


def expect_error(code: str, fn: Any, *args: Any, **kwargs: Any) -> None:
    with pytest.raises(RemoteError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, info.value


@pytest.fixture
def client(daemon: DaemonProcess) -> Any:
    with daemon.client() as c:
        yield c


@pytest.fixture
def engine_id(client: TokenCakeClient) -> str:
    return client.call(p.RegisterEngine("eng", LAYOUT, num_gpu_blocks=64)).engine_id


def test_ping(client: TokenCakeClient) -> None:
    reply = client.call(p.Ping())
    assert reply.protocol_version == PROTOCOL_VERSION
    assert reply.uptime_s >= 0


def test_register_engine_returns_arena_and_fingerprint(client: TokenCakeClient) -> None:
    reply = client.call(p.RegisterEngine("eng", LAYOUT, num_gpu_blocks=64))
    assert reply.fingerprint == LAYOUT.fingerprint()
    assert reply.slot_bytes == LAYOUT.bytes_per_block
    assert reply.slot_offset == 2048
    assert reply.num_slots == ((16 << 20) - 2048) // LAYOUT.bytes_per_block
    assert reply.arena_bytes == 16 << 20
    # Re-registering the same name replaces the old registration.
    again = client.call(p.RegisterEngine("eng", LAYOUT, num_gpu_blocks=64))
    assert again.engine_id != reply.engine_id
    expect_error(ErrorCode.UNKNOWN_ENGINE, client.call, p.Lookup(reply.engine_id, [b"x"]))
    assert [e.engine_id for e in client.call(p.ListEngines()).engines] == [again.engine_id]


def test_register_engine_rejects_bad_layouts(client: TokenCakeClient) -> None:
    before = snapshot(client)
    bad = msgspec.structs.replace(LAYOUT, bytes_per_block=16)
    expect_error(ErrorCode.LAYOUT_REJECTED, client.call, p.RegisterEngine("e", bad))
    expect_error(
        ErrorCode.LAYOUT_REJECTED,
        client.call,
        p.RegisterEngine("e", msgspec.structs.replace(LAYOUT, dtype="float13")),
    )
    expect_error(
        ErrorCode.LAYOUT_REJECTED,
        client.call,
        p.RegisterEngine("e", msgspec.structs.replace(LAYOUT, tp_rank=2, tp_size=2)),
    )
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.RegisterEngine("", LAYOUT))
    assert snapshot(client) == before


def test_larger_layout_than_slots_is_rejected(client: TokenCakeClient, engine_id: str) -> None:
    big = msgspec.structs.replace(LAYOUT, num_layers=4, bytes_per_block=LAYOUT.bytes_per_block * 2)
    before = snapshot(client)
    expect_error(ErrorCode.LAYOUT_REJECTED, client.call, p.RegisterEngine("big", big))
    assert snapshot(client) == before


def test_store_then_load_round_trip(client: TokenCakeClient, engine_id: str) -> None:
    hashes = [b"h0", b"h1", b"h2"]
    slots = client.call(p.Reserve(engine_id, hashes, app_id="", agent_id="")).slots
    assert len(slots) == 3 and all(s >= 0 for s in slots)
    # Writing blocks are never served.
    assert client.call(p.Lookup(engine_id, hashes)).hit_blocks == 0
    assert client.call(p.Commit(engine_id, slots)).committed == 3
    hit = client.call(p.Lookup(engine_id, [*hashes, b"h3"]))
    assert hit.hit_blocks == 3 and hit.slots == slots
    # Already stored: -1, nothing to write.
    assert client.call(p.Reserve(engine_id, hashes[:1])).slots == [-1]
    pinned = client.call(p.LoadBegin(engine_id, hashes)).slots
    assert pinned == slots
    pool = client.call(p.Pool()).pool
    assert pool.reading == 3
    assert client.call(p.LoadEnd(engine_id, pinned)).released == 3
    stats = client.call(p.Stats())
    assert stats.bytes_offloaded == 3 * LAYOUT.bytes_per_block
    assert stats.bytes_uploaded == 3 * LAYOUT.bytes_per_block
    assert client.call(p.Drop(engine_id, hashes)).dropped >= 1


def test_abort_frees_reserved_slots(client: TokenCakeClient, engine_id: str) -> None:
    free_before = client.call(p.Pool()).pool.free
    slots = client.call(p.Reserve(engine_id, [b"a", b"b"])).slots
    assert client.call(p.Pool()).pool.free == free_before - 2
    assert client.call(p.Abort(engine_id, slots)).aborted == 2
    assert client.call(p.Pool()).pool.free == free_before


def test_slots_of_another_engine_are_refused(client: TokenCakeClient, engine_id: str) -> None:
    other = client.call(p.RegisterEngine("other", LAYOUT)).engine_id
    slots = client.call(p.Reserve(engine_id, [b"mine"])).slots
    before = snapshot(client)
    expect_error(ErrorCode.NOT_OWNER, client.call, p.Commit(other, slots))
    expect_error(ErrorCode.NOT_OWNER, client.call, p.Abort(other, slots))
    expect_error(ErrorCode.NOT_OWNER, client.call, p.LoadEnd(other, slots))
    assert snapshot(client) == before
    client.call(p.Commit(engine_id, slots))


def test_bad_kv_inputs_leave_state_unchanged(client: TokenCakeClient, engine_id: str) -> None:
    slots = client.call(p.Reserve(engine_id, [b"k1", b"k2"])).slots
    client.call(p.Commit(engine_id, slots[:1]))
    before = snapshot(client)
    expect_error(ErrorCode.UNKNOWN_ENGINE, client.call, p.Reserve("nope#9", [b"x"]))
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.Reserve(engine_id, [b""]))
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.Reserve(engine_id, [b"x" * 65]))
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.Commit(engine_id, [10**9]))
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.Commit(engine_id, [-5]))
    # One good slot and one committed already: all-or-nothing.
    expect_error(ErrorCode.NOT_OWNER, client.call, p.Commit(engine_id, [slots[1], slots[0]]))
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.Lookup(engine_id, [b"a"], salt="s" * 300))
    assert snapshot(client) == before


def test_tenants_do_not_see_each_other(client: TokenCakeClient, engine_id: str) -> None:
    slots = client.call(p.Reserve(engine_id, [b"same"], salt="tenant-a")).slots
    client.call(p.Commit(engine_id, slots))
    assert client.call(p.Lookup(engine_id, [b"same"], salt="tenant-a")).hit_blocks == 1
    assert client.call(p.Lookup(engine_id, [b"same"], salt="tenant-b")).hit_blocks == 0
    assert client.call(p.LoadBegin(engine_id, [b"same"], salt="tenant-b")).slots == []
    assert client.call(p.Lookup(engine_id, [b"same"])).hit_blocks == 0


def test_agent_events_and_introspection(client: TokenCakeClient, engine_id: str) -> None:
    assert client.call(p.RegisterApp("app-1", DAG, tenant="t")).accepted
    # Identical re-registration is idempotent; a different DAG conflicts.
    assert client.call(p.RegisterApp("app-1", DAG, tenant="t")).accepted
    other = p.AppDag(nodes=[p.DagNode("solo")])
    expect_error(ErrorCode.CONFLICT, client.call, p.RegisterApp("app-1", other, tenant="t"))
    assert not client.call(
        p.LlmCallAdmitted("app-1", "plan", "r1", kv_blocks=16)
    ).accepted  # no call
    assert client.call(p.LlmCallStart("app-1", "plan", engine_id, "r1", prompt_tokens=512)).accepted
    assert client.call(p.LlmCallAdmitted("app-1", "plan", "r1", kv_blocks=16)).accepted
    assert not client.call(p.LlmCallAdmitted("app-1", "plan", "r1", kv_blocks=16)).accepted  # once
    assert client.call(p.ListAgents("app-1")).agents[0].kv_blocks == 16
    assert client.call(
        p.LlmCallFinish("app-1", "plan", "r1", output_tokens=40, kv_blocks=18)
    ).accepted
    assert client.call(
        p.ToolCallStart("app-1", "plan", "search", predicted_s=4.0, call_id="c1")
    ).accepted
    agents = {a.agent_id: a for a in client.call(p.ListAgents("app-1")).agents}
    assert agents["plan"].state == "tool"
    assert agents["plan"].tool_kind == "search"
    assert agents["plan"].kv_blocks == 18
    assert agents["plan"].app_lead_s > 0  # the tail guard's lead (tokencake.guard.app_lead_s)
    # An end for another call id is not this call's end.
    assert not client.call(p.ToolCallEnd("app-1", "plan", call_id="c2")).accepted
    assert client.call(p.ToolCallEnd("app-1", "plan", call_id="c1")).accepted
    apps = client.call(p.ListApps()).apps
    assert apps[0].app_id == "app-1"
    assert apps[0].edges == [("plan", "code"), ("code", "test")]
    assert apps[0].node_states["plan"] == "idle"
    decisions = client.call(p.ListDecisions(limit=100)).decisions
    assert all(d.reason.rule for d in decisions)
    assert client.call(p.AppEnd("app-1")).accepted
    expect_error(ErrorCode.UNKNOWN_APP, client.call, p.LlmCallStart("app-1", "plan"))


def test_bad_agent_events_leave_state_unchanged(client: TokenCakeClient, engine_id: str) -> None:
    client.call(p.RegisterApp("app-2", DAG))
    before = snapshot(client)
    expect_error(ErrorCode.UNKNOWN_APP, client.call, p.LlmCallStart("nope", "plan"))
    expect_error(ErrorCode.UNKNOWN_AGENT, client.call, p.LlmCallStart("app-2", "ghost"))
    expect_error(ErrorCode.UNKNOWN_ENGINE, client.call, p.LlmCallStart("app-2", "plan", "ghost#1"))
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.LlmCallStart("app-2", "plan", "", "", -1))
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.LlmCallAdmitted("app-2", "plan", "", -1))
    expect_error(ErrorCode.UNKNOWN_AGENT, client.call, p.LlmCallAdmitted("app-2", "ghost"))
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.ToolCallStart("app-2", "plan", "s", -3.0))
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.ToolCallStart("app-2", "plan", ""))
    cyclic = p.AppDag(nodes=[p.DagNode("a"), p.DagNode("b")], edges=[("a", "b"), ("b", "a")])
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.RegisterApp("cyc", cyclic))
    dangling = p.AppDag(nodes=[p.DagNode("a")], edges=[("a", "zz")])
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.RegisterApp("dang", dangling))
    dup = p.AppDag(nodes=[p.DagNode("a"), p.DagNode("a")])
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.RegisterApp("dup", dup))
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.RegisterApp("empty", p.AppDag(nodes=[])))
    assert snapshot(client) == before


def test_heartbeat_and_unregister(client: TokenCakeClient, engine_id: str) -> None:
    slots = client.call(p.Reserve(engine_id, [b"w"])).slots
    assert client.call(p.EngineHeartbeat(engine_id, 10, 2, 1)).leases_renewed >= 1
    info = client.call(p.ListEngines()).engines[0]
    assert (info.num_gpu_blocks_free, info.num_waiting, info.num_running) == (10, 2, 1)
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.EngineHeartbeat(engine_id, 10, -2, 1))
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.EngineHeartbeat(engine_id, 10, 2, 1, -1))
    assert client.call(p.EngineHeartbeat(engine_id, 10, 2, 1, 30)).leases_renewed >= 0
    free = client.call(p.Pool()).pool.free
    assert client.call(p.UnregisterEngine(engine_id)).released_slots == len(slots)
    assert client.call(p.Pool()).pool.free == free + len(slots)
    expect_error(ErrorCode.UNKNOWN_ENGINE, client.call, p.EngineHeartbeat(engine_id))


def test_config_and_decisions_limits(client: TokenCakeClient) -> None:
    config = client.call(p.GetConfig()).config
    assert config["arena_bytes"] == 16 << 20
    assert config["metrics_port"] == 0
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.ListDecisions(0))
    expect_error(ErrorCode.UNKNOWN_APP, client.call, p.ListAgents("missing"))


# ---------------------------------------------------------------------- raw frames


def raw_call(daemon: DaemonProcess, *frames: bytes) -> dict[str, Any]:
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.endpoint)
    try:
        sock.send_multipart(list(frames))
        assert sock.poll(5000), "no reply"
        reply: dict[str, Any] = msgspec.msgpack.decode(sock.recv())
        return reply
    finally:
        sock.close()


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        (b"\xc1garbage", ErrorCode.BAD_FRAME),
        (msgspec.msgpack.encode([1, 2, 3]), ErrorCode.BAD_FRAME),
        (
            msgspec.msgpack.encode({"v": 99, "op": "ping", "id": 4, "body": {}}),
            ErrorCode.BAD_VERSION,
        ),
        (msgspec.msgpack.encode({"v": 1, "op": "nope", "id": 5, "body": {}}), ErrorCode.UNKNOWN_OP),
        (
            msgspec.msgpack.encode({"v": 1, "op": "lookup", "id": 6, "body": {"engine_id": 3}}),
            ErrorCode.BAD_REQUEST,
        ),
        (
            msgspec.msgpack.encode(
                {"v": 1, "op": "lookup", "id": 7, "body": {"engine_id": "e", "hashes": "x"}}
            ),
            ErrorCode.BAD_REQUEST,
        ),
    ],
)
def test_malformed_frames_get_typed_errors(daemon: DaemonProcess, frame: bytes, code: str) -> None:
    reply = raw_call(daemon, frame)
    assert reply["ok"] is False
    assert reply["error"]["code"] == code
    with daemon.client() as c:
        assert c.call(p.Ping()).uptime_s >= 0  # still serving


def test_error_reply_names_request_id(daemon: DaemonProcess) -> None:
    reply = raw_call(daemon, msgspec.msgpack.encode({"v": 1, "op": "nope", "id": 41}))
    assert reply["id"] == 41 and reply["op"] == "nope"


def test_oversized_frame_is_refused(daemon: DaemonProcess) -> None:
    big = msgspec.msgpack.encode({"v": 1, "op": "ping", "id": 9, "body": {"pad": b"x" * (5 << 20)}})
    reply = raw_call(daemon, big)
    assert reply["error"]["code"] == ErrorCode.FRAME_TOO_LARGE
    assert reply["id"] == 9


def test_multipart_message_is_refused(daemon: DaemonProcess) -> None:
    ping = p.encode_request(p.Ping(), 3)
    reply = raw_call(daemon, ping, ping)
    assert reply["error"]["code"] == ErrorCode.BAD_FRAME


@pytest.mark.parametrize("field", ["importance", "expected_llm_s", "expected_tool_s"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_dag_numbers_must_be_finite(client: TokenCakeClient, field: str, value: float) -> None:
    node = msgspec.structs.replace(p.DagNode("a"), **{field: value})
    expect_error(ErrorCode.BAD_REQUEST, client.call, p.RegisterApp("bad", p.AppDag(nodes=[node])))
