"""Declared hints: TokenCake's headers and the upstream proposals' fields, and their order."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokencake.connectors.gateway import identity
from tokencake.connectors.gateway.hints import HintError, declared
from tokencake.connectors.gateway.observe import CHAT, RESPONSES, Observer


def test_nothing_declared() -> None:
    d = declared({}, {"model": "m", "messages": []})
    assert (d.conversation, d.app_id, d.node, d.importance, d.predicted_tool_s()) == (
        "",
        "",
        "",
        None,
        None,
    )
    assert not d.managed


def test_sglang_agent_hints() -> None:
    d = declared(
        {},
        {
            "agent_hints": {
                "workflow_id": "wf-1",
                "agent_id": "coder",
                "step_id": "s2",
                "parent_step_id": "s1",
                "expected_tool_duration_ms": 2500,
                "cache_ttl_ms": 60000,
                "reuse_hint": "high",
            }
        },
    )
    assert (d.app_id, d.node, d.conversation, d.rule) == (
        "wf-1",
        "coder",
        "wf-1/coder",
        "agent_hints",
    )
    assert (d.step_id, d.parent_step) == ("s2", "s1")
    assert d.predicted_tool_s() == 2.5  # the expected duration beats the TTL


def test_vllm_retention_directives_and_agent_hint() -> None:
    d = declared(
        {},
        {
            "retention_directives": [
                {"start": 0, "end": 16, "priority": 90, "duration": 30},
                {"start": 16, "end": 64, "priority": 40, "duration": 12.5},
            ],
            "retention_scope": "sess-9",
        },
    )
    assert (d.conversation, d.rule) == ("sess-9", "retention_scope")
    assert d.importance == 90 / 50 and d.predicted_tool_s() == 30

    d = declared(
        {},
        {
            "agent_hint": {
                "session_id": "worker-7",
                "parent_session_id": "orchestrator-1",
                "cache_control": {"type": "ephemeral", "ttl": 300},
            }
        },
    )
    assert (d.conversation, d.parents, d.ttl_s) == ("worker-7", ("orchestrator-1",), 300.0)


def test_nvext_agent_hints_and_dynamo_session() -> None:
    body = {"nvext": {"agent_hints": {"priority": 5, "osl": 1024, "prefix_id": "p-1"}}}
    d = declared({}, body)
    assert (d.conversation, d.rule, d.importance) == ("p-1", "nvext", 1.5)
    d = declared({"X-Dynamo-Session-ID": "dyn-2"}, body)
    assert (d.conversation, d.rule) == ("dyn-2", "header")
    # SGLang's vocabulary under nvext, as the SGLang connector reads it.
    sg = {"nvext": {"agent_hints": {"workflow_id": "wf", "agent_id": "a", "priority": 0}}}
    d = declared({}, sg)
    assert (d.app_id, d.node, d.conversation, d.importance) == ("wf", "a", "wf/a", 1.0)


def test_precedence_tokencake_first_then_proposals_then_user() -> None:
    body = {
        "user": "u",
        "metadata": {"conversation_id": "m"},
        "agent_hints": {"agent_id": "a", "expected_tool_duration_ms": 1000},
        "agent_hint": {"session_id": "v"},
    }
    assert declared({}, {"user": "u", "metadata": {"session_id": "m"}}).conversation == "u"
    assert declared({}, {"metadata": {"session_id": "m"}}).rule == "metadata"
    assert declared({}, body).conversation == "v"
    headers = {"X-TokenCake-Conversation": "t", "X-TokenCake-Tool-Time": "4"}
    d = declared(headers, body)
    assert (d.conversation, d.rule, d.predicted_tool_s()) == ("t", "header", 4.0)


def test_malformed_proposal_fields_are_ignored() -> None:
    d = declared(
        {},
        {
            "agent_hints": {"workflow_id": ["x"], "expected_tool_duration_ms": -5},
            "retention_directives": "no",
            "nvext": {"agent_hints": {"priority": "high"}},
            "user": "",
        },
    )
    assert (d.app_id, d.tool_s, d.importance, d.conversation) == ("", None, None, "")


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("X-TokenCake-Importance", "high"),
        ("X-TokenCake-Importance", "-1"),
        ("X-TokenCake-Tool-Time", "nan"),
        ("X-TokenCake-Conversation", ""),
        ("X-TokenCake-App", "x" * 300),
        ("X-TokenCake-Parent", ",,"),
    ],
)
def test_malformed_tokencake_headers_are_errors(header: str, value: str) -> None:
    with pytest.raises(HintError, match=header):
        declared({header: value}, {})


def test_managed_requests_are_recognised() -> None:
    body = {"kv_transfer_params": {"tokencake": {"app_id": "a", "agent_id": "b"}}}
    assert declared({}, body).managed
    assert not declared({}, {"kv_transfer_params": {"do_remote_prefill": True}}).managed


def test_fingerprint_ignores_what_clients_rewrite() -> None:
    sent = {
        "role": "assistant",
        "content": "",
        "refusal": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }
    resent = {
        "role": "assistant",
        "content": None,
        "tool_calls": [{"id": "c1", "function": {"arguments": "{}", "name": "f"}}],
    }
    assert identity.canon(sent) == identity.canon(resent)
    parts = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    assert identity.canon(parts) == identity.canon({"role": "user", "content": "hi"})
    assert identity.canon(sent) != identity.canon({**resent, "content": "x"})


def test_streamed_tool_call_fragments_are_joined() -> None:
    obs = Observer(CHAT)
    events = [
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1",'
        b'"function":{"name":"grep","arguments":""}}]}}]}\n\ndata: {"choices":[{"index":0,'
        b'"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"q\\":"}}]}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":1,"id":"c2",'
        b'"function":{"name":"ls","arguments":"{}"}}]}}]}\r\n\r\n',
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"function":'
        b'{"arguments":"1}"}}]}}]}\n\ndata: {"choices":[{"index":0,"delta":{},'
        b'"finish_reason":"tool_calls"}]}\n\ndata: [DONE]\n\n',
    ]
    joined = b"".join(events)
    for i in range(0, len(joined), 13):  # arbitrary chunk boundaries
        obs.feed_stream(joined[i : i + 13])
    out = obs.close_stream()
    assert [(c.id, c.name, c.arguments) for c in out.tool_calls] == [
        ("c1", "grep", '{"q":1}'),
        ("c2", "ls", "{}"),
    ]
    assert out.finish_reason == "tool_calls" and out.tool_kind == "grep+ls"


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--upstream", "ftp://x"],
        ["--upstream", "http://127.0.0.1:99999"],
        ["--upstream", "http://h/v1/chat"],
        ["--upstream", "http://h", "--port", "70000"],
        ["--upstream", "http://h", "--app-idle-s", "0"],
        ["--upstream", "http://h", "--app-idle-s", "nan"],
        ["--upstream", "http://h", "--daemon-timeout-s", "inf"],
        ["--upstream", "http://h", "--upstream-timeout-s", "nan"],
        ["--upstream", "http://h", "--llm-events", "both"],
        ["--upstream", "http://h", "--log-level", "LOUD"],
        ["--upstream", "http://h", "--daemon", "nowhere"],
        ["--upstream", "http://h", "--daemon", "tcp://host:0"],
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "tokencake.connectors.gateway.cli", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "Traceback" not in out.stderr


def test_streamed_responses_api_reads_the_completed_event() -> None:
    obs = Observer(RESPONSES)
    obs.feed_stream(b'event: response.created\ndata: {"type":"response.created"}\n\n')
    obs.feed_stream(
        b'event: response.completed\ndata: {"type":"response.completed","response":'
        b'{"id":"resp-9","status":"completed","output":[{"type":"function_call",'
        b'"call_id":"c9","name":"search","arguments":"{}"}],"usage":{"output_tokens":4}}}\n\n'
    )
    out = obs.close_stream()
    assert (out.response_id, out.tool_kind, out.output_tokens, out.finished) == (
        "resp-9",
        "search",
        4,
        True,
    )
