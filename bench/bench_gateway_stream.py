"""Streaming throughput through a proxy against direct, timed in adjacent pairs.

Part of ``bench_gateway.py`` (which starts the processes and calls ``stream_pairs``).

Why pairs. On the 2-core test machine the stub engine fills one core; the proxy, the client
and a gateway's daemon share the other with whatever else runs, and that load moves by tens
of percent within a second. Rates summed over rounds of a few streams per target spread
0.84-1.14 of direct for a plain aiohttp proxy (``docs/benchmarks.md``, Gateway). Here every
stream through a proxy is timed next to a direct stream of the same size: the pair's order
alternates (direct first in even pairs, the proxy first in odd ones), the proxies take turns,
and a proxy's figure is the median of its pairs' ratios (direct's time over the proxy's),
with the quartiles and a bootstrap 95 % interval of the median. Load that changes more
slowly than a pair (~30 ms) cancels out of each ratio; what is left is spread, which the
median and its interval summarise.

Beside it, CPU: each stream's CPU on each path, from the threads' ``schedstat`` run time:
the stub engine's and the client's around each stream, a proxy's and its daemon's over the
phase per stream it relayed (a proxy reads a stream after the client has it, so a delta
around the stream would miss that). A daemon's CPU is counted net of its idle rate, measured
just before (its timers tick whether a gateway reports or not). ``cpu_ratio`` is the
throughput if CPU were the only limit, every process of the path on one CPU: direct's CPU
per stream (stub and client) over the path's (stub, proxy, its daemon, client).
``relay_cpu_vs_plain`` is the plain proxy's CPU per stream over this proxy's and its
daemon's: its relay capacity per core against the cheapest aiohttp proxy. On a VM, CPU time
includes time the host did not run the thread: every process's figure rises together when
the host is busy, so the ratios within a run are what to compare.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

MODEL = "stub"
DAEMONS = {"daemon": "gateway", "baseline_daemon": "baseline"}
"""Each daemon and the gateway that reports to it."""
BOOTSTRAP = 2000
IDLE_S = 1.0


def process_cpu_s(pid: int) -> float:
    """CPU seconds of process ``pid`` so far (Linux /proc): the run time of its threads in
    nanoseconds (``schedstat``), else user plus system time in clock ticks (10 ms: too
    coarse for a phase of a few seconds)."""
    total = 0
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError):  # a thread that has just ended
                total += int(Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        total = 0
    if total:
        return total / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rotations(names: list[str], i: int) -> list[str]:
    """``names`` rotated by ``i``: each target goes first, second... equally often."""
    k = i % len(names)
    return names[k:] + names[:k]


async def _stream(http: aiohttp.ClientSession, url: str, chunks: int) -> int:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "stream"}], "stream": True}
    size = 0
    headers = {"X-Chunks": str(chunks)}
    async with http.post(f"{url}/v1/chat/completions", json=body, headers=headers) as r:
        async for data in r.content.iter_any():
            size += len(data)
    return size


@dataclass
class _Path:
    """One target's streams: times, and the CPU measured around each."""

    wall_s: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    """Proxies only: direct's time over this target's, per pair."""
    stub_s: float = 0.0
    client_s: float = 0.0
    size: int = 0

    async def timed(
        self, http: aiohttp.ClientSession, url: str, chunks: int, stub_pid: int
    ) -> float:
        stub, client = process_cpu_s(stub_pid), time.thread_time()
        t = time.perf_counter()
        size = await _stream(http, url, chunks)
        took = time.perf_counter() - t
        self.client_s += time.thread_time() - client
        self.stub_s += process_cpu_s(stub_pid) - stub
        if self.size and size != self.size:
            raise SystemExit(f"{url}: a stream of {size} bytes, before {self.size}")
        self.size = size
        self.wall_s.append(took)
        return took


