"""The gateway end to end: the ``openai`` client as the agent, the gateway, a real tokencaked.

The engine is ``upstream.ScriptedUpstream``, a real aiohttp server speaking vLLM's OpenAI
wire format with scripted answers, so each case runs in seconds and can script what a real
engine rarely does (``test_vllm_e2e.py`` runs the gateway in front of a real vLLM server).
Everything else is real: HTTP on loopback, the gateway's aiohttp server, the daemon
subprocess and its ZMQ socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx2
import pytest
from aiohttp.test_utils import TestServer
from openai import AsyncOpenAI

from tests import procs
from tests.connectors.gateway.upstream import MODEL, ScriptedUpstream
from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.connectors.gateway.server import Gateway
from tokencake.connectors.gateway.tenants import Tenants

TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "run_tests",
            "description": "Run the test suite",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Any:
    d = procs.start(tmp_path_factory.mktemp("gw"))
    yield d
    d.stop()


@dataclass
class Stack:
    upstream: ScriptedUpstream
    gateway: Gateway
    gw_url: str
    up_url: str
    agent: AsyncOpenAI
    direct: AsyncOpenAI
    sent: list[float]
    """When the agent's HTTP client sent each request (an httpx hook)."""

    def view(self) -> dict[str, Any]:
        return self.gateway.tracker.view(time.monotonic())

    def conv(self, conv_id: str) -> dict[str, Any]:
        return next(c for c in self.view()["conversations"] if c["conversation"] == conv_id)

    async def drained(self) -> None:
        """Wait until the link's thread has sent everything queued so far."""
        fut = self.gateway.link.register("drain-probe", _probe_dag())
        await asyncio.wrap_future(fut)


def _probe_dag() -> Any:
    from tokencake import protocol as p

    return p.AppDag(nodes=[p.DagNode(id="probe")])


@contextlib.asynccontextmanager
async def stack(endpoint: str, **kwargs: Any) -> AsyncIterator[Stack]:
    upstream = ScriptedUpstream()
    up_server = TestServer(upstream.app())
    await up_server.start_server()
    up_url = str(up_server.make_url("")).rstrip("/")
    # A generous daemon timeout: on a loaded machine a slow reply must not read as a daemon
    # that is down (the daemon-down test sets its own).
    kwargs.setdefault("daemon_timeout_s", 5.0)
    # One tenant, ids as declared: these tests name conversations and apps as the client
    # declared them. Tenants apart (the default) is test_security.py.
    kwargs.setdefault("tenants", Tenants(enabled=False))
    gateway = Gateway([up_url], daemon_endpoint=endpoint, **kwargs)
    gw_server = TestServer(gateway.make_app())
    await gw_server.start_server()
    gw_url = str(gw_server.make_url("")).rstrip("/")
    sent: list[float] = []

    async def on_request(_request: httpx2.Request) -> None:
        sent.append(time.monotonic())

    http = httpx2.AsyncClient(event_hooks={"request": [on_request]})
    agent = AsyncOpenAI(base_url=f"{gw_url}/v1", api_key="k", max_retries=0, http_client=http)
    direct = AsyncOpenAI(base_url=f"{up_url}/v1", api_key="k", max_retries=0)
    try:
        yield Stack(upstream, gateway, gw_url, up_url, agent, direct, sent)
    finally:
        await agent.close()
        await http.aclose()
        await direct.close()
        await gw_server.close()
        await up_server.close()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def react_turn(
    client: AsyncOpenAI, messages: list[Any], stream: bool, **extra: Any
) -> dict[str, Any]:
    """One LLM call; returns the assistant message as the agent appends it to its history."""
    if not stream:
        r = await client.chat.completions.create(
            model=MODEL, messages=messages, tools=TOOLS, **extra
        )
        return r.choices[0].message.model_dump(exclude_none=True)
    text, calls = "", dict[int, dict[str, str]]()
    s: Any = await client.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, stream=True, **extra
    )
    async for chunk in s:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for tc in delta.tool_calls or ():
            c = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            c["id"] = tc.id or c["id"]
            c["name"] += (tc.function.name or "") if tc.function else ""
            c["arguments"] += (tc.function.arguments or "") if tc.function else ""
    msg: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        msg["tool_calls"] = [
            {
                "id": c["id"],
                "type": "function",
                "function": {"name": c["name"], "arguments": c["arguments"]},
            }
            for c in calls.values()
        ]
    return msg


