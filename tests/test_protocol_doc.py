"""A client written from docs/protocol.md alone: plain pyzmq, plain msgpack, plain mmap.

It imports nothing from tokencake except the fixture that starts a real daemon.
"""

from __future__ import annotations

import itertools
import mmap
import os
from typing import Any

import msgpack
import zmq

from tests.conftest import DaemonProcess


class DocClient:
    def __init__(self, endpoint: str) -> None:
        self.sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)
        self.pushes: list[dict[str, Any]] = []

    def call(self, op: str, **body: Any) -> dict[str, Any]:
        rid = next(self.ids)
        self.sock.send(msgpack.packb({"v": 1, "op": op, "id": rid, "body": body}))
        while True:
            assert self.sock.poll(5000), f"no reply to {op}"
            msg = msgpack.unpackb(self.sock.recv())
            if msg["id"] == 0:
                self.pushes.append(msg)
                continue
            assert msg["id"] == rid and msg["op"] == op
            return msg

    def ok(self, op: str, **body: Any) -> dict[str, Any]:
        msg = self.call(op, **body)
        assert msg["ok"], msg
        result: dict[str, Any] = msg["body"]
        return result


def test_client_from_the_protocol_page(daemon: DaemonProcess) -> None:
    c = DocClient(daemon.endpoint)
    assert c.ok("ping")["protocol_version"] == 1
    layout = {
        "model_id": "doc-model",
        "num_layers": 1,
        "block_size": 32,
        "num_kv_heads": 1,
        "head_dim": 32,
        "dtype": "float16",
        "bytes_per_block": 4096,
    }
    reg = c.ok("register_engine", name="doc-engine", layout=layout, num_gpu_blocks=8)
    eid, slot_bytes, base = reg["engine_id"], reg["slot_bytes"], reg["slot_offset"]
    assert slot_bytes == 4096

    # Store two blocks: reserve, write into the arena, commit.
    hashes = [b"\x01" * 16, b"\x02" * 16]
    slots = c.ok("reserve", engine_id=eid, hashes=hashes)["slots"]
    fd = os.open(f"/dev/shm/{reg['arena_name']}", os.O_RDWR)
    try:
        arena = mmap.mmap(fd, reg["arena_bytes"])
    finally:
        os.close(fd)
    for i, slot in enumerate(slots):
        start = base + slot * slot_bytes
        arena[start : start + 4096] = bytes([i + 7]) * 4096
    assert c.ok("commit", engine_id=eid, slots=slots)["committed"] == 2

    # Load them back: load_begin pins, copy out, load_end.
    assert c.ok("lookup", engine_id=eid, hashes=[*hashes, b"\x03"])["hit_blocks"] == 2
    pinned = c.ok("load_begin", engine_id=eid, hashes=hashes)["slots"]
    got = [arena[base + s * slot_bytes : base + s * slot_bytes + 4096] for s in pinned]
    assert got == [bytes([7]) * 4096, bytes([8]) * 4096]
    assert c.ok("load_end", engine_id=eid, slots=pinned)["released"] == 2
    arena.close()

    # Agent events.
    dag = {"nodes": [{"id": "a", "expected_tool_s": 2.0}, {"id": "b"}], "edges": [["a", "b"]]}
    assert c.ok("register_app", app_id="doc-app", dag=dag)["accepted"]
    assert c.ok("llm_call_start", app_id="doc-app", agent_id="a", engine_id=eid)["accepted"]
    assert c.ok("llm_call_finish", app_id="doc-app", agent_id="a", kv_blocks=2)["accepted"]
    assert c.ok("tool_call_start", app_id="doc-app", agent_id="a", tool_kind="t", predicted_s=2)[
        "accepted"
    ]
    assert c.ok("tool_call_end", app_id="doc-app", agent_id="a")["accepted"]

    # One-way events: no reply on success, the error reply when one fails, in order.
    def one_way(rid: int, op: str, **body: Any) -> None:
        c.sock.send(msgpack.packb({"v": 1, "op": op, "id": rid, "ack": False, "body": body}))

    one_way(901, "llm_call_start", app_id="doc-app", agent_id="b", engine_id=eid)
    one_way(902, "tool_call_end", app_id="doc-app", agent_id="nobody")
    c.sock.send(msgpack.packb({"v": 1, "op": "ping", "id": 903}))
    replies: list[dict[str, Any]] = []
    for _ in range(2):
        assert c.sock.poll(5000)
        replies.append(msgpack.unpackb(c.sock.recv()))
    assert [(m["id"], m["ok"]) for m in replies] == [(902, False), (903, True)]
    assert replies[0]["error"]["code"] == "unknown_agent"
    states = {a["agent_id"]: a["state"] for a in c.ok("list_agents", app_id="doc-app")["agents"]}
    assert states["b"] == "waiting"
    assert c.ok("app_end", app_id="doc-app")["accepted"]

    # Introspection and a typed error.
    stats = c.ok("stats")
    assert stats["bytes_offloaded"] == 2 * 4096 and stats["bytes_uploaded"] == 2 * 4096
    assert c.ok("pool")["pool"]["ready"] == 2
    for op in ("list_engines", "list_agents", "list_apps", "get_config", "list_decisions"):
        c.ok(op)
    err = c.call("commit", engine_id=eid, slots=[slots[0]])
    assert err["ok"] is False and err["error"]["code"] == "not_owner"
    c.sock.close()
