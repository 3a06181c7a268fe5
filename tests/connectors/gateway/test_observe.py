"""Reading responses: the bulk scans (``sse``) read what decoding every event reads; an
answer's data-flow snippet."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tokencake.connectors.gateway import sse
from tokencake.connectors.gateway.observe import CHAT, COMPLETIONS, Observer, Outcome
from tokencake.connectors.gateway.tracker import SNIPPET_CHARS, snippet

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


READERS = ("_read_repeated", "_read_simple")


def _read(kind: str, data: bytes, cuts: list[int], reader: str = "") -> tuple[Outcome, bool]:
    """The outcome read by ``reader`` (one of ``READERS``) if it answers, else event by event
    (``reader`` empty: event by event); and whether ``reader`` answered."""
    obs = Observer(kind)
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for a, b in itertools.pairwise(bounds):
        obs.feed_stream(data[a:b])
    answered = [False]
    for name in READERS:
        read = getattr(obs, name)

        def spy(d: bytes, read: Any = read, mine: bool = name == reader) -> bool:
            answered[0] = mine and read(d)
            return answered[0]

        setattr(obs, name, spy)
    return obs.close_stream(), answered[0]


def _fixed(examples: int) -> Any:
    """``examples`` fixed examples (tests/conftest.py's profile: derandomized, no database)."""
    return settings(max_examples=examples)


def _fields(o: Outcome) -> tuple[Any, ...]:
    calls = [(c.id, c.name, c.arguments) for c in o.tool_calls]
    return o.text, o.finish_reason, o.finished, o.output_tokens, calls


@_fixed(200)
@given(streams(), st.lists(st.integers(0, 10_000), max_size=6))
def test_scans_read_what_every_event_says(stream: tuple[str, bytes, bool], cuts: list[int]) -> None:
    kind, data, simple = stream
    exact, _ = _read(kind, data, cuts)
    fast, scanned = _read(kind, data, cuts, "_read_simple")
    assert _fields(fast) == _fields(exact)
    assert simple or not scanned  # the scans answer only for one choice of text
    fast, _ = _read(kind, data, cuts, "_read_repeated")
    assert _fields(fast) == _fields(exact)


def test_a_plain_stream_is_read_by_scans() -> None:
    events = [_event(CHAT, t, {}) for t in ("He ", 'said "hi', '"content":"x"', "\\")]
    events.append(_event(CHAT, "", {"finish_reason": "stop"}))
    data = "".join(f"data: {json.dumps(e)}\n\n" for e in events).encode() + b"data: [DONE]\n\n"
    out, scanned = _read(CHAT, data, [7, 50], "_read_simple")
    assert scanned
    assert (out.text, out.finish_reason, out.finished) == (
        'He said "hi"content":"x"\\',
        "stop",
        True,
    )


def _others(kind: str, text: str) -> dict[str, Any]:
    """Lines that may come between text events, by name; ``clean``: those without text."""
    other = _event(kind, text, {})
    other["choices"][0]["index"] = 1
    logprobs = _event(kind, text, {"logprobs": {"content": [{"token": "t", "logprob": -1.0}]}})
    call = {"index": 0, "id": "t1", "function": {"name": "f", "arguments": text}}
    return {
        "comment": ": keep-alive",
        "empty": {"choices": [{"index": 0, "delta": {}}]},
        "tool_call": {"choices": [{"index": 0, "delta": {"tool_calls": [call]}}]},
        "other_choice": other,
        "logprobs": logprobs,
        "finish_early": _event(kind, text, {"finish_reason": "length"}),
        "cut_key": 'data: {"choices":[{"index":0,"delta":{"content"\n:"x"}}]}',
        "embedded": "",
    }


CLEAN = ("comment", "empty", "tool_call")


@st.composite
def repeating(draw: st.DrawFn) -> tuple[str, bytes, bool]:
    """A stream as vLLM sends one: a role event, text events alike but for their text, other
    lines at random places, the finish; and whether it is clean (text events and lines
    without text only, so the repetitions must be found)."""
    kind = draw(st.sampled_from([CHAT, COMPLETIONS]))
    seps = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    ascii_only = draw(st.booleans())

    def line(e: Any) -> str:
        text = (
            e
            if isinstance(e, str)
            else f"data: {json.dumps(e, separators=seps, ensure_ascii=ascii_only)}"
        )
        return text + "\n\n"

    texts = draw(st.lists(TEXT, min_size=1, max_size=10))
    lines = [line(_event(kind, t, {})) for t in texts]
    inserted = draw(
        st.lists(
            st.tuples(st.integers(0, len(texts)), st.sampled_from(list(_others(kind, "")))),
            max_size=3,
        )
    )
    for pos, name in sorted(inserted, reverse=True):
        if name == "embedded":  # a text event's bytes inside a comment line: no event
            lines.insert(pos, ": " + line(_event(kind, draw(TEXT), {})))
        else:
            lines.insert(pos, line(_others(kind, draw(TEXT))[name]))
    if kind == CHAT:
        lines.insert(
            0, line({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
        )
    lines.append(line(_event(kind, draw(TEXT), {"finish_reason": "stop"})))
    if draw(st.booleans()):
        lines.append(line({"choices": [], "usage": {"completion_tokens": 7}}))
    clean = all(name in CLEAN for _, name in inserted) and any(texts)
    return kind, ("".join(lines) + "data: [DONE]\n\n").encode(), clean


@_fixed(200)
@given(repeating(), st.lists(st.integers(0, 10_000), max_size=4))
def test_repeated_events_read_what_every_event_says(
    stream: tuple[str, bytes, bool], cuts: list[int]
) -> None:
    kind, data, clean = stream
    exact, _ = _read(kind, data, cuts)
    fast, answered = _read(kind, data, cuts, "_read_repeated")
    assert _fields(fast) == _fields(exact)
    assert answered or not clean
    scanned, _ = _read(kind, data, cuts, "_read_simple")  # not fooled by a comment line
    assert _fields(scanned) == _fields(exact)


@_fixed(150)
@given(repeating(), st.sampled_from([1, 40, 150, 400]))
def test_a_stream_split_in_parts_says_what_it_says_whole(
    stream: tuple[str, bytes, bool], part_bytes: int
) -> None:
    """``sse.repeated`` splits a stream in parts at blank lines (most of them nothing but
    repetitions, read by the quicker check): the same values and lines between them as one
    split of the whole."""
    kind, data, _ = stream
    name = "text" if kind == COMPLETIONS else "content"
    accept = Observer(kind)._text_only
    whole = sse.repeated(data, name, accept, part_bytes=len(data) + 1)
    parts = sse.repeated(data, name, accept, part_bytes=part_bytes)
    assert (parts is None) == (whole is None)
    if parts is not None and whole is not None:
        assert (parts.values, parts.between) == (whole.values, whole.between)


def test_a_vllm_stream_is_read_by_its_repetitions() -> None:
    """vLLM's shape: compact JSON, one id, created and model; a tool call's fragments after
    the text. The text events are found by one split; the tool call is read event by event."""
    head = '{"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m","choices":'

    def ev(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return f"data: {head}{json.dumps([choice], separators=(',', ':'))}}}\n\n"

    lines = [ev({"role": "assistant", "content": ""})]
    lines += [ev({"content": t}) for t in ("Let me ", "run ", "the tests.")]
    call: dict[str, Any] = {"id": "call-1", "type": "function", "function": {"name": "run_tests"}}
    call["index"] = 0
    lines.append(ev({"tool_calls": [{**call, "function": {**call["function"], "arguments": ""}}]}))
    for piece in ('{"q"', ': "all"}'):
        lines.append(ev({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}))
    lines.append(ev({}, "tool_calls"))
    data = ("".join(lines) + "data: [DONE]\n\n").encode()
    out, answered = _read(CHAT, data, [100], "_read_repeated")
    assert answered
    assert (out.text, out.finish_reason, out.tool_kind) == (
        "Let me run the tests.",
        "tool_calls",
        "run_tests",
    )
    assert [(c.id, c.arguments) for c in out.tool_calls] == [("call-1", '{"q": "all"}')]


def test_a_key_name_seen_as_a_value_is_not_scanned() -> None:
    data = b'data: {"choices":[{"index":0,"delta":{"content":"x","role":"content"}}]}\n\n'
    assert sse.string_values(data, "content") is None
    compact = b'data: {"choices":[{"index":0,"delta":{"content":"a\\"b"}}]}\n\n'
    assert sse.string_values(compact, "content") == ['a"b']


def test_string_literals_are_joined_exactly() -> None:
    cases = [
        [],
        ['""', '""'],
        ['"x\\""'],
        ['"a\\\\"', '"b"'],
        ['"\\""', '""', '"\\"y"'],
        ['"é\\n"'],
    ]
    for case in cases:
        literals = [c.encode() for c in case]
        assert sse.joined_string(literals) == "".join(json.loads(c) for c in case)


@_fixed(300)
@given(
    st.lists(
        st.one_of(st.sampled_from([" ", "  \n\t", "\u2003", "word", "é中"]), st.text(max_size=9)),
        max_size=400,
    )
)
def test_a_snippet_normalises_only_what_it_needs(pieces: list[str]) -> None:
    """The data-flow snippet of an answer: normalising a head of a long text gives what
    normalising the whole gives (texts of every length around the head's, whitespace-heavy)."""
    text = "".join(pieces)
    assert snippet(text) == " ".join(text.split())[:SNIPPET_CHARS]
    assert snippet(" " * 5000 + text) == snippet(text)


def test_an_event_that_differs_only_after_its_text_is_not_taken_for_a_repetition() -> None:
    """The quick check finds values by the line's head alone (``sse._tiled``): an event that
    is a repetition up to its text but ends otherwise (a usage, a finish reason) is still
    read as its own event, its tokens and finish reason kept."""
    head = 'data: {"id":"c","choices":[{"index":0,"delta":{"content":'
    lines = [f'{head}"w{i} "}},"finish_reason":null}}]}}\n\n' for i in range(300)]
    usage = '"usage":{"completion_tokens":4}'
    lines.insert(150, f'{head}""}},"finish_reason":null}}],{usage}}}\n\n')
    lines.append(f'{head}"end"}},"finish_reason":"length"}}]}}\n\n')
    data = ("".join(lines) + "data: [DONE]\n\n").encode()
    for part_bytes in (64, 1 << 10, 16 << 10):
        found = sse.repeated(data, "content", Observer(CHAT)._text_only, part_bytes=part_bytes)
        assert found is not None
        assert len(found.values) == 300
        assert sum(b'"usage"' in piece for piece in found.between) == 1
    out, answered = _read(CHAT, data, [], "_read_repeated")
    exact, _ = _read(CHAT, data, [])
    assert answered and _fields(out) == _fields(exact)
    expected = "".join(f"w{i} " for i in range(300)) + "end"
    assert (out.text, out.finish_reason, out.output_tokens) == (expected, "length", 4)
