"""Reading streamed responses: the bulk scans (``sse``) read what decoding every event reads."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokencake.connectors.gateway import sse
from tokencake.connectors.gateway.observe import CHAT, COMPLETIONS, Observer, Outcome

# Texts that try to look like keys: quotes, backslashes, braces, commas, unicode, newlines.
TRICKY = st.sampled_from(
    [
        "content",
        '"content":"x"',
        ',"content":"y',
        '{"text": "z"}',
        '"tool_calls"',
        '"index":1',
        '"finish_reason":"stop"',
        '"usage":{"completion_tokens":9}',
        "\\",
        '\\"',
        "\n\ndata: [DONE]\n\n",
        "é ü 中文 🙂",
        "",
    ]
)
TEXT = st.one_of(st.text(max_size=12), TRICKY)


def _event(kind: str, piece: str | None, extra: dict[str, Any]) -> dict[str, Any]:
    if kind == COMPLETIONS:
        choice: dict[str, Any] = {"index": 0, "text": piece, "logprobs": None}
    else:
        choice = {"index": 0, "delta": {"content": piece}, "logprobs": None}
    choice["finish_reason"] = None
    choice.update(extra)
    return {"id": "c1", "object": "chunk", "choices": [choice]}


@st.composite
def streams(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """A stream, and whether it is one choice of text (no tool call, no other choice)."""
    kind = draw(st.sampled_from([CHAT, COMPLETIONS]))
    simple = True
    events: list[dict[str, Any]] = []
    if kind == CHAT and draw(st.booleans()):
        events.append({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
    for piece in draw(st.lists(st.one_of(TEXT, st.none()), max_size=8)):
        extra: dict[str, Any] = {}
        if kind == CHAT and draw(st.booleans()):
            extra["logprobs"] = {"content": [{"token": piece or "t", "logprob": -0.5}]}
        events.append(_event(kind, piece, extra))
    if kind == CHAT and draw(st.booleans()):
        call = {"index": draw(st.integers(0, 1)), "id": "t1", "function": {"name": "f"}}
        events.append({"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
        simple = False
    if draw(st.booleans()):
        other = _event(kind, draw(TEXT), {})
        other["choices"][0]["index"] = 1
        events.append(other)
        simple = False
    finish = draw(st.sampled_from(["stop", "length", "tool_calls", None]))
    events.append(_event(kind, draw(TEXT), {"finish_reason": finish}))
    if draw(st.booleans()):
        events.append({"choices": [], "usage": {"completion_tokens": draw(st.integers(1, 99))}})
    seps = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    ascii_only = draw(st.booleans())
    end = draw(st.sampled_from(["\n\n", "\r\n\r\n"]))
    body = "".join(
        f"data: {json.dumps(e, separators=seps, ensure_ascii=ascii_only)}{end}" for e in events
    )
    return kind, (body + f"data: [DONE]{end}").encode(), simple


def _read(kind: str, data: bytes, cuts: list[int], exact: bool) -> tuple[Outcome, bool]:
    obs = Observer(kind)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for a, b in itertools.pairwise(bounds):
        obs.feed_stream(data[a:b])
    scanned = [False]
    simple = obs._read_simple

    def spy(d: bytes) -> bool:
        scanned[0] = False if exact else simple(d)
        return scanned[0]

    obs._read_simple = spy  # type: ignore[method-assign,assignment]
    return obs.close_stream(), scanned[0]


def _fields(o: Outcome) -> tuple[Any, ...]:
    calls = [(c.id, c.name, c.arguments) for c in o.tool_calls]
    return o.text, o.finish_reason, o.finished, o.output_tokens, calls


@settings(
    max_examples=200,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=6))
def test_scans_read_what_every_event_says(stream: tuple[str, bytes, bool], cuts: list[int]) -> None:
    kind, data, simple = stream
    exact, _ = _read(kind, data, cuts, exact=True)
    fast, scanned = _read(kind, data, cuts, exact=False)
    assert _fields(fast) == _fields(exact)
    assert simple or not scanned  # the scans answer only for one choice of text


def test_a_plain_stream_is_read_by_scans() -> None:
    events = [_event(CHAT, t, {}) for t in ("He ", 'said "hi', '"content":"x"', "\\")]
    events.append(_event(CHAT, "", {"finish_reason": "stop"}))
    data = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
    out, scanned = _read(CHAT, data, [7, 50], exact=False)
    assert scanned
    assert (out.text, out.finish_reason, out.finished) == (
        'He said "hi"content":"x"\\',
        "stop",
        True,
    )


def test_a_key_name_seen_as_a_value_is_not_scanned() -> None:
    data = b'data: {"choices":[{"index":0,"delta":{"content":"x","role":"content"}}]}\n\n'
    assert sse.string_values(data, "content") is None
    compact = b'data: {"choices":[{"index":0,"delta":{"content":"a\\"b"}}]}\n\n'
    assert sse.string_values(compact, "content") == ['a"b']
