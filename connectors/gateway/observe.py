"""Reading an engine's response for what the agent does next: a tool call or an answer.

One ``Observer`` per forwarded request, fed either the whole JSON body or the server-sent
events as they stream by. It follows choice 0 (an agent continues one choice), and reads:

- chat completions: ``finish_reason``, ``message.tool_calls`` or the streamed
  ``delta.tool_calls`` fragments (id and name in the first fragment of each index, the
  arguments concatenated), the text, and ``usage``;
- completions: ``text``, ``finish_reason``, ``usage``;
- responses: the ``output`` items (``function_call`` items are tool calls; streamed, the
  ``response.completed`` event carries the finished response), ``id`` and ``usage``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from tokencake.connectors.gateway import sse

CHAT: Final = "chat"
COMPLETIONS: Final = "completions"
RESPONSES: Final = "responses"

_decoder = msgspec.json.Decoder()
MAX_STREAM_BYTES: Final = 64 << 20
"""A longer stream is relayed but not read (its outcome: unknown)."""


@dataclass(slots=True)
class ToolCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(slots=True)
class Outcome:
    finish_reason: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    text: str = ""
    output_tokens: int = 0
    response_id: str = ""
    finished: bool = False
    """The engine said it finished (a finish reason or a completed response)."""

    def assistant_message(self) -> dict[str, Any]:
        """The reply as the client will resend it in its history."""
        msg: dict[str, Any] = {"role": "assistant", "content": self.text}
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return msg

    @property
    def tool_kind(self) -> str:
        """The tool's kind: its function name (several distinct ones joined by '+')."""
        return "+".join(sorted({c.name for c in self.tool_calls if c.name}))