async def react_loop(
    client: AsyncOpenAI,
    task: str,
    tool_s: float,
    stream: bool = False,
    on_tool: Callable[[], Any] | None = None,
    sent: list[float] | None = None,
    **extra: Any,
) -> tuple[list[dict[str, Any]], float, float]:
    """A ReAct agent: ask, run the tool it calls (a sleep), answer.

    Returns (history, inner, outer): ``inner`` is the tool's time as the agent sees it (its
    first response read to its next request sent); ``outer`` runs from the first request
    sent to the second response read. What the gateway measures lies between the two.
    """
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "coder: you write code and run the tests"},
        {"role": "user", "content": task},
    ]
    first_sent = len(sent or ())
    msg = await react_turn(client, messages, stream, **extra)
    got = time.monotonic()
    assert msg["tool_calls"][0]["function"]["name"] == "run_tests"
    messages.append(msg)
    if on_tool is not None:
        await on_tool()
    await asyncio.sleep(max(tool_s - (time.monotonic() - got), 0))
    messages.append(
        {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "2 passed"}
    )
    final = await react_turn(client, messages, stream, **extra)
    done = time.monotonic()
    messages.append(final)
    if sent is None:
        return messages, 0.0, 0.0
    return messages, sent[first_sent + 1] - got, done - sent[first_sent]


def _agents(endpoint: str, app_id: str) -> dict[str, Any]:
    with TokenCakeClient(endpoint, timeout_s=2.0) as c:
        return {a.agent_id: a for a in c.call(p.ListAgents(app_id)).agents}


# ---------------------------------------------------------------------------- ReAct + daemon


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_react_tool_calls_reach_the_daemon(daemon: procs.Proc, stream: bool) -> None:
    async def main() -> None:
        async with stack(daemon.endpoint) as s:
            seen: dict[str, Any] = {}

            async def during_tool() -> None:
                await s.drained()
                (conv,) = s.view()["conversations"]
                seen["conv"] = conv
                seen["agents"] = _agents(daemon.endpoint, conv["app_id"])

            history, inner, outer = await react_loop(
                s.agent, f"fix the bug ({stream})", 0.15, stream, during_tool, s.sent
            )
            await s.drained()
            conv = seen["conv"]
            assert conv["state"] == "tool" and conv["tool_kind"] == "run_tests"
            agent = seen["agents"][conv["agent_id"]]
            assert agent.state == "tool" and agent.tool_kind == "run_tests"

            after = s.conv(conv["conversation"])
            assert after["rule"] == "fingerprint" and after["requests"] == 2
            assert after["state"] == "idle" and after["tool_calls"] == 1
            assert inner <= after["last_tool_s"] <= outer
            assert _agents(daemon.endpoint, conv["app_id"])[conv["agent_id"]].state == "idle"

            # The engine saw the agent's tags once the daemon knew the app (the first
            # request went while it was being registered).
            assert "kv_transfer_params" not in s.upstream.requests[0][2]
            for _path, _headers, body in s.upstream.requests[1:]:
                tags = body["kv_transfer_params"]["tokencake"]
                assert (tags["app_id"], tags["agent_id"]) == (conv["app_id"], conv["agent_id"])

            # The agent got what it would have got without the gateway.
            direct, _, _ = await react_loop(s.direct, f"fix the bug ({stream})", 0.0, stream)
            assert history == direct

    run(main())
    with TokenCakeClient(daemon.endpoint) as c:
        events = c.call(p.Stats()).events
    for op in ("register_app", "llm_call_start", "llm_call_finish"):
        assert events.get(op, 0) >= 1
    assert events.get("tool_call_start", 0) >= 1 and events.get("tool_call_end", 0) >= 1


