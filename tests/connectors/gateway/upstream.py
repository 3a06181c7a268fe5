"""A scripted OpenAI-compatible server (aiohttp) standing in for ``vllm serve`` in the tests.

It speaks vLLM's wire format for ``/v1/models``, ``/v1/chat/completions`` (whole and streamed:
a role chunk, content deltas, tool-call deltas with the id and name first and the arguments
in fragments, a finish chunk, a usage chunk when asked, ``[DONE]``), ``/v1/completions`` and
``/v1/responses``. What it answers is scripted, deterministically, from the request:

- a conversation whose last message is the user's, and whose tools include one, gets a call
  of the first tool (arguments ``{"q": <the user's text>}``);
- otherwise it gets the text ``ANSWER(<agent>): <digest of the history>``, where <agent> is
  the system prompt's first word, long enough for the gateway's data-flow rule.

Test hooks: ``X-Test-Status`` makes it answer that status with an OpenAI error body;
``X-Test-Slow`` streams one chunk every 50 ms for 10 s (to be cut off), recording the request
in ``cancelled`` when its client goes away; ``X-Test-Linger`` ends a stream's body 0.3 s after
its ``[DONE]``; ``X-Test-Drop: N`` sends the first N chunks of the stream, then drops the
connection (an engine that dies mid-answer).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from aiohttp import web

MODEL = "tiny-agent"


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""


def script(body: dict[str, Any]) -> tuple[str, list[dict[str, str]]]:
    """(text, tool calls) the scripted model answers ``body`` with."""
    messages = body.get("messages") or []
    tools = body.get("tools") or []
    system = next((_text(m["content"]) for m in messages if m.get("role") == "system"), "agent")
    agent = (system.split() or ["agent"])[0]
    last = messages[-1] if messages else {}
    if tools and last.get("role") == "user":
        n = sum(1 for m in messages if m.get("role") == "assistant")
        name = tools[0]["function"]["name"]
        args = json.dumps({"q": _text(last.get("content"))})
        return "", [{"id": f"call-{agent}-{n}", "name": name, "arguments": args}]
    digest = hashlib.sha256(json.dumps(messages, sort_keys=True).encode()).hexdigest()[:16]
    return f"ANSWER({agent}): the result of this step is {digest}", []


class ScriptedUpstream:
    def __init__(self, model: str = MODEL) -> None:
        self.model = model
        self.requests: list[tuple[str, dict[str, str], dict[str, Any]]] = []
        self.cancelled: list[str] = []
        self.counter = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/responses", self.responses)
        app.router.add_get("/health", self.health)
        return app

    async def health(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def models(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": self.model, "object": "model", "owned_by": "vllm"}]}
        )

    async def _take(self, request: web.Request) -> dict[str, Any] | web.Response:
        try:
            body = await request.json()
        except ValueError:
            return web.json_response(
                {"error": {"message": "bad JSON", "type": "BadRequestError", "code": 400}},
                status=400,
            )
        self.requests.append((request.path, dict(request.headers), body))
        status = request.headers.get("X-Test-Status")
        if status:
            err = {"message": "scripted failure", "type": "InternalServerError", "code": status}
            return web.json_response({"error": err}, status=int(status))
        self.counter += 1
        return body

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._take(request)
        if isinstance(body, web.Response):
            return body
        # The id depends on the conversation only: the same request answers the same bytes.
        key = json.dumps(body.get("messages"), sort_keys=True).encode()
        rid = "chatcmpl-" + hashlib.sha256(key).hexdigest()[:12]
        if request.headers.get("X-Test-Slow"):
            return await self._slow(request, rid)
        text, calls = script(body)
        finish = "tool_calls" if calls else "stop"
        if not body.get("stream"):
            message: dict[str, Any] = {"role": "assistant", "content": text or None}
            if calls:
                message["tool_calls"] = [
                    {
                        "id": c["id"],
                        "type": "function",
                        "function": {"name": c["name"], "arguments": c["arguments"]},
                    }
                    for c in calls
                ]
            return web.json_response(
                {
                    "id": rid,
                    "object": "chat.completion",
                    "model": self.model,
                    "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17},
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)

        async def send(delta: dict[str, Any], finish_reason: str | None = None) -> None:
            chunk = {
                "id": rid,
                "object": "chat.completion.chunk",
                "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())

        drop = int(request.headers.get("X-Test-Drop", "0"))
        if drop:
            return await self._dropped(request, resp, rid, text, calls, drop)
        await send({"role": "assistant", "content": ""})
        for i in range(0, len(text), 7):
            await send({"content": text[i : i + 7]})
        for index, c in enumerate(calls):
            head = {"id": c["id"], "type": "function", "function": {"name": c["name"]}}
            await send({"tool_calls": [{"index": index, **head, "arguments": ""}]})
            args = c["arguments"]
            for i in range(0, len(args), 5):
                frag = {"index": index, "function": {"arguments": args[i : i + 5]}}
                await send({"tool_calls": [frag]})
        await send({}, finish)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"prompt_tokens": 10, "completion_tokens": 7, "total_tokens": 17}
            chunk = {"id": rid, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        if request.headers.get("X-Test-Linger"):
            await asyncio.sleep(0.3)  # the end of the body comes well after [DONE]
        await resp.write_eof()
        return resp

    async def _dropped(
        self,
        request: web.Request,
        resp: web.StreamResponse,
        rid: str,
        text: str,
        calls: list[dict[str, str]],
        n: int,
    ) -> web.StreamResponse:
        """The first ``n`` chunks of the answer (the tool call's head first), then the
        connection is cut without the stream's end."""
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        for index, c in enumerate(calls):
            head = {"id": c["id"], "type": "function", "function": {"name": c["name"]}}
            deltas.append({"tool_calls": [{"index": index, **head, "arguments": ""}]})
            deltas.append({"tool_calls": [{"index": index, "function": {"arguments": "{"}}]})
        deltas += [{"content": text[i : i + 7]} for i in range(0, len(text), 7)]
        for delta in deltas[:n]:
            chunk = {"id": rid, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return resp

    async def _slow(self, request: web.Request, rid: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            for _ in range(200):
                chunk = {"id": rid, "choices": [{"index": 0, "delta": {"content": "x"}}]}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
                await asyncio.sleep(0.05)
        except (ConnectionResetError, asyncio.CancelledError):
            self.cancelled.append(rid)
            raise
        return resp

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._take(request)
        if isinstance(body, web.Response):
            return body
        text = f"COMPLETION of {len(str(body.get('prompt', '')))} chars"
        return web.json_response(
            {
                "id": f"cmpl-{self.counter}",
                "object": "text_completion",
                "model": self.model,
                "choices": [{"index": 0, "text": text, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
            }
        )

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._take(request)
        if isinstance(body, web.Response):
            return body
        items: list[Any] = body["input"] if isinstance(body.get("input"), list) else []
        answered = any(i.get("type") == "function_call_output" for i in items)
        tools = body.get("tools") or []
        rid = f"resp-{self.counter}"
        if tools and not answered:
            output = [
                {
                    "type": "function_call",
                    "id": f"fc-{self.counter}",
                    "call_id": f"call-{self.counter}",
                    "name": tools[0]["name"],
                    "arguments": "{}",
                    "status": "completed",
                }
            ]
        else:
            output = [
                {
                    "type": "message",
                    "id": f"msg-{self.counter}",
                    "role": "assistant",
                    "status": "completed",
                    "content": [{"type": "output_text", "text": "done", "annotations": []}],
                }
            ]
        return web.json_response(
            {
                "id": rid,
                "object": "response",
                "status": "completed",
                "model": self.model,
                "output": output,
                "usage": {"input_tokens": 5, "output_tokens": 3, "total_tokens": 8},
            }
        )