def _obj(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


class Observer:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.outcome = Outcome()
        self._chunks: list[bytes] = []
        self._size = 0
        self._text: list[str] = []
        self._calls: dict[int, ToolCall] = {}

    # ------------------------------------------------------------------ whole bodies

    def feed_body(self, body: bytes) -> None:
        try:
            obj = _decoder.decode(body)
        except msgspec.DecodeError:
            return
        if isinstance(obj, dict):
            self._whole(obj)

    def _whole(self, obj: dict[str, Any]) -> None:
        out = self.outcome
        out.output_tokens = _int(_obj(obj.get("usage")).get("completion_tokens")) or _int(
            _obj(obj.get("usage")).get("output_tokens")
        )
        if self.kind == RESPONSES:
            out.response_id = str(obj.get("id", ""))
            for item in obj.get("output") or ():
                item = _obj(item)
                if item.get("type") == "function_call":
                    out.tool_calls.append(
                        ToolCall(
                            str(item.get("call_id", "")),
                            str(item.get("name", "")),
                            str(item.get("arguments", "")),
                        )
                    )
                elif item.get("type") == "message":
                    for part in item.get("content") or ():
                        if isinstance(_obj(part).get("text"), str):
                            out.text += part["text"]
            out.finished = obj.get("status") in ("completed", "incomplete")
            out.finish_reason = "tool_calls" if out.tool_calls else str(obj.get("status", ""))
            return
        choice = self._choice0(obj)
        if choice is None:
            return
        out.finish_reason = str(choice.get("finish_reason") or "")
        out.finished = bool(out.finish_reason)
        if self.kind == COMPLETIONS:
            out.text = str(choice.get("text") or "")
            return
        message = _obj(choice.get("message"))
        content = message.get("content")
        out.text = content if isinstance(content, str) else ""
        for call in message.get("tool_calls") or ():
            call = _obj(call)
            fn = _obj(call.get("function"))
            out.tool_calls.append(
                ToolCall(
                    str(call.get("id", "")), str(fn.get("name", "")), str(fn.get("arguments", ""))
                )
            )

    @staticmethod
    def _choice0(obj: dict[str, Any]) -> dict[str, Any] | None:
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict) and choice.get("index", 0) == 0:
                return choice
        return None

    # ------------------------------------------------------------------ event streams

    def feed_stream(self, chunk: bytes) -> None:
        """Keep a relayed chunk; the events are read by ``close_stream``, off the relay path."""
        self._size += len(chunk)
        if self._size <= MAX_STREAM_BYTES:
            self._chunks.append(chunk)

    def close_stream(self) -> Outcome:
        """The outcome of a stream that has ended."""
        if self._size > MAX_STREAM_BYTES:
            return Outcome()
        data = b"".join(self._chunks)
        self._chunks = []
        if b"\r" in data:
            data = data.replace(b"\r\n", b"\n")
        if self.kind == RESPONSES:
            for payload in sse.payloads_matching(data, _RESPONSE_END):
                self._response_end(payload)
            return self.outcome
        if not (self._read_repeated(data) or self._read_simple(data)):
            for payload in sse.payloads(data):
                self._event(payload)
        self.outcome.text = "".join(self._text)
        self.outcome.tool_calls = [self._calls[i] for i in sorted(self._calls)]
        return self.outcome

    def _read_repeated(self, data: bytes) -> bool:
        """Read a stream whose text events repeat one event but for the text (``sse.repeated``);
        False when it has none, or text between them (the order would need every event's
        place). The texts are decoded in one call, the events between them one by one."""
        name = "text" if self.kind == COMPLETIONS else "content"
        found = sse.repeated(data, name, self._text_only)
        if found is None:
            return False
        try:
            text = sse.joined_string(found.values)
        except msgspec.DecodeError:
            return False
        for payload in sse.payloads(found.between[0]):
            self._event(payload)
        before = len(self._text)
        for piece in filter(None, found.between[1:-1]):
            for payload in sse.payloads(piece):
                self._event(payload)
        if len(self._text) != before:
            self.outcome, self._text, self._calls = Outcome(), [], {}
            return False
        self._text.append(text)
        for payload in sse.payloads(found.between[-1]):
            self._event(payload)
        return True

    def _text_only(self, payload: bytes, value: bytes) -> bool:
        """Whether ``payload`` is an event of choice 0 that says nothing but ``value``, its
        text: no finish reason, usage, tool call or other choice."""
        try:
            chunk = _chunk_decoder.decode(payload)
            (text,) = sse.decode_strings([value])
        except (msgspec.DecodeError, msgspec.ValidationError):
            return False
        if chunk.usage is not None or len(chunk.choices) != 1:
            return False
        choice = chunk.choices[0]
        if choice.index != 0 or choice.finish_reason is not None:
            return False
        if self.kind == COMPLETIONS:
            return choice.text == text
        delta = choice.delta
        return delta is not None and delta.tool_calls is None and delta.content == text

    def _read_simple(self, data: bytes) -> bool:
        """Read a stream of one choice of text by scans (``sse``); False when it is not one.

        Then the only string-valued ``content`` (chat) or ``text`` (completions) keys are that
        choice's text, and only the events that end it or count its tokens need decoding.
        Tool calls, several choices, or lines other than events (a comment may hold an
        event's bytes): the caller reads it event by event."""
        if self.kind == CHAT and b'"tool_calls"' in data:
            return False
        if not sse.only_data_lines(data):
            return False
        if _OTHER_CHOICE.search(data) is not None:
            return False
        text = sse.string_values(data, "text" if self.kind == COMPLETIONS else "content")
        if text is None:
            return False
        self._text = text
        for payload in sse.payloads_matching(data, _FINISH, _USAGE):
            self._event(payload, text=False)
        return True

    def _response_end(self, data: bytes) -> None:
        try:
            obj = _decoder.decode(data)
        except msgspec.DecodeError:
            return
        if isinstance(obj, dict) and obj.get("type") in (
            "response.completed",
            "response.incomplete",
        ):
            self._whole(_obj(obj.get("response")))

    def _event(self, data: bytes, text: bool = True) -> None:
        """One chat or completions event; ``text``: also collect its text and tool calls."""
        if not data or data == b"[DONE]":
            return
        try:
            chunk = _chunk_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if chunk.usage is not None and chunk.usage.completion_tokens:
            self.outcome.output_tokens = chunk.usage.completion_tokens
        for choice in chunk.choices:
            if choice.index == 0:
                break
        else:
            return
        if choice.finish_reason:
            self.outcome.finish_reason = choice.finish_reason
            self.outcome.finished = True
        if not text:
            return
        if self.kind == COMPLETIONS:
            if choice.text:
                self._text.append(choice.text)
            return
        delta = choice.delta
        if delta is None:
            return
        if delta.content:
            self._text.append(delta.content)
        for frag in delta.tool_calls or ():
            call = self._calls.setdefault(frag.index, ToolCall())
            if frag.id:
                call.id = frag.id
            if frag.function is not None:
                call.name += frag.function.name or ""
                call.arguments += frag.function.arguments or ""


_OTHER_CHOICE: Final = sse.key_pattern("index", rb"[1-9]")
"""A choice other than 0 (or a tool call's fragment: also read event by event)."""
_FINISH: Final = sse.key_pattern("finish_reason", b'"')
_USAGE: Final = sse.key_pattern("usage", rb"\{")
_RESPONSE_END: Final = sse.key_pattern("type", rb'"response\.(?:completed|incomplete)"')


# Typed views of a streamed chunk: fields not named here are skipped, not built.


class _Fn(msgspec.Struct):
    name: str | None = None
    arguments: str | None = None


class _Frag(msgspec.Struct):
    index: int = 0
    id: str | None = None
    function: _Fn | None = None


class _Delta(msgspec.Struct):
    content: str | None = None
    tool_calls: list[_Frag] | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    completion_tokens: int = 0


class _Chunk(msgspec.Struct):
    choices: list[_Choice] = []
    usage: _Usage | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