def test_engine_mode_tags_every_request_and_leaves_llm_events_to_it(daemon: procs.Proc) -> None:
    async def main() -> None:
        async with stack(daemon.endpoint, llm_events=False) as s:
            await react_loop(s.agent, "engine mode task", 0.0)
            await s.drained()
            (conv,) = s.view()["conversations"]
            for _path, _headers, body in s.upstream.requests:
                tags = body["kv_transfer_params"]["tokencake"]
                assert (tags["app_id"], tags["agent_id"]) == (conv["app_id"], conv["agent_id"])
            # register, tool_call_start, tool_call_end and the drain probe: no LLM events.
            assert s.view()["daemon"]["sent"] == 4

    run(main())


def test_streamed_bytes_pass_through_unchanged(daemon: procs.Proc) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "stream me"}],
        "tools": TOOLS,
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    async def main() -> None:
        async with stack(daemon.endpoint) as s, aiohttp.ClientSession() as http:
            got = []
            for url in (s.gw_url, s.up_url):
                async with http.post(f"{url}/v1/chat/completions", json=body) as r:
                    assert r.headers["Content-Type"].startswith("text/event-stream")
                    got.append(await r.read())
            assert got[0] == got[1] and b"tool_calls" in got[0]
            (conv,) = s.view()["conversations"]
            assert conv["state"] == "tool" and conv["tool_kind"] == "run_tests"

    run(main())


def test_durations_are_learnt_and_declared_beats_inferred(daemon: procs.Proc) -> None:
    async def main() -> None:
        async with stack(daemon.endpoint) as s:
            await react_loop(s.agent, "task one", 0.1)
            first = s.view()["conversations"][0]["last_tool_s"]
            predicted: dict[str, Any] = {}

            async def capture() -> None:
                predicted["learnt"] = s.view()["conversations"][-1]["predicted_s"]

            await react_loop(s.agent, "task two", 0.05, on_tool=capture)
            assert predicted["learnt"] == first

            async def capture_declared() -> None:
                predicted["declared"] = s.view()["conversations"][-1]["predicted_s"]

            await react_loop(
                s.agent,
                "task three",
                0.0,
                on_tool=capture_declared,
                extra_headers={"X-TokenCake-Tool-Time": "7.5"},
            )
            assert predicted["declared"] == 7.5
            (row,) = s.view()["tool_durations"]
            assert row["tool"] == "run_tests" and row["observations"] == 3
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{s.gw_url}/tokencake/metrics") as r,
            ):
                text = await r.text()
            assert 'tokencake_gateway_inferred_tool_calls_total{tool="run_tests"} 3.0' in text
            assert "tokencake_gateway_tool_prediction_error_seconds_count 2.0" in text

    run(main())


# ---------------------------------------------------------------------------- identity


def test_identity_rules(daemon: procs.Proc) -> None:
    msgs: list[Any] = [{"role": "user", "content": "identity probe"}]

    async def main() -> None:
        async with stack(daemon.endpoint) as s:
            c = s.agent.chat.completions
            await c.create(
                model=MODEL, messages=msgs, extra_headers={"X-TokenCake-Conversation": "h1"}
            )
            await c.create(
                model=MODEL, messages=msgs, extra_headers={"X-TokenCake-Conversation": "h2"}
            )
            await c.create(model=MODEL, messages=msgs, user="alice")
            await c.create(model=MODEL, messages=msgs, metadata={"conversation_id": "m1"})
            await c.create(
                model=MODEL,
                messages=msgs,
                extra_body={"agent_hints": {"workflow_id": "wf", "agent_id": "w1"}},
            )
            # Another history with the same task, while the first is live: a second one.
            await c.create(model=MODEL, messages=msgs)
            await c.create(model=MODEL, messages=[*msgs, {"role": "user", "content": "x"}])
            rules = {v["conversation"]: v["rule"] for v in s.view()["conversations"]}
            assert rules["h1"] == rules["h2"] == "header"
            assert rules["alice"] == "user" and rules["m1"] == "metadata"
            assert rules["wf/w1"] == "agent_hints"
            fps = sorted(k for k, v in rules.items() if v == "fingerprint")
            assert len(fps) == 2 and fps[1] == fps[0] + "~2"
            apps = {v["conversation"]: v["app_id"] for v in s.view()["conversations"]}
            assert apps["wf/w1"] == "wf"

    run(main())


