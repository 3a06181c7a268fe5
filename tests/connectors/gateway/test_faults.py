"""Faults on the gateway's path: the engine drops a stream mid-answer, one conversation id
is used by two requests at once. (A client that disconnects is
``test_gateway.py::test_client_disconnect_aborts_the_upstream_request``; a daemon that is
down, ``test_daemon_down_passes_requests_through_unchanged``.)

Real gateway, real daemon, real HTTP on loopback; the engine is the scripted upstream.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests import procs
from tests.connectors.gateway.test_gateway import TOOLS, _agents, daemon, run, stack
from tests.connectors.gateway.upstream import MODEL, script

__all__ = ["daemon"]  # the module-scoped daemon fixture, shared with test_gateway


def _body(text: str, stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [
            {"role": "system", "content": "coder: you write code"},
            {"role": "user", "content": text},
        ],
        "tools": TOOLS,
        "stream": stream,
    }


def test_engine_dropping_a_stream_mid_answer(daemon: procs.Proc) -> None:
    """The engine dies after the tool call's head: the client's stream breaks (no
    ``[DONE]``, never a made-up end), no tool call is inferred from half an answer, and the
    client's retry is answered and tracked as if nothing had happened."""
    body = _body("drop me", stream=True)

    async def main() -> None:
        async with stack(daemon.endpoint) as s, aiohttp.ClientSession() as http:
            got = b""
            broke = False
            async with http.post(
                f"{s.gw_url}/v1/chat/completions", json=body, headers={"X-Test-Drop": "3"}
            ) as r:
                assert r.status == 200
                try:
                    async for chunk in r.content.iter_any():
                        got += chunk
                except aiohttp.ClientPayloadError:
                    broke = True
            assert broke and b"[DONE]" not in got
            assert b'"name": "run_tests"' in got  # the head was relayed as the engine sent it
            (conv,) = s.view()["conversations"]
            for _ in range(100):
                if s.conv(conv["conversation"])["state"] != "llm":
                    break
                await asyncio.sleep(0.02)
            conv = s.conv(conv["conversation"])
            assert conv["state"] == "idle"
            assert s.gateway.tracker.conversations[conv["conversation"]].inflight == 0
            await s.drained()
            agents = _agents(daemon.endpoint, conv["app_id"])
            assert all(a.state != "tool" for a in agents.values())
            # The retry: the whole answer, and the tool call it ends in.
            async with http.post(f"{s.gw_url}/v1/chat/completions", json=body) as r:
                assert r.status == 200
                assert b"data: [DONE]" in await r.read()
            conv = s.conv(conv["conversation"])
            assert conv["state"] == "tool" and conv["tool_kind"] == "run_tests"
            assert conv["requests"] == 2

    run(main())


def test_one_conversation_id_for_two_requests_at_once(daemon: procs.Proc) -> None:
    """Two requests under one declared conversation id at the same time (a client bug, or
    two agents that picked the same id): each gets its own answer, byte for byte what the
    engine sent, and the conversation settles with nothing in flight."""
    headers = {"X-TokenCake-Conversation": "same-id"}

    async def one(http: aiohttp.ClientSession, url: str, text: str) -> dict[str, Any]:
        body = _body(text, stream=False)
        async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
            return dict(await r.json())

    async def main() -> None:
        async with stack(daemon.endpoint) as s, aiohttp.ClientSession() as http:
            texts = [f"task {i}" for i in range(6)]
            answers = await asyncio.gather(*(one(http, s.gw_url, t) for t in texts))
            for text, answer in zip(texts, answers, strict=True):
                _, calls = script(_body(text, stream=False))
                (call,) = answer["choices"][0]["message"]["tool_calls"]
                assert call["function"]["arguments"] == calls[0]["arguments"]
            conv = s.conv("same-id")
            assert conv["requests"] == len(texts)
            assert s.gateway.tracker.conversations["same-id"].inflight == 0
            assert conv["state"] == "tool"

    run(main())
