"""Gateway benchmark: what ``tokencake-gateway`` adds on loopback, against direct calls.

Processes: a fast stub engine (aiohttp, speaking the OpenAI chat wire format, answers a tool
call to a new task and a text answer to a tool result), the gateway (its real command line,
reporting to a real tokencaked), a plain pass-through proxy on the same HTTP stack (aiohttp
server and client, the bytes relayed as they arrive, nothing else: the ceiling of any
aiohttp proxy), and this client. Every figure is measured against direct calls to the same
stub with the same client in the same run, interleaved so load affects all alike:

1. added latency per request, sequential ReAct conversations (a tool call, then the answer):
   p50 and p99 via the gateway minus direct (targets: <= 1 ms and <= 5 ms);
2. streaming throughput: long streamed responses, each through a proxy timed next to a
   direct one; the median of the pairs' ratios with its spread and interval, and the ratio
   the CPU per stream gives if CPU were the only limit (``bench_gateway_stream.py``;
   target: >= 0.95, read as ``docs/benchmarks.md``, Gateway, says);
3. sustained requests/s through the gateway with 64 concurrent agents (target: >= 500/s);
4. inferred tool-call durations against the agent's own clock (gateway minus agent, the
   agent's time from reading a response to sending the next request; target: within 10 ms).

1 and 2 are repeated ``--runs`` times, with the load average before and after each; the
summary pools the runs (latency: the median over runs; streaming: all pairs). CPU seconds
per request (the threads' run time in ``/proc/<pid>/task/*/schedstat``) of every proxy are
reported beside the wall-clock figures: they depend on the load less, but on a VM they rise
for every process together when the host is busy, so compare them within a run.

    python bench/bench_gateway.py [--runs 3] [--conversations 1000] [--pairs 60] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_gateway_stream import (
    DAEMONS,
    MODEL,
    process_cpu_s,
    rotations,
    spread,
    stream_pairs,
)

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
    _install_uvloop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def run_plain(port: int, upstream: str) -> None:
    """The ceiling: a pass-through proxy on the gateway's HTTP stack that does nothing else."""
    hop = {"connection", "keep-alive", "transfer-encoding", "host", "content-length"}

    def keep(headers: Any) -> dict[str, str]:
        return {k: v for k, v in headers.items() if k.lower() not in hop}

    async def relay(request: web.Request) -> web.StreamResponse:
        http: aiohttp.ClientSession = request.app["http"]
        url = upstream + request.rel_url.path_qs
        data = await request.read()
        async with http.request(
            request.method, url, data=data, headers=keep(request.headers)
        ) as up:
            if not up.headers.get("Content-Type", "").startswith("text/event-stream"):
                return web.Response(
                    status=up.status, body=await up.read(), headers=keep(up.headers)
                )
            resp = web.StreamResponse(status=up.status, headers=keep(up.headers))
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp

    async def session(app: web.Application) -> Any:
        connector = aiohttp.TCPConnector(limit=0)
        app["http"] = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        yield
        await app["http"].close()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", relay)
    app.cleanup_ctx.append(session)
    _install_uvloop()
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


def _install_uvloop() -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass


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


async def latency(urls: dict[str, str], n: int) -> dict[str, float]:
    """p50 and p99 per target; ``added_*``: minus direct's, in ms."""
    lat: dict[str, list[float]] = {name: [] for name in urls}
    async with aiohttp.ClientSession() as http:
        for i in range(50):  # warm every path
            for url in urls.values():
                await _conversation(http, url, f"warm {i}")
        for i in range(n):
            for name in rotations(list(urls), i):
                await _conversation(http, urls[name], f"latency task {i}", lat[name])
    out = {}
    for name, xs in lat.items():
        for q in (50, 99):
            out[f"{name}_p{q}_ms"] = _pct(xs, q / 100) * 1e3
            if name != "direct":
                out[f"{name}_added_p{q}_ms"] = out[f"{name}_p{q}_ms"] - out[f"direct_p{q}_ms"]
    return out


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


