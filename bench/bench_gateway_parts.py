"""The gateway's own per-request costs, each against the way it was done before, in one run.

1. Reading a streamed answer once it has ended (``Observer.close_stream``): the repetition
   split (``sse.repeated``) against the key scans (``sse.string_values``, the reader before
   it) and against decoding every event; on ``bench_gateway.py``'s stub stream and on a
   vLLM-shaped one (compact JSON, id, created and model in every event, a role event first).
   Thread CPU per stream, best of ``--repeat``; the outcomes are checked equal.
2. Reporting agent events to a real tokencaked: ``DaemonLink`` (pipelined, replies read as
   they come) against ``AsyncTokenCakeClient.call`` awaited in turn (how the link sent each
   event before). Process CPU per event (the ZMQ I/O thread included), interleaved rounds.

CPU time, not wall-clock: it barely depends on what else the machine runs.

    python bench/bench_gateway_parts.py [--chunks 2000] [--repeat 50] [--events 4000]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import resource
import statistics
import time
from collections.abc import Callable
from typing import Any

from tokencake import protocol as p
from tokencake.clients.client import AsyncTokenCakeClient
from tokencake.clients.launcher import daemon_flags, running
from tokencake.connectors.gateway.link import DaemonLink
from tokencake.connectors.gateway.observe import CHAT, Observer, Outcome


class _Scans(Observer):
    """The reader before the repetition split."""

    def _read_repeated(self, data: bytes) -> bool:
        return False


class _EveryEvent(_Scans):
    def _read_simple(self, data: bytes) -> bool:
        return False


def stub_stream(chunks: int) -> bytes:
    """What ``bench_gateway.py``'s stub engine streams."""
    delta = {"choices": [{"index": 0, "delta": {"content": "token "}, "finish_reason": None}]}
    frame = f"data: {json.dumps({'id': 'c', 'object': 'chat.completion.chunk', **delta})}\n\n"
    end = {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
    return (frame * chunks + f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n").encode()


def vllm_stream(chunks: int) -> bytes:
    """vLLM's chat stream shape: a role event, one event per token, the finish."""
    head = {"id": "chatcmpl-5f0c", "object": "chat.completion.chunk", "created": 1764633600}
    head["model"] = "Qwen/Qwen2.5-0.5B-Instruct"

    def event(delta: dict[str, Any], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        body = json.dumps({**head, "choices": [choice]}, separators=(",", ":"))
        return f"data: {body}\n\n"

    out = [event({"role": "assistant", "content": ""})]
    out += [event({"content": f" word{i % 97}"}) for i in range(chunks)]
    out.append(event({"content": ""}, "stop"))
    return ("".join(out) + "data: [DONE]\n\n").encode()


def _read(cls: type[Observer], data: bytes) -> Outcome:
    obs = cls(CHAT)
    obs.feed_stream(data)
    return obs.close_stream()


def _best_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Each function's least thread CPU over ``repeat`` calls, the calls interleaved."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeat):
        for name, fn in fns.items():
            t = time.thread_time()
            fn()
            best[name] = min(best[name], time.thread_time() - t)
    return {name: s * 1e3 for name, s in best.items()}


def reading(chunks: int, repeat: int) -> dict[str, dict[str, float]]:
    out = {}
    for name, data in (("stub", stub_stream(chunks)), ("vllm", vllm_stream(chunks))):
        readers = {"repeated": Observer, "scans": _Scans, "every_event": _EveryEvent}
        outcomes = {r: _read(cls, data) for r, cls in readers.items()}
        if len({(o.text, o.finish_reason, o.output_tokens) for o in outcomes.values()}) != 1:
            raise SystemExit(f"the readers disagree on the {name} stream")
        ms = _best_ms(
            {r: functools.partial(_read, cls, data) for r, cls in readers.items()}, repeat
        )
        out[name] = {f"{r}_ms": round(v, 3) for r, v in ms.items()}
        out[name]["scans_over_repeated"] = round(ms["scans"] / ms["repeated"], 2)
    return out


def _cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _events(app: str, i: int) -> tuple[p.Request[Any], p.Request[Any]]:
    """One LLM call's start and finish."""
    start = p.LlmCallStart(app, "a", request_id=f"r{i}")
    return start, p.LlmCallFinish(app, "a", request_id=f"r{i}", output_tokens=3)


async def _pipelined(endpoint: str, n: int, rnd: int) -> float:
    link = DaemonLink(endpoint, timeout_s=5.0)
    link.start()
    app = f"pipelined-{rnd}"
    if not await link.register(app, p.AppDag(nodes=[p.DagNode(id="a")])):
        raise SystemExit("the daemon did not take the app")
    cpu = _cpu_s()
    for i in range(n // 2):
        for req in _events(app, i):
            link.event(req)
        await asyncio.sleep(0)  # one request per loop turn
    await link.register(f"{app}-probe", p.AppDag(nodes=[p.DagNode(id="x")]))  # after all
    used = _cpu_s() - cpu
    if link.sent != n + 2 or link.missed:
        raise SystemExit(f"link: {link.sent} sent, {link.missed} missed of {n + 2}")
    await link.close()
    return used / n


async def _awaited(endpoint: str, n: int, rnd: int) -> float:
    client = AsyncTokenCakeClient(endpoint, timeout_s=5.0)
    app = f"awaited-{rnd}"
    await client.call(p.RegisterApp(app, p.AppDag(nodes=[p.DagNode(id="a")])))
    cpu = _cpu_s()
    for i in range(n // 2):
        for req in _events(app, i):
            await client.call(req)
    used = _cpu_s() - cpu
    await client.close()
    return used / n


async def reporting(endpoint: str, events: int, rounds: int) -> dict[str, float]:
    per: dict[str, list[float]] = {"pipelined": [], "awaited": []}
    for rnd in range(rounds):
        per["pipelined"].append(await _pipelined(endpoint, events, rnd))
        per["awaited"].append(await _awaited(endpoint, events, rnd))
    us = {name: statistics.median(xs) * 1e6 for name, xs in per.items()}
    return {
        "pipelined_us_per_event": round(us["pipelined"], 1),
        "awaited_us_per_event": round(us["awaited"], 1),
        "awaited_over_pipelined": round(us["awaited"] / us["pipelined"], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=2000, help="events per stream")
    ap.add_argument("--repeat", type=int, default=50, help="reads per reader; the best counts")
    ap.add_argument("--events", type=int, default=4000, help="events per link round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds per link")
    args = ap.parse_args()
    if min(args.chunks, args.repeat, args.events, args.rounds) < 1:
        ap.error("--chunks, --repeat, --events and --rounds must be >= 1")
    result: dict[str, Any] = {"reading_a_stream": reading(args.chunks, args.repeat)}
    with running(*daemon_flags(arena="16MiB")) as daemon:
        result["reporting"] = asyncio.run(reporting(daemon.endpoint, args.events, args.rounds))
    print(json.dumps(result, indent=2))
    for name, r in result["reading_a_stream"].items():
        print(
            f"reading a {args.chunks}-event {name} stream: {r['repeated_ms']:.3f} ms"
            f" (scans {r['scans_ms']:.3f} ms, every event {r['every_event_ms']:.3f} ms)"
        )
    rep = result["reporting"]
    print(
        f"reporting to tokencaked: {rep['pipelined_us_per_event']:.1f} us CPU per event"
        f" pipelined, {rep['awaited_us_per_event']:.1f} us awaited in turn"
        f" ({rep['awaited_over_pipelined']:.1f}x)"
    )


if __name__ == "__main__":
    main()
