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
    stats = msgspec.to_builtins(c.stats())
    for key in ("uptime_s", "events", "errors"):
        stats.pop(key)
    return {
        "stats": stats,
        "pool": msgspec.to_builtins(c.pool()),
        "apps": [
            {k: v for k, v in a.items() if k != "age_s"}
            for a in msgspec.to_builtins(c.list_apps())["apps"]
        ],
        "agents": [
            {k: v for k, v in a.items() if k != "state_for_s"}
            for a in msgspec.to_builtins(c.list_agents())["agents"]
        ],
        "engines": [
            {k: v for k, v in e.items() if k != "last_seen_s_ago"}
            for e in msgspec.to_builtins(c.list_engines())["engines"]
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
    return client.register_engine("eng", LAYOUT, num_gpu_blocks=64).engine_id


def test_ping(client: TokenCakeClient) -> None:
    reply = client.ping()
    assert reply.protocol_version == PROTOCOL_VERSION
    assert reply.uptime_s >= 0


def test_register_engine_returns_arena_and_fingerprint(client: TokenCakeClient) -> None:
    reply = client.register_engine("eng", LAYOUT, num_gpu_blocks=64)
    assert reply.fingerprint == LAYOUT.fingerprint()
    assert reply.slot_bytes == LAYOUT.bytes_per_block
    assert reply.slot_offset == 2048
    assert reply.num_slots == ((16 << 20) - 2048) // LAYOUT.bytes_per_block
    assert reply.arena_bytes == 16 << 20
    # Re-registering the same name replaces the old registration.
    again = client.register_engine("eng", LAYOUT, num_gpu_blocks=64)
    assert again.engine_id != reply.engine_id
    expect_error(ErrorCode.UNKNOWN_ENGINE, client.lookup, reply.engine_id, [b"x"])
    assert [e.engine_id for e in client.list_engines().engines] == [again.engine_id]


def test_register_engine_rejects_bad_layouts(client: TokenCakeClient) -> None:
    before = snapshot(client)
    bad = msgspec.structs.replace(LAYOUT, bytes_per_block=16)
    expect_error(ErrorCode.LAYOUT_REJECTED, client.register_engine, "e", bad)
    expect_error(
        ErrorCode.LAYOUT_REJECTED,
        client.register_engine,
        "e",
        msgspec.structs.replace(LAYOUT, dtype="float13"),
    )
    expect_error(
        ErrorCode.LAYOUT_REJECTED,
        client.register_engine,
        "e",
        msgspec.structs.replace(LAYOUT, tp_rank=2, tp_size=2),
    )
    expect_error(ErrorCode.BAD_REQUEST, client.register_engine, "", LAYOUT)
    assert snapshot(client) == before


def test_larger_layout_than_slots_is_rejected(client: TokenCakeClient, engine_id: str) -> None:
    big = msgspec.structs.replace(LAYOUT, num_layers=4, bytes_per_block=LAYOUT.bytes_per_block * 2)
    before = snapshot(client)
    expect_error(ErrorCode.LAYOUT_REJECTED, client.register_engine, "big", big)
    assert snapshot(client) == before


def test_store_then_load_round_trip(client: TokenCakeClient, engine_id: str) -> None:
    hashes = [b"h0", b"h1", b"h2"]
    slots = client.reserve(engine_id, hashes, app_id="", agent_id="").slots
    assert len(slots) == 3 and all(s >= 0 for s in slots)
    # Writing blocks are never served.
    assert client.lookup(engine_id, hashes).hit_blocks == 0
    assert client.commit(engine_id, slots).committed == 3
    hit = client.lookup(engine_id, [*hashes, b"h3"])
    assert hit.hit_blocks == 3 and hit.slots == slots
    # Already stored: -1, nothing to write.
    assert client.reserve(engine_id, hashes[:1]).slots == [-1]
    pinned = client.load_begin(engine_id, hashes).slots
    assert pinned == slots
    pool = client.pool().pool
    assert pool.reading == 3
    assert client.load_end(engine_id, pinned).released == 3
    stats = client.stats()
    assert stats.bytes_offloaded == 3 * LAYOUT.bytes_per_block
    assert stats.bytes_uploaded == 3 * LAYOUT.bytes_per_block
    assert client.drop(engine_id, hashes).dropped >= 1


def test_abort_frees_reserved_slots(client: TokenCakeClient, engine_id: str) -> None:
    free_before = client.pool().pool.free
    slots = client.reserve(engine_id, [b"a", b"b"]).slots
    assert client.pool().pool.free == free_before - 2
    assert client.abort(engine_id, slots).aborted == 2
    assert client.pool().pool.free == free_before


def test_slots_of_another_engine_are_refused(client: TokenCakeClient, engine_id: str) -> None:
    other = client.register_engine("other", LAYOUT).engine_id
    slots = client.reserve(engine_id, [b"mine"]).slots
    before = snapshot(client)
    expect_error(ErrorCode.NOT_OWNER, client.commit, other, slots)
    expect_error(ErrorCode.NOT_OWNER, client.abort, other, slots)
    expect_error(ErrorCode.NOT_OWNER, client.load_end, other, slots)
    assert snapshot(client) == before
    client.commit(engine_id, slots)


def test_bad_kv_inputs_leave_state_unchanged(client: TokenCakeClient, engine_id: str) -> None:
    slots = client.reserve(engine_id, [b"k1", b"k2"]).slots
    client.commit(engine_id, slots[:1])
    before = snapshot(client)
    expect_error(ErrorCode.UNKNOWN_ENGINE, client.reserve, "nope#9", [b"x"])
    expect_error(ErrorCode.BAD_REQUEST, client.reserve, engine_id, [b""])
    expect_error(ErrorCode.BAD_REQUEST, client.reserve, engine_id, [b"x" * 65])
    expect_error(ErrorCode.BAD_REQUEST, client.commit, engine_id, [10**9])
    expect_error(ErrorCode.BAD_REQUEST, client.commit, engine_id, [-5])
    # One good slot and one committed already: all-or-nothing.
    expect_error(ErrorCode.NOT_OWNER, client.commit, engine_id, [slots[1], slots[0]])
    expect_error(ErrorCode.BAD_REQUEST, client.lookup, engine_id, [b"a"], salt="s" * 300)
    assert snapshot(client) == before


def test_tenants_do_not_see_each_other(client: TokenCakeClient, engine_id: str) -> None:
    slots = client.reserve(engine_id, [b"same"], salt="tenant-a").slots
    client.commit(engine_id, slots)
    assert client.lookup(engine_id, [b"same"], salt="tenant-a").hit_blocks == 1
    assert client.lookup(engine_id, [b"same"], salt="tenant-b").hit_blocks == 0
    assert client.load_begin(engine_id, [b"same"], salt="tenant-b").slots == []
    assert client.lookup(engine_id, [b"same"]).hit_blocks == 0


def test_agent_events_and_introspection(client: TokenCakeClient, engine_id: str) -> None:
    assert client.register_app("app-1", DAG, tenant="t").accepted
    # Identical re-registration is idempotent; a different DAG conflicts.
    assert client.register_app("app-1", DAG, tenant="t").accepted
    other = p.AppDag(nodes=[p.DagNode("solo")])
    expect_error(ErrorCode.CONFLICT, client.register_app, "app-1", other, tenant="t")
    assert not client.llm_call_admitted("app-1", "plan", "r1", kv_blocks=16).accepted  # no call
    assert client.llm_call_start("app-1", "plan", engine_id, "r1", prompt_tokens=512).accepted
    assert client.llm_call_admitted("app-1", "plan", "r1", kv_blocks=16).accepted
    assert not client.llm_call_admitted("app-1", "plan", "r1", kv_blocks=16).accepted  # once
    assert client.list_agents("app-1").agents[0].kv_blocks == 16
    assert client.llm_call_finish("app-1", "plan", "r1", output_tokens=40, kv_blocks=18).accepted
    assert client.tool_call_start("app-1", "plan", "search", predicted_s=4.0, call_id="c1").accepted
    agents = {a.agent_id: a for a in client.list_agents("app-1").agents}
    assert agents["plan"].state == "tool"
    assert agents["plan"].tool_kind == "search"
    assert agents["plan"].kv_blocks == 18
    # An end for another call id is not this call's end.
    assert not client.tool_call_end("app-1", "plan", call_id="c2").accepted
    assert client.tool_call_end("app-1", "plan", call_id="c1").accepted
    apps = client.list_apps().apps
    assert apps[0].app_id == "app-1"
    assert apps[0].edges == [("plan", "code"), ("code", "test")]
    assert apps[0].node_states["plan"] == "idle"
    decisions = client.list_decisions(limit=100).decisions
    assert all(d.reason.rule for d in decisions)
    assert client.app_end("app-1").accepted
    expect_error(ErrorCode.UNKNOWN_APP, client.llm_call_start, "app-1", "plan")


def test_bad_agent_events_leave_state_unchanged(client: TokenCakeClient, engine_id: str) -> None:
    client.register_app("app-2", DAG)
    before = snapshot(client)
    expect_error(ErrorCode.UNKNOWN_APP, client.llm_call_start, "nope", "plan")
    expect_error(ErrorCode.UNKNOWN_AGENT, client.llm_call_start, "app-2", "ghost")
    expect_error(ErrorCode.UNKNOWN_ENGINE, client.llm_call_start, "app-2", "plan", "ghost#1")
    expect_error(ErrorCode.BAD_REQUEST, client.llm_call_start, "app-2", "plan", "", "", -1)
    expect_error(ErrorCode.BAD_REQUEST, client.llm_call_admitted, "app-2", "plan", "", -1)
    expect_error(ErrorCode.UNKNOWN_AGENT, client.llm_call_admitted, "app-2", "ghost")
    expect_error(ErrorCode.BAD_REQUEST, client.tool_call_start, "app-2", "plan", "s", -3.0)
    expect_error(ErrorCode.BAD_REQUEST, client.tool_call_start, "app-2", "plan", "")
    cyclic = p.AppDag(nodes=[p.DagNode("a"), p.DagNode("b")], edges=[("a", "b"), ("b", "a")])
    expect_error(ErrorCode.BAD_REQUEST, client.register_app, "cyc", cyclic)
    dangling = p.AppDag(nodes=[p.DagNode("a")], edges=[("a", "zz")])
    expect_error(ErrorCode.BAD_REQUEST, client.register_app, "dang", dangling)
    dup = p.AppDag(nodes=[p.DagNode("a"), p.DagNode("a")])
    expect_error(ErrorCode.BAD_REQUEST, client.register_app, "dup", dup)
    expect_error(ErrorCode.BAD_REQUEST, client.register_app, "empty", p.AppDag(nodes=[]))
    assert snapshot(client) == before


def test_heartbeat_and_unregister(client: TokenCakeClient, engine_id: str) -> None:
    slots = client.reserve(engine_id, [b"w"]).slots
    assert client.engine_heartbeat(engine_id, 10, 2, 1).leases_renewed >= 1
    info = client.list_engines().engines[0]
    assert (info.num_gpu_blocks_free, info.num_waiting, info.num_running) == (10, 2, 1)
    expect_error(ErrorCode.BAD_REQUEST, client.engine_heartbeat, engine_id, 10, -2, 1)
    expect_error(ErrorCode.BAD_REQUEST, client.engine_heartbeat, engine_id, 10, 2, 1, -1)
    assert client.engine_heartbeat(engine_id, 10, 2, 1, 30).leases_renewed >= 0
    free = client.pool().pool.free
    assert client.unregister_engine(engine_id).released_slots == len(slots)
    assert client.pool().pool.free == free + len(slots)
    expect_error(ErrorCode.UNKNOWN_ENGINE, client.engine_heartbeat, engine_id)


def test_config_and_decisions_limits(client: TokenCakeClient) -> None:
    config = client.get_config().config
    assert config["arena_bytes"] == 16 << 20
    assert config["metrics_port"] == 0
    expect_error(ErrorCode.BAD_REQUEST, client.list_decisions, 0)
    expect_error(ErrorCode.UNKNOWN_APP, client.list_agents, "missing")


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
        assert c.ping().uptime_s >= 0  # still serving


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
    expect_error(ErrorCode.BAD_REQUEST, client.register_app, "bad", p.AppDag(nodes=[node]))