def _spawn(procs: dict[str, subprocess.Popen[bytes]], name: str, *args: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCAKE_")}
    procs[name] = subprocess.Popen([sys.executable, *args], env=env)


def _gateway(
    procs: dict[str, subprocess.Popen[bytes]], name: str, upstream: str, port: int, endpoint: str
) -> None:
    args = ["--upstream", upstream, "--port", str(port), "--daemon", endpoint]
    _spawn(procs, name, "-m", "tokencake.connectors.gateway.cli", *args, "--log-level", "WARNING")


async def _start(
    args: argparse.Namespace, procs: dict[str, subprocess.Popen[bytes]]
) -> dict[str, str]:
    """Daemon, stub engine, the proxies; their URLs (``direct``: the stub). Optional targets:
    ``baseline``, a gateway (and its daemon) from another checkout (``--baseline-tree``),
    and ``gateway_no_daemon``, this gateway with no daemon at its endpoint."""
    tmp = tempfile.mkdtemp(prefix="tc-gw-bench-")
    names = ["direct", "gateway", "plain"]
    names += ["baseline"] * bool(args.baseline_tree) + ["gateway_no_daemon"] * args.daemon_down
    ports = {name: _free_port() for name in names}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    direct = urls["direct"]
    _spawn(
        procs, "daemon", "-m", "tokencake.daemon", "--endpoint", f"ipc://{tmp}/d.sock", *DAEMON_ARGS
    )
    _spawn(procs, "stub", __file__, "--stub", str(ports["direct"]))
    await _wait_http(f"{direct}/v1/models", procs["stub"])
    _gateway(procs, "gateway", direct, ports["gateway"], f"ipc://{tmp}/d.sock")
    _spawn(procs, "plain", __file__, "--plain", str(ports["plain"]), "--upstream", direct)
    if args.baseline_tree:
        here = os.getcwd()
        os.chdir(args.baseline_tree)  # ``-m`` imports from the working directory
        try:
            endpoint = f"ipc://{tmp}/base.sock"
            _spawn(
                procs,
                "baseline_daemon",
                "-m",
                "tokencake.daemon",
                "--endpoint",
                endpoint,
                *DAEMON_ARGS,
            )
            _gateway(procs, "baseline", direct, ports["baseline"], endpoint)
        finally:
            os.chdir(here)
    if args.daemon_down:
        _gateway(
            procs, "gateway_no_daemon", direct, ports["gateway_no_daemon"], f"ipc://{tmp}/none"
        )
    for name in names[1:]:
        await _wait_http(f"{urls[name]}/v1/models", procs[name])
    return urls


async def _runs(
    args: argparse.Namespace, urls: dict[str, str], procs: dict[str, subprocess.Popen[bytes]]
) -> list[dict[str, Any]]:
    """Latency and streaming, ``args.runs`` times, with the load average around each, and
    each proxy's CPU per request in the latency phase."""
    proxies = [name for name in urls if name != "direct"]
    pids = {name: procs[name].pid for name in ["stub", *proxies]}
    pids.update({name: procs[name].pid for name in DAEMONS if name in procs})
    runs = []
    for _ in range(args.runs):
        run: dict[str, Any] = {"load_before": os.getloadavg()[0]}
        before = {name: process_cpu_s(pids[name]) for name in proxies}
        run["latency"] = await latency(urls, args.conversations)
        run["cpu_ms_per_request"] = {
            name: (process_cpu_s(pids[name]) - before[name]) / (2 * (args.conversations + 50)) * 1e3
            for name in proxies
        }
        run["streaming"] = await stream_pairs(urls, pids, args.pairs, args.chunks)
        run["load_after"] = os.getloadavg()[0]
        runs.append(run)
    return runs


async def _capacity(
    args: argparse.Namespace, urls: dict[str, str], procs: dict[str, subprocess.Popen[bytes]]
) -> dict[str, Any]:
    """Sustained requests/s direct and via the gateway, and the CPU time per request."""
    stub, gw = procs["stub"].pid, procs["gateway"].pid
    stub_cpu = process_cpu_s(stub)
    rps_direct, n_direct = await sustained(urls["direct"], args.seconds)
    stub_cpu = process_cpu_s(stub) - stub_cpu
    gw_cpu, stub_cpu2 = process_cpu_s(gw), process_cpu_s(stub)
    rps_gw, n_gw = await sustained(urls["gateway"], args.seconds)
    gw_cpu, stub_cpu2 = process_cpu_s(gw) - gw_cpu, process_cpu_s(stub) - stub_cpu2
    return {
        "sustained_rps": {"direct": rps_direct, "gateway": rps_gw},
        # CPU time per request does not depend on what else the machine runs.
        "cpu_ms_per_request": {
            "gateway": gw_cpu / n_gw * 1e3,
            "stub_engine": stub_cpu / n_direct * 1e3,
            "stub_engine_via_gateway": stub_cpu2 / n_gw * 1e3,
            "gateway_capacity_rps_per_core": n_gw / gw_cpu if gw_cpu else 0.0,
        },
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        urls = await _start(args, procs)
        result: dict[str, Any] = {"runs": await _runs(args, urls, procs)}
        result.update(await _capacity(args, urls, procs))
        result["tool_duration"] = await tool_accuracy(urls["gateway"], args.tool_calls)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{urls['gateway']}/tokencake/conversations") as v,
        ):
            result["daemon_link"] = (await v.json())["daemon"]
        result["summary"] = _summary(result["runs"], [n for n in urls if n != "direct"])
        return result
    finally:
        for proc in reversed(procs.values()):
            proc.terminate()
            proc.wait(10)


def _summary(runs: list[dict[str, Any]], proxies: list[str]) -> dict[str, Any]:
    """Latency and CPU: medians over the runs; streaming: every run's pairs pooled."""

    def med(get: Any) -> float:
        return float(statistics.median(get(run) for run in runs))

    out: dict[str, Any] = {"loads": [(r["load_before"], r["load_after"]) for r in runs]}
    for name in proxies:
        pooled = [x for r in runs for x in r["streaming"][name]["ratios"]]
        cpu = [r["streaming"]["cpu_ms_per_stream"][name] for r in runs]
        out[name] = {
            "added_p50_ms": med(lambda r, n=name: r["latency"][f"{n}_added_p50_ms"]),
            "added_p99_ms": med(lambda r, n=name: r["latency"][f"{n}_added_p99_ms"]),
            "stream": spread(pooled),
            "stream_run_medians": [r["streaming"][name]["median"] for r in runs],
            "cpu_ratio": med(lambda r, n=name: r["streaming"][n]["cpu_ratio"]),
            "cpu_ms_per_request": med(lambda r, n=name: r["cpu_ms_per_request"][n]),
            "cpu_ms_per_stream": {
                k: statistics.median(c[k] for c in cpu) for k in cpu[0] if k != "daemon_gross"
            },
        }
        if "relay_cpu_vs_plain" in runs[0]["streaming"][name]:
            out[name]["relay_cpu_vs_plain"] = med(
                lambda r, n=name: r["streaming"][n]["relay_cpu_vs_plain"]
            )
    out["direct_p50_ms"] = med(lambda r: r["latency"]["direct_p50_ms"])
    return out


def _report(result: dict[str, Any]) -> None:
    s, rps, acc = result["summary"], result["sustained_rps"], result["tool_duration"]
    gw = s["gateway"]
    loads = ", ".join(f"{a:.1f}->{b:.1f}" for a, b in s["loads"])
    print(f"{len(s['loads'])} runs (load average before->after: {loads})")
    print(
        f"added latency p50 {gw['added_p50_ms']:.3f} ms (target <= 1), "
        f"p99 {gw['added_p99_ms']:.3f} ms (target <= 5); direct p50 {s['direct_p50_ms']:.3f} ms"
    )
    st = gw["stream"]
    print(
        f"streaming gateway/direct, median of {st['pairs']} pairs {st['median']:.3f}"
        f" (95% interval {st['ci95'][0]:.3f}-{st['ci95'][1]:.3f}; target >= 0.95);"
        f" if CPU were the limit {gw['cpu_ratio']:.3f}"
    )
    for name, m in s.items():
        if not isinstance(m, dict):
            continue
        st, cpu = m["stream"], m["cpu_ms_per_stream"]
        runs = "/".join(f"{x:.3f}" for x in m["stream_run_medians"])
        print(
            f"  {name:18s} adds p50 {m['added_p50_ms']:.3f} ms, p99 {m['added_p99_ms']:.3f} ms;"
            f" CPU {m['cpu_ms_per_request']:.3f} ms per request"
        )
        print(
            f"  {'':18s} stream {st['median']:.3f} [quartiles {st['q25']:.3f}-{st['q75']:.3f},"
            f" 95% {st['ci95'][0]:.3f}-{st['ci95'][1]:.3f}, runs {runs},"
            f" {st['under_0.95']:.0%} of pairs < 0.95]; CPU-limited {m['cpu_ratio']:.3f};"
            f" CPU per stream {cpu['proxy']:.2f} ms"
            + (f" + daemon {cpu['daemon']:.2f}" if "daemon" in cpu else "")
            + (
                f" (relay capacity {m['relay_cpu_vs_plain']:.3f} of plain)"
                if "relay_cpu_vs_plain" in m
                else ""
            )
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
    link = result["daemon_link"]
    print(
        f"daemon link: {link['sent']} messages acknowledged, {link['missed']} missed"
        f" (not delivered: no reply in time, or the link down), {link['rejected']} refused"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stub", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--plain", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--upstream", default="", help=argparse.SUPPRESS)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--conversations", type=int, default=1000)
    ap.add_argument("--pairs", type=int, default=60, help="stream pairs per proxy per run")
    ap.add_argument("--chunks", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--tool-calls", type=int, default=50)
    ap.add_argument(
        "--baseline-tree",
        default="",
        help="another checkout (git worktree add DIR COMMIT): its gateway too, in the same run",
    )
    ap.add_argument(
        "--daemon-down", action="store_true", help="also a gateway with no daemon to report to"
    )
    args = ap.parse_args()
    if args.stub:
        run_stub(args.stub)
        return
    if args.plain:
        run_plain(args.plain, args.upstream)
        return
    counts = (args.runs, args.conversations, args.pairs, args.chunks)
    if min(*counts, args.tool_calls) < 1 or args.seconds <= 0:
        ap.error(
            "--runs, --conversations, --pairs, --chunks and --tool-calls must be"
            " >= 1, --seconds > 0"
        )
    if args.baseline_tree and not Path(args.baseline_tree, "tokencake").is_dir():
        ap.error(f"--baseline-tree: no checkout at {args.baseline_tree} (no tokencake/ there)")
    try:
        import uvloop

        factory: Any = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        result = runner.run(main_async(args))
    print(json.dumps(result, indent=2))
    _report(result)


if __name__ == "__main__":
    main()
