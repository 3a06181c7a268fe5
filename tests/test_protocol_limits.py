"""The protocol's range and length limits live on its structs (``msgspec.Meta``): a request
out of range fails to decode with one ``bad_request`` line naming the field, before any
handler runs. The daemon's round trip of such errors is in tests/daemon/test_server.py."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest

from tokencake import PROTOCOL_VERSION
from tokencake import protocol as p

LAYOUT = {
    "model_id": "m",
    "num_layers": 1,
    "block_size": 16,
    "num_kv_heads": 1,
    "head_dim": 16,
    "dtype": "float16",
    "bytes_per_block": 1024,
}
DAG = {"nodes": [{"id": "a"}], "edges": []}


def frame(op: str, **body: Any) -> bytes:
    return msgspec.msgpack.encode({"v": PROTOCOL_VERSION, "op": op, "id": 3, "body": body})


BAD = [
    ("register_engine", {"name": "", "layout": LAYOUT}, "$.name"),
    ("register_engine", {"name": "e" * 257, "layout": LAYOUT}, "$.name"),
    ("register_engine", {"name": "e", "layout": LAYOUT, "num_gpu_blocks": -1}, "num_gpu_blocks"),
    ("engine_heartbeat", {"engine_id": "e", "num_gpu_blocks_free": -2}, "num_gpu_blocks_free"),
    ("engine_heartbeat", {"engine_id": "e", "num_waiting": -1}, "num_waiting"),
    ("engine_heartbeat", {"engine_id": "e", "waiting_blocks": -1}, "waiting_blocks"),
    ("register_app", {"app_id": "", "dag": DAG}, "app_id"),
    ("register_app", {"app_id": "a", "dag": DAG, "tenant": "t" * 257}, "tenant"),
    ("register_app", {"app_id": "a", "dag": {"nodes": []}}, "$.dag.nodes"),
    ("register_app", {"app_id": "a", "dag": {"nodes": [{"id": ""}]}}, "$.dag.nodes[0].id"),
    (
        "register_app",
        {"app_id": "a", "dag": {"nodes": [{"id": "n", "expected_tool_s": math.inf}]}},
        "expected_tool_s",
    ),
    (
        "register_app",
        {"app_id": "a", "dag": {"nodes": [{"id": "n", "importance": -1.0}]}},
        "importance",
    ),
    ("llm_call_start", {"app_id": "a", "agent_id": "b", "prompt_tokens": -1}, "prompt_tokens"),
    ("llm_call_admitted", {"app_id": "a", "agent_id": "b", "kv_blocks": -1}, "kv_blocks"),
    ("llm_call_finish", {"app_id": "a", "agent_id": "b", "output_tokens": -1}, "output_tokens"),
    ("tool_call_start", {"app_id": "a", "agent_id": "b", "tool_kind": ""}, "tool_kind"),
    (
        "tool_call_start",
        {"app_id": "a", "agent_id": "b", "tool_kind": "t", "predicted_s": math.nan},
        "predicted_s",
    ),
    (
        "tool_call_start",
        {"app_id": "a", "agent_id": "b", "tool_kind": "t", "predicted_s": 8 * 86400.0},
        "predicted_s",
    ),
    ("lookup", {"engine_id": "e", "hashes": [b""]}, "$.hashes[0]"),
    ("reserve", {"engine_id": "e", "hashes": [b"x" * 65]}, "$.hashes[0]"),
    ("load_begin", {"engine_id": "e", "hashes": [b"x"] * 65537}, "$.hashes"),
    ("drop", {"engine_id": "e", "hashes": [b"x"], "salt": "s" * 257}, "salt"),
    ("list_decisions", {"limit": 0}, "limit"),
    ("list_decisions", {"limit": 10001}, "limit"),
]


@pytest.mark.parametrize(("op", "body", "field"), BAD, ids=[f"{b[0]}:{b[2]}" for b in BAD])
def test_out_of_range_is_one_bad_request_line_naming_the_field(
    op: str, body: dict[str, Any], field: str
) -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.decode_request(frame(op, **body))
    err = info.value
    assert err.code == p.ErrorCode.BAD_REQUEST
    assert field in err.message and "\n" not in err.message
    assert (err.request_id, err.op) == (3, op)  # type: ignore[attr-defined]


GOOD = [
    ("register_engine", {"name": "e" * 256, "layout": LAYOUT, "num_gpu_blocks": 0}),
    ("engine_heartbeat", {"engine_id": "e", "num_gpu_blocks_free": -1}),
    ("register_app", {"app_id": "a", "dag": {"nodes": [{"id": "n", "importance": 0.0}]}}),
    ("tool_call_start", {"app_id": "a", "agent_id": "b", "tool_kind": "t", "predicted_s": None}),
    ("tool_call_start", {"app_id": "a", "agent_id": "b", "tool_kind": "t", "predicted_s": 0.0}),
    ("reserve", {"engine_id": "e", "hashes": [b"x" * 64, b"y"], "salt": "s" * 256}),
    ("list_decisions", {"limit": 10000}),
]


@pytest.mark.parametrize(("op", "body"), GOOD, ids=[g[0] for g in GOOD])
def test_values_at_the_limits_decode(op: str, body: dict[str, Any]) -> None:
    _, got_op, req = p.decode_request(frame(op, **body))
    assert got_op == op and type(req) is p.REQUEST_TYPES[op]
