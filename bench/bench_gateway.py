"""Gateway benchmark: what ``tokencake-gateway`` adds on loopback, against direct calls.

Three processes: a fast stub engine (aiohttp, speaking the OpenAI chat wire format, answers
a tool call to a new task and a text answer to a tool result), the gateway (its real command
line, reporting to a real tokencaked) and this client. Every figure is measured against
direct calls to the same stub in the same run, interleaved so load affects both alike:

1. added latency per request, sequential ReAct conversations (a tool call, then the answer):
   p50 and p99 via the gateway minus direct (targets: <= 1 ms and <= 5 ms);
2. streaming throughput: bytes/s of long streamed responses via the gateway / direct
   (target: >= 0.95);
3. sustained requests/s through the gateway with 64 concurrent agents (target: >= 500/s);
4. inferred tool-call durations against the agent's own clock (gateway minus agent, the
   agent's time from reading a response to sending the next request; target: within 10 ms).

    python bench/bench_gateway.py [--conversations 1000] [--streams 20] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

MODEL = "stub"
DAEMON_ARGS = ("--arena-bytes", "16MiB", "--metrics-port", "0", "--log-level", "WARNING")
TOOLS = [{"type": "function", "function": {"name": "run_tests", "parameters": {}}}]


# ---------------------------------------------------------------------------- stub engine


def _answer(body: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    last = body["messages"][-1]
    if last.get("role") == "user":
        n = len(body["messages"])
        call: dict[str, Any] = {"id": f"call-{n}", "type": "function"}
        call["function"] = {"name": "run_tests", "arguments": json.dumps({"q": last["content"]})}
        return "", [call]
    return "ANSWER: all tests passed after the fix, nothing else to do", []


async def _chat(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    text, calls = _answer(body)
    if not body.get("stream"):
        message: dict[str, Any] = {"role": "assistant", "content": text or None}
        if calls:
            message["tool_calls"] = calls
        finish = "tool_calls" if calls else "stop"
        return web.json_response(
            {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "model": MODEL,
                "choices": [{"index": 0, "message": message, "finish_reason": finish}],
                "usage": {"prompt_tokens": 20, "completion_tokens": 12, "total_tokens": 32},
            }
        )
    chunks = int(request.headers.get("X-Chunks", "1000"))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    delta = {"choices": [{"index": 0, "delta": {"content": "token "}, "finish_reason": None}]}
    frame = f"data: {json.dumps({'id': 'c', 'object': 'chat.completion.chunk', **delta})}\n\n"
    payload = frame.encode()
    for _ in range(chunks):
        await resp.write(payload)
    end = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    await resp.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())
    await resp.write_eof()
    return resp


async def _models(_request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})


def run_stub(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", _chat)
    app.router.add_get("/v1/models", _models)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ---------------------------------------------------------------------------- processes


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _wait_http(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    async with aiohttp.ClientSession() as http:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{proc.args!r} exited {proc.returncode}")
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not come up")
            await asyncio.sleep(0.1)


# ---------------------------------------------------------------------------- measurements


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(int(q * len(xs)), len(xs) - 1)]


async def _post(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with http.post(f"{url}/v1/chat/completions", json=body) as r:
        out: dict[str, Any] = await r.json()
        if r.status != 200:
            raise SystemExit(f"{url}: {r.status} {out}")
        return out


async def _conversation(
    http: aiohttp.ClientSession, url: str, task: str, lat: list[float] | None = None
) -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "coder: fix the bug, run the tests"},
        {"role": "user", "content": task},
    ]
    t = time.perf_counter()
    r = await _post(http, url, {"model": MODEL, "messages": messages, "tools": TOOLS})
    if lat is not None:
        lat.append(time.perf_counter() - t)
    msg = r["choices"][0]["message"]
    messages += [msg, {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "ok"}]
    t = time.perf_counter()
    await _post(http, url, {"model": MODEL, "messages": messages, "tools": TOOLS})
    if lat is not None:
        lat.append(time.perf_counter() - t)


async def latency(direct: str, gw: str, n: int) -> dict[str, float]:
    lat: dict[str, list[float]] = {direct: [], gw: []}
    async with aiohttp.ClientSession() as http:
        for i in range(50):  # warm both paths
            await _conversation(http, direct, f"warm {i}")
            await _conversation(http, gw, f"warm {i}")
        for i in range(n):
            order = (direct, gw) if i % 2 else (gw, direct)
            for url in order:
                await _conversation(http, url, f"latency task {i}", lat[url])
    d, g = lat[direct], lat[gw]
    return {
        "direct_p50_ms": _pct(d, 0.5) * 1e3,
        "direct_p99_ms": _pct(d, 0.99) * 1e3,
        "gateway_p50_ms": _pct(g, 0.5) * 1e3,
        "gateway_p99_ms": _pct(g, 0.99) * 1e3,
        "added_p50_ms": (_pct(g, 0.5) - _pct(d, 0.5)) * 1e3,
        "added_p99_ms": (_pct(g, 0.99) - _pct(d, 0.99)) * 1e3,
    }


async def streaming(direct: str, gw: str, streams: int, chunks: int) -> dict[str, float]:
    took = {direct: 0.0, gw: 0.0}
    size = {direct: 0, gw: 0}
    body = {"model": MODEL, "messages": [{"role": "user", "content": "stream"}], "stream": True}
    async with aiohttp.ClientSession() as http:
        for i in range(streams):
            for url in (direct, gw) if i % 2 else (gw, direct):
                t = time.perf_counter()
                async with http.post(
                    f"{url}/v1/chat/completions", json=body, headers={"X-Chunks": str(chunks)}
                ) as r:
                    async for data in r.content.iter_any():
                        size[url] += len(data)
                took[url] += time.perf_counter() - t
    if size[direct] != size[gw]:
        raise SystemExit(f"streams differ: {size[direct]} vs {size[gw]} bytes")
    d_rate, g_rate = size[direct] / took[direct], size[gw] / took[gw]
    return {
        "direct_MB_s": d_rate / 1e6,
        "gateway_MB_s": g_rate / 1e6,
        "ratio": g_rate / d_rate,
        "bytes": size[direct] + size[gw],
    }


def _cpu_s(pid: int) -> float:
    """User plus system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def sustained(url: str, seconds: float, agents: int = 64) -> tuple[float, int]:
    """Requests/s of ``agents`` concurrent agents for ``seconds``, and how many were done."""
    done = 0
    stop = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as http:

        async def agent(k: int) -> None:
            nonlocal done
            i = 0
            while time.monotonic() < stop:
                await _conversation(http, url, f"agent {k} task {i} {url}")
                done += 2
                i += 1

        t = time.perf_counter()
        await asyncio.gather(*(agent(k) for k in range(agents)))
        return done / (time.perf_counter() - t), done