def test_fingerprint_follows_resent_history(daemon: procs.Proc) -> None:
    """Three tool calls in one conversation; the client resends everything each time (and
    its assistant messages with null content), the conversation stays one."""

    async def main() -> None:
        async with stack(daemon.endpoint) as s:
            messages: list[dict[str, Any]] = [
                {"role": "system", "content": "coder: loops"},
                {"role": "user", "content": "loop task"},
            ]
            for i in range(3):
                msg = await react_turn(s.agent, messages, stream=i == 1)
                if msg.get("content") == "":
                    msg["content"] = None
                messages.append(msg)
                call = msg["tool_calls"][0]
                messages += [
                    {"role": "tool", "tool_call_id": call["id"], "content": f"result {i}"},
                    {"role": "user", "content": f"again {i}"},
                ]
            (conv,) = s.view()["conversations"]
            assert conv["requests"] == 3 and conv["tool_calls"] == 3

    run(main())


# ---------------------------------------------------------------------------- structure


def test_structure_is_learnt_and_registered(daemon: procs.Proc) -> None:
    """planner -> two workers (fan-out) -> joiner (join), found by data flow; the second
    run of the app is registered with the whole DAG."""

    async def instance(s: Stack, task: str) -> str:
        c = s.agent.chat.completions

        async def ask(system: str, user: str) -> str:
            r = await c.create(
                model=MODEL,
                messages=[
                    {"role": "system", "content": system},
                    {"role": "user", "content": user},
                ],
            )
            return r.choices[0].message.content or ""

        plan = await ask("planner: split the work", task)
        w1, w2 = await asyncio.gather(
            ask("worker: do one part", f"part 1 of: {plan}"),
            ask("worker: do one part", f"part 2 of: {plan}"),
        )
        await ask("joiner: merge", f"merge these:\n{w1}\n{w2}")
        return plan

    async def main() -> None:
        async with stack(daemon.endpoint) as s:
            await instance(s, "build feature A")
            (app,) = s.view()["apps"]
            assert len(app["observed_nodes"]) == 4 and len(app["own_apps"]) == 3
            observed = sorted(tuple(e) for e in app["observed_edges"])
            assert len(observed) == 4
            assert s.gateway.tracker.sweep(time.monotonic() + 1e6) == [app["app_id"]]

            await instance(s, "build feature B")
            (app2,) = s.view()["apps"]
            assert app2["own_apps"] == []
            await s.drained()
            with TokenCakeClient(daemon.endpoint) as client:
                info = next(a for a in client.call(p.ListApps()).apps if a.app_id == app2["app_id"])
            assert info.nodes == 4
            assert sorted(tuple(e) for e in info.edges) == observed

    run(main())


# ---------------------------------------------------------------------------- other endpoints


