"""Conversation identity from the message history, for clients that declare none.

Every chat request resends the whole history, so a conversation is recognised by its prefix.
Each message is reduced to what a client resends verbatim (role, text content, tool calls as
id, name and arguments, tool_call_id, name) and the reduced messages are chained:
``h[i] = blake2b(h[i-1] || canon(messages[i]))``.

- After each response the gateway records the conversation's *tip*: the chain over the
  request's messages plus the assistant's reply. A later request whose chain passes through a
  tip continues that conversation, however much history it resends.
- A request whose chain equals the last request of a conversation (a retry) is that
  conversation again.
- Otherwise it starts a new conversation named by the chain up to its first user message
  (system prompt plus task), with ``~2``, ``~3`` ... when that name is already live: two runs
  of the same task are two conversations.

Fields that clients commonly drop or add when resending (``refusal``, ``annotations``,
``reasoning_content``, a null versus empty content) do not take part.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any, Final

import msgspec

DIGEST_BYTES: Final = 16
_encoder = msgspec.json.Encoder(order="sorted")


def text_of(content: Any) -> str:
    """A message's content as text: a string, or its parts' text (other parts as JSON)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                out.append(part["text"])
            else:
                out.append(_encoder.encode(part).decode())
        return "".join(out)
    return _encoder.encode(content).decode()


def _tool_calls(value: Any) -> list[list[str]]:
    out = []
    for call in value if isinstance(value, list) else ():
        if not isinstance(call, dict):
            continue
        fn = call.get("function")
        fn = fn if isinstance(fn, dict) else {}
        out.append([str(call.get("id", "")), str(fn.get("name", "")), str(fn.get("arguments", ""))])
    return out


def canon(message: Any) -> bytes:
    if not isinstance(message, dict):
        return _encoder.encode(message)
    return _encoder.encode(
        [
            str(message.get("role", "")),
            text_of(message.get("content")),
            _tool_calls(message.get("tool_calls")),
            str(message.get("tool_call_id") or ""),
            str(message.get("name") or ""),
        ]
    )


def step(prev: bytes, message: Any) -> bytes:
    return hashlib.blake2b(prev + canon(message), digest_size=DIGEST_BYTES).digest()


def chain(messages: list[Any], seed: bytes = b"") -> list[bytes]:
    """``out[i]`` names ``messages[: i + 1]``; a ``seed`` (the tenant) starts another chain."""
    out: list[bytes] = []
    h = seed
    for message in messages:
        h = step(h, message)
        out.append(h)
    return out


def root_index(messages: list[Any]) -> int:
    """Index of the first user message (the task), or the last message when there is none."""
    for i, message in enumerate(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return i
    return len(messages) - 1


class PrefixIndex:
    """Tips and last requests of the tracked conversations, bounded (oldest forgotten)."""

    def __init__(self, capacity: int = 65536) -> None:
        self.capacity = capacity
        self._tips: OrderedDict[bytes, str] = OrderedDict()
        self._heads: OrderedDict[bytes, str] = OrderedDict()

    def find(self, hashes: list[bytes], messages: list[Any]) -> str:
        """The conversation ``messages`` continue or repeat, or ''."""
        if not hashes:
            return ""
        conv = self._heads.get(hashes[-1])
        if conv:
            return conv
        # Tips end at an assistant message: only those positions can match.
        for i in range(len(messages) - 1, -1, -1):
            m = messages[i]
            if isinstance(m, dict) and m.get("role") == "assistant":
                conv = self._tips.get(hashes[i], "")
                if conv:
                    return conv
        return ""

    def set_head(self, head: bytes, conv: str) -> None:
        self._put(self._heads, head, conv)

    def set_tip(self, tip: bytes, conv: str) -> None:
        self._put(self._tips, tip, conv)

    def forget(self, keys: list[bytes]) -> None:
        for key in keys:
            self._tips.pop(key, None)
            self._heads.pop(key, None)

    def _put(self, table: OrderedDict[bytes, str], key: bytes, conv: str) -> None:
        table[key] = conv
        table.move_to_end(key)
        while len(table) > self.capacity:
            table.popitem(last=False)

    def __len__(self) -> int:
        return len(self._tips) + len(self._heads)