def spread(ratios: list[float], seed: int = 0) -> dict[str, Any]:
    """The median of ``ratios``, its quartiles, a bootstrap 95 % interval of the median
    (``BOOTSTRAP`` resamples, seeded: the same ratios give the same interval) and the
    share under 0.95."""
    rng = random.Random(seed)
    n = len(ratios)
    medians = sorted(statistics.median(rng.choices(ratios, k=n)) for _ in range(BOOTSTRAP))
    q = statistics.quantiles(ratios, n=4) if n > 1 else [ratios[0]] * 3
    return {
        "median": round(statistics.median(ratios), 4),
        "q25": round(q[0], 4),
        "q75": round(q[2], 4),
        "ci95": [
            round(medians[int(0.025 * BOOTSTRAP)], 4),
            round(medians[int(0.975 * BOOTSTRAP)], 4),
        ],
        "under_0.95": round(sum(r < 0.95 for r in ratios) / n, 3),
        "pairs": n,
    }


async def _idle_rates(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds per second of each daemon at rest."""
    daemons = [d for d in DAEMONS if d in pids]
    before = {d: process_cpu_s(pids[d]) for d in daemons}
    t = time.perf_counter()
    await asyncio.sleep(IDLE_S)
    took = time.perf_counter() - t
    return {d: (process_cpu_s(pids[d]) - before[d]) / took for d in daemons}


async def stream_pairs(
    urls: dict[str, str], pids: dict[str, int], pairs: int, chunks: int
) -> dict[str, Any]:
    """``pairs`` pairs per proxy (``urls`` but ``direct``) of a ``chunks``-event stream
    through it and one direct, adjacent; ``pids``: the stub's (``stub``), each proxy's by
    its name, each daemon's (``DAEMONS``)."""
    proxies = [name for name in urls if name != "direct"]
    paths = {name: _Path() for name in urls}
    idle = await _idle_rates(pids)
    watched = [name for name in pids if name != "stub"]
    async with aiohttp.ClientSession() as http:
        for name in urls:  # connections made, code paths warm
            await _stream(http, urls[name], chunks)
        before = {name: process_cpu_s(pids[name]) for name in watched}
        t0 = time.perf_counter()
        for i in range(pairs):
            for name in rotations(proxies, i):
                order = ["direct", name] if i % 2 == 0 else [name, "direct"]
                took = {}
                for target in order:
                    took[target] = await paths[target].timed(
                        http, urls[target], chunks, pids["stub"]
                    )
                paths[name].ratios.append(took["direct"] / took[name])
        phase_s = time.perf_counter() - t0
    used = {name: process_cpu_s(pids[name]) - before[name] for name in watched}
    return _figures(paths, proxies, used, idle, phase_s)


def _figures(
    paths: dict[str, _Path],
    proxies: list[str],
    used: dict[str, float],
    idle: dict[str, float],
    phase_s: float,
) -> dict[str, Any]:
    def ms(s: float, n: int) -> float:
        return round(s / n * 1e3, 3)

    direct = paths["direct"]
    nd = len(direct.wall_s)
    direct_cpu = {"stub": ms(direct.stub_s, nd), "client": ms(direct.client_s, nd)}
    out: dict[str, Any] = {
        "phase_s": round(phase_s, 2),
        "stream_bytes": direct.size,
        "direct": {"wall_ms_median": round(statistics.median(direct.wall_s) * 1e3, 3)},
        "cpu_ms_per_stream": {"direct": direct_cpu},
    }
    for name in proxies:
        path = paths[name]
        n = len(path.wall_s)
        cpu = {"stub": ms(path.stub_s, n), "client": ms(path.client_s, n)}
        cpu["proxy"] = ms(used[name], n)
        for daemon, gateway in DAEMONS.items():
            if gateway == name and daemon in used:
                cpu["daemon"] = ms(max(used[daemon] - idle[daemon] * phase_s, 0.0), n)
                cpu["daemon_gross"] = ms(used[daemon], n)
        out["cpu_ms_per_stream"][name] = cpu
        path_cpu = cpu["stub"] + cpu["proxy"] + cpu.get("daemon", 0.0) + cpu["client"]
        out[name] = {
            **spread(path.ratios),
            "ratios": [round(r, 4) for r in path.ratios],
            "cpu_ratio": round(sum(direct_cpu.values()) / path_cpu, 4),
        }
    if "plain" in proxies:
        plain = out["cpu_ms_per_stream"]["plain"]["proxy"]
        for name in proxies:
            own = out["cpu_ms_per_stream"][name]
            out[name]["relay_cpu_vs_plain"] = round(
                plain / (own["proxy"] + own.get("daemon", 0.0)), 4
            )
    return out