def test_completions_responses_models_and_managed(daemon: procs.Proc) -> None:
    async def main() -> None:
        async with stack(daemon.endpoint) as s:
            models = await s.agent.models.list()
            assert [m.id for m in models.data] == [MODEL]
            r = await s.agent.completions.create(model=MODEL, prompt="hello", user="comp-1")
            assert r.choices[0].text.startswith("COMPLETION")

            tools: list[Any] = [
                {"type": "function", "name": "search", "parameters": {"type": "object"}}
            ]
            first = await s.agent.responses.create(model=MODEL, input="find it", tools=tools)
            call = first.output[0]
            assert call.type == "function_call"
            conv = next(c for c in s.view()["conversations"] if c["rule"] == "responses")
            assert conv["state"] == "tool" and conv["tool_kind"] == "search"
            await s.agent.responses.create(
                model=MODEL,
                previous_response_id=first.id,
                input=[{"type": "function_call_output", "call_id": call.call_id, "output": "ok"}],
                tools=tools,
            )
            conv = s.conv(conv["conversation"])
            assert conv["state"] == "idle" and conv["requests"] == 2

            # An app that tags its own requests is left alone: forwarded as sent.
            own = {"tokencake": {"app_id": "mine", "agent_id": "a"}}
            n = len(s.view()["conversations"])
            await s.agent.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "managed"}],
                extra_body={"kv_transfer_params": own},
            )
            assert s.upstream.requests[-1][2]["kv_transfer_params"] == own
            assert len(s.view()["conversations"]) == n

    run(main())


# ---------------------------------------------------------------------------- failure


@pytest.mark.parametrize("llm_events", [True, False], ids=["gateway-events", "engine-events"])
def test_daemon_down_passes_requests_through_unchanged(tmp_path: Path, llm_events: bool) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "no daemon"}], "tools": TOOLS}

    async def main() -> None:
        endpoint = f"ipc://{tmp_path}/none.sock"
        async with stack(endpoint, daemon_timeout_s=0.05, llm_events=llm_events) as s:
            async with aiohttp.ClientSession() as http:
                for _ in range(2):
                    async with http.post(f"{s.gw_url}/v1/chat/completions", json=body) as r:
                        via = await r.read()
                        assert r.status == 200
                async with http.post(f"{s.up_url}/v1/chat/completions", json=body) as r:
                    assert await r.read() == via
            for _path, _h, received in s.upstream.requests:
                assert received == body
            await s.drained()
            assert s.view()["daemon"]["down"]

    run(main())


def test_engine_errors_reach_the_client_as_sent(daemon: procs.Proc) -> None:
    async def main() -> None:
        async with stack(daemon.endpoint) as s, aiohttp.ClientSession() as http:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "fail"}]}
            got = []
            for url in (s.gw_url, s.up_url):
                async with http.post(
                    f"{url}/v1/chat/completions", json=body, headers={"X-Test-Status": "503"}
                ) as r:
                    got.append((r.status, await r.json()))
            assert got[0] == got[1] and got[0][0] == 503
            # Not JSON: the engine judges it, as without the gateway.
            for url in (s.gw_url, s.up_url):
                async with http.post(f"{url}/v1/chat/completions", data=b"{nope") as r:
                    got.append((r.status, await r.json()))
            assert got[2] == got[3] and got[2][0] == 400
            (conv,) = s.view()["conversations"]
            assert conv["state"] == "idle"

    run(main())


def test_unreachable_engine_is_a_502(daemon: procs.Proc) -> None:
    async def main() -> None:
        gateway = Gateway(
            [f"http://127.0.0.1:{procs.free_port()}"], daemon_endpoint=daemon.endpoint
        )
        server = TestServer(gateway.make_app())
        await server.start_server()
        try:
            async with aiohttp.ClientSession() as http:
                body = {"model": MODEL, "messages": [{"role": "user", "content": "down"}]}
                async with http.post(server.make_url("/v1/chat/completions"), json=body) as r:
                    assert r.status == 502
                    err = (await r.json())["error"]
            assert err["type"] == "upstream_unavailable" and "\n" not in err["message"]
            (conv,) = gateway.tracker.view(time.monotonic())["conversations"]
            assert conv["state"] == "idle"
        finally:
            await server.close()

    run(main())


