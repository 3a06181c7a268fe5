"""Reading a relayed server-sent event stream in bulk rather than event by event.

A streamed answer is thousands of small events, most of them one content delta. Decoding each
event as JSON cost the gateway about as much CPU as relaying it (the profile of
``bench/bench_gateway.py``). These scans read the whole stream, once it has ended, with
C-level passes (compiled regular expressions with a literal prefix, ``bytes.count``, one JSON
decode of all the strings found) and leave the per-event decode to the few events that need it.

Why a key scan can be exact on valid JSON: a quote inside a JSON string is always escaped, so
an unescaped ``"key"`` right after ``{`` or ``,`` (or one space after them) can only be the
start of an object key, never text inside a string, whatever the text holds. ``string_values``
counts those contexts and answers only when every ``"key"`` in the stream is such a key.
What a scan cannot tell is *which* object a key belongs to: callers use it only on streams
whose schema has one object with that key (``observe.Observer`` checks this first).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator
from typing import Final

import msgspec

_STRING: Final = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
"""A JSON string literal (possessive: no backtracking on long texts)."""
_KEY_CONTEXTS: Final = (b"{", b",", b"{ ", b", ")
_strings = msgspec.json.Decoder(list[str])


@functools.cache
def key_pattern(name: str, value: bytes) -> re.Pattern[bytes]:
    """Key ``name`` then a value that starts as the regex ``value``. The pattern starts with
    a literal, which ``re`` searches for at C speed; it may also match text that is not a key
    (``string_values`` rules that out; other callers only use it to pick events to decode)."""
    return re.compile(b'"' + re.escape(name.encode()) + rb'"\s*:\s*' + value)


def string_values(data: bytes, name: str) -> list[str] | None:
    """The decoded string values of every key ``name`` in ``data``, in stream order (keys
    whose value is null or a list are skipped); None when that cannot be read exactly by a
    scan (``"name"`` also appears other than as a key, or invalid escapes)."""
    found = key_pattern(name, b"(?:(" + _STRING + rb")|null\b|\[)").findall(data)
    quoted = b'"' + name.encode() + b'"'
    if len(found) != data.count(quoted):
        return None
    keys = 0
    for before in _KEY_CONTEXTS:  # compact JSON: one pass
        keys += data.count(before + quoted)
        if keys == len(found):
            break
    else:
        return None
    strings = [s for s in found if s]
    try:
        return _strings.decode(b"[" + b",".join(strings) + b"]")
    except msgspec.DecodeError:
        return None


def payloads(data: bytes) -> Iterator[bytes]:
    """The ``data:`` payload of every line of ``data`` (line ends already ``\\n``)."""
    for line in data.split(b"\n"):
        if line.startswith(b"data:"):
            yield line[5:].strip()


def payloads_matching(data: bytes, *patterns: re.Pattern[bytes]) -> list[bytes]:
    """The ``data:`` payloads of the lines in which any of ``patterns`` matches, each line
    once, in stream order."""
    lines: dict[int, int] = {}
    for pattern in patterns:
        for match in pattern.finditer(data):
            start = data.rfind(b"\n", 0, match.start()) + 1
            if start not in lines:
                end = data.find(b"\n", match.end())
                lines[start] = len(data) if end < 0 else end
    out = []
    for start in sorted(lines):
        line = data[start : lines[start]]
        if line.startswith(b"data:"):
            out.append(line[5:].strip())
    return out