async def tool_accuracy(gw: str, n: int, seed: int = 0) -> dict[str, float]:
    rng = random.Random(seed)
    inner: list[float] = []
    async with aiohttp.ClientSession() as http:
        for i in range(n):
            messages: list[dict[str, Any]] = [
                {"role": "system", "content": "tester: time the tools"},
                {"role": "user", "content": f"accuracy task {i}"},
            ]
            r = await _post(http, gw, {"model": MODEL, "messages": messages, "tools": TOOLS})
            got = time.monotonic()
            msg = r["choices"][0]["message"]
            await asyncio.sleep(rng.uniform(0.01, 0.06))
            messages += [
                msg,
                {"role": "tool", "tool_call_id": msg["tool_calls"][0]["id"], "content": "ok"},
            ]
            body = {"model": MODEL, "messages": messages, "tools": TOOLS}
            sent = time.monotonic()
            await _post(http, gw, body)
            inner.append(sent - got)
        async with http.get(f"{gw}/tokencake/conversations") as resp:
            view = await resp.json()
    # The last n conversations the gateway started are this loop's, in order.
    ours = [c["last_tool_s"] for c in view["conversations"]][-n:]
    errors = [(g - t) * 1e3 for g, t in zip(ours, inner, strict=True)]
    return {
        "error_p50_ms": _pct(errors, 0.5),
        "error_p99_ms": _pct(errors, 0.99),
        "error_max_ms": max(errors),
        "error_min_ms": min(errors),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="tc-gw-bench-"))
    stub_port, gw_port = _free_port(), _free_port()
    endpoint = f"ipc://{tmp}/d.sock"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCAKE_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tokencake.daemon", "--endpoint", endpoint, *DAEMON_ARGS],
            env=env,
        ),
        subprocess.Popen([sys.executable, __file__, "--stub", str(stub_port)], env=env),
    ]
    direct = f"http://127.0.0.1:{stub_port}"
    gw = f"http://127.0.0.1:{gw_port}"
    try:
        await _wait_http(f"{direct}/v1/models", procs[1])
        gw_args = ["--upstream", direct, "--port", str(gw_port), "--daemon", endpoint]
        gw_args += ["--log-level", "WARNING"]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "tokencake.connectors.gateway.cli", *gw_args],
                env=env,
            )
        )
        await _wait_http(f"{gw}/v1/models", procs[2])
        result: dict[str, Any] = {}
        result["latency"] = await latency(direct, gw, args.conversations)
        gw_cpu = _cpu_s(procs[2].pid)
        result["streaming"] = await streaming(direct, gw, args.streams, args.chunks)
        # Relay cost per MB, whatever else the machine runs (half the bytes went via it).
        relayed_mb = result["streaming"].pop("bytes") / 2 / 1e6
        result["streaming"]["gateway_cpu_ms_per_MB"] = (
            (_cpu_s(procs[2].pid) - gw_cpu) / relayed_mb * 1e3
        )
        stub_cpu = _cpu_s(procs[1].pid)
        rps_direct, n_direct = await sustained(direct, args.seconds)
        stub_cpu = _cpu_s(procs[1].pid) - stub_cpu
        gw_cpu, stub_cpu2 = _cpu_s(procs[2].pid), _cpu_s(procs[1].pid)
        rps_gw, n_gw = await sustained(gw, args.seconds)
        gw_cpu, stub_cpu2 = _cpu_s(procs[2].pid) - gw_cpu, _cpu_s(procs[1].pid) - stub_cpu2
        result["sustained_rps"] = {"direct": rps_direct, "gateway": rps_gw}
        # CPU time per request does not depend on what else the machine runs.
        result["cpu_ms_per_request"] = {
            "gateway": gw_cpu / n_gw * 1e3,
            "stub_engine": stub_cpu / n_direct * 1e3,
            "stub_engine_via_gateway": stub_cpu2 / n_gw * 1e3,
            "gateway_capacity_rps_per_core": n_gw / gw_cpu if gw_cpu else 0.0,
        }
        result["tool_duration"] = await tool_accuracy(gw, args.tool_calls)
        async with aiohttp.ClientSession() as http, http.get(f"{gw}/tokencake/conversations") as v:
            result["daemon_link"] = (await v.json())["daemon"]
        return result
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stub", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--conversations", type=int, default=1000)
    ap.add_argument("--streams", type=int, default=20)
    ap.add_argument("--chunks", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--tool-calls", type=int, default=50)
    args = ap.parse_args()
    if args.stub:
        run_stub(args.stub)
        return
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(main_async(args))
    lat, st, rps, acc = (
        result["latency"],
        result["streaming"],
        result["sustained_rps"],
        result["tool_duration"],
    )
    print(json.dumps(result, indent=2))
    print(
        f"added latency p50 {lat['added_p50_ms']:.3f} ms (target <= 1), "
        f"p99 {lat['added_p99_ms']:.3f} ms (target <= 5); "
        f"direct p50 {lat['direct_p50_ms']:.3f} ms"
    )
    print(
        f"streaming throughput gateway/direct {st['ratio']:.3f} (target >= 0.95);"
        f" gateway CPU {st['gateway_cpu_ms_per_MB']:.1f} ms per MB relayed"
    )
    print(
        f"sustained {rps['gateway']:.0f} req/s via the gateway (target >= 500), "
        f"{rps['direct']:.0f} req/s direct"
    )
    cpu = result["cpu_ms_per_request"]
    print(
        f"gateway CPU {cpu['gateway']:.3f} ms/request (stub engine {cpu['stub_engine']:.3f}):"
        f" {cpu['gateway_capacity_rps_per_core']:.0f} req/s per core"
    )
    print(
        f"tool duration error p50 {acc['error_p50_ms']:.2f} ms, p99 {acc['error_p99_ms']:.2f} ms"
        f" (target within 10)"
    )


if __name__ == "__main__":
    main()