def test_client_disconnect_aborts_the_upstream_request(daemon: procs.Proc) -> None:
    async def main() -> None:
        async with stack(daemon.endpoint) as s:
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": "slow"}],
                "stream": True,
            }
            async with aiohttp.ClientSession() as http:
                r = await http.post(
                    f"{s.gw_url}/v1/chat/completions", json=body, headers={"X-Test-Slow": "1"}
                )
                await r.content.readuntil(b"\n\n")
                r.close()
            for _ in range(100):
                if s.upstream.cancelled:
                    break
                await asyncio.sleep(0.02)
            assert len(s.upstream.cancelled) == 1
            for _ in range(100):
                if s.view()["conversations"][0]["state"] == "idle":
                    break
                await asyncio.sleep(0.02)
            assert s.view()["conversations"][0]["state"] == "idle"

    run(main())


def test_client_closing_at_done_still_ends_in_a_tool_call(daemon: procs.Proc) -> None:
    """The openai client stops reading a stream at ``[DONE]`` and closes it, perhaps before
    the end of the chunked body: the gateway has relayed the whole answer and must still
    infer its tool call (found by test_vllm_e2e.py, where that close sometimes won)."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "close at done"}],
        "tools": TOOLS,
        "stream": True,
    }

    async def main() -> None:
        async with stack(daemon.endpoint) as s, aiohttp.ClientSession() as http:
            r = await http.post(
                f"{s.gw_url}/v1/chat/completions", json=body, headers={"X-Test-Linger": "1"}
            )
            seen = b""
            while b"data: [DONE]" not in seen:
                seen += await r.content.readany()
            r.close()  # before the upstream (and so the gateway) ends the body
            for _ in range(250):
                if s.view()["conversations"][0]["state"] != "llm":
                    break
                await asyncio.sleep(0.02)
            (conv,) = s.view()["conversations"]
            assert conv["state"] == "tool" and conv["tool_kind"] == "run_tests"

    run(main())


def test_bad_tokencake_header_is_a_typed_400(daemon: procs.Proc) -> None:
    async def main() -> None:
        async with stack(daemon.endpoint) as s, aiohttp.ClientSession() as http:
            body = {"model": MODEL, "messages": [{"role": "user", "content": "bad"}]}
            async with http.post(
                f"{s.gw_url}/v1/chat/completions",
                json=body,
                headers={"X-TokenCake-Importance": "high"},
            ) as r:
                assert r.status == 400
                err = (await r.json())["error"]
            assert err["code"] == "bad_tokencake_hint" and "\n" not in err["message"]
            assert "X-TokenCake-Importance" in err["message"]
            assert s.upstream.requests == []

    run(main())


def test_conversation_view_is_json(daemon: procs.Proc) -> None:
    async def main() -> None:
        async with stack(daemon.endpoint) as s, aiohttp.ClientSession() as http:
            await s.agent.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "view"}], user="viewer"
            )
            async with http.get(f"{s.gw_url}/tokencake/conversations") as r:
                view = json.loads(await r.read())
            assert [c["conversation"] for c in view["conversations"]] == ["viewer"]

    run(main())


def test_command_line_gateway_serves_and_stops_on_sigterm(daemon: procs.Proc) -> None:
    """``tokencake-gateway`` as a user runs it: one process, a real upstream, SIGTERM."""

    async def main() -> None:
        upstream = ScriptedUpstream()
        up_server = TestServer(upstream.app())
        await up_server.start_server()
        port = procs.free_port()
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tokencake.connectors.gateway.cli",
            "--upstream",
            str(up_server.make_url("")),
            "--port",
            str(port),
            "--daemon",
            daemon.endpoint,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(300):
                    try:
                        async with http.get(f"http://127.0.0.1:{port}/v1/models") as r:
                            assert (await r.json())["data"][0]["id"] == MODEL
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)
                client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k")
                _, _, _ = await react_loop(client, "via the command line", 0.0)
                await client.close()
                async with http.get(f"http://127.0.0.1:{port}/tokencake/conversations") as r:
                    (conv,) = (await r.json())["conversations"]
            assert conv["tool_calls"] == 1 and conv["state"] == "idle"
            proc.terminate()
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await up_server.close()

    run(main())


def test_ctl_shows_the_gateway_conversations(daemon: procs.Proc) -> None:
    from click.testing import CliRunner

    from tokencake.clients.ctl import main as ctl

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(ctl, list(args), catch_exceptions=False)

    async def main() -> None:
        async with stack(daemon.endpoint) as s:
            await react_loop(s.agent, "ctl task", 0.0)
            loop = asyncio.get_running_loop()
            out = await loop.run_in_executor(None, invoke, "gateway", "--url", s.gw_url)
            assert out.exit_code == 0, out.output
            (conv,) = s.view()["conversations"]
            assert conv["conversation"] in out.output and "run_tests" in out.output
            out = await loop.run_in_executor(None, invoke, "gateway", "--url", s.gw_url, "--json")
            assert json.loads(out.output)["conversations"][0]["tool_calls"] == 1

    run(main())
    out = CliRunner().invoke(ctl, ["gateway", "--url", f"http://127.0.0.1:{procs.free_port()}"])
    assert out.exit_code == 3 and "gateway not reachable" in out.output
    out = CliRunner().invoke(ctl, ["gateway", "--url", "ftp://x"])
    assert out.exit_code == 2 and len(out.output.strip().splitlines()) == 1


def test_sweep_ends_idle_apps_and_bounds_the_conversations(daemon: procs.Proc) -> None:
    async def main() -> None:
        async with stack(daemon.endpoint) as s:
            tracker = s.gateway.tracker
            tracker.capacity = 3
            for i in range(5):
                await s.agent.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"c{i}"}], user=f"u{i}"
                )
            ended = tracker.sweep(time.monotonic())
            assert ended == ["gw-u0", "gw-u1"]
            assert sorted(tracker.conversations) == ["u2", "u3", "u4"]
            await s.drained()
            with TokenCakeClient(daemon.endpoint) as c:
                states = {a.app_id: a.state for a in c.call(p.ListApps()).apps}
            assert states.get("gw-u0", "ended") != "live" and states["gw-u4"] == "live"
            assert tracker.sweep(time.monotonic() + tracker.app_idle_s) == [
                "gw-u2",
                "gw-u3",
                "gw-u4",
            ]

    run(main())


def test_several_upstreams_route_by_model_and_conversation(daemon: procs.Proc) -> None:
    async def main() -> None:
        ups = [
            ScriptedUpstream("model-a"),
            ScriptedUpstream("model-b"),
            ScriptedUpstream("model-b"),
        ]
        servers = [TestServer(u.app()) for u in ups]
        for server in servers:
            await server.start_server()
        urls = [str(server.make_url("")).rstrip("/") for server in servers]
        gateway = Gateway(urls, daemon_endpoint=daemon.endpoint, daemon_timeout_s=5.0)
        gw_server = TestServer(gateway.make_app())
        await gw_server.start_server()
        client = AsyncOpenAI(base_url=str(gw_server.make_url("/v1")), api_key="k")
        try:
            models = sorted(m.id for m in (await client.models.list()).data)
            assert models == ["model-a", "model-b"]
            for model in ("model-a", "model-b"):
                for i in range(6):
                    for turn in range(2):
                        await client.chat.completions.create(
                            model=model,
                            messages=[{"role": "user", "content": f"turn {turn}"}],
                            user=f"{model}-{i}",
                        )
            assert {b["model"] for _p, _h, b in ups[0].requests} == {"model-a"}
            assert len(ups[0].requests) == 12
            # model-b's conversations spread over both of its engines, each conversation
            # staying on one.
            assert len(ups[1].requests) > 0 and len(ups[2].requests) > 0
            for u in ups[1:]:
                users = [b["user"] for _p, _h, b in u.requests]
                assert all(users.count(x) == 2 for x in users)
        finally:
            await client.close()
            await gw_server.close()
            for server in servers:
                await server.close()

    run(main())
