"""Control-plane benchmark: event round trip and sustained event rate through tokencaked.

Both figures are measured against a baseline in the same run:

1. p50 round trip of one agent event through the daemon vs a bare pyzmq ROUTER echo
   server on the same kind of socket (target: <= 1.5x);
2. agent events per second sustained by 8 concurrent client processes (target: >= 20,000/s
   on a 2-core machine), every request answered exactly once.

    python bench/bench_control_plane.py [--round-trips 20000] [--events 200000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import zmq

from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.clients.launcher import daemon_flags, spawn

ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.bind(sys.argv[1])
while True:
    s.send_multipart(s.recv_multipart())
"""

DAG = p.AppDag(nodes=[p.DagNode(f"a{i}", expected_tool_s=2.0) for i in range(64)])


def _event_frames(app_id: str, agent: str, n: int) -> list[bytes]:
    """Alternating tool_call_start / tool_call_end for one agent: each is accepted."""
    frames = []
    for i in range(n):
        req: p.Request
        if i % 2 == 0:
            req = p.ToolCallStart(app_id, agent, "search", 2.0, f"c{i}")
        else:
            req = p.ToolCallEnd(app_id, agent, f"c{i - 1}")
        frames.append(p.encode_request(req, i + 1))
    return frames


def round_trips(endpoint: str, frames: list[bytes]) -> list[float]:
    """Synchronous round trips of pre-encoded frames; seconds each."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    out = []
    try:
        for _ in range(200):  # warm-up
            sock.send(frames[0])
            sock.recv()
        for frame in frames:
            t0 = time.perf_counter()
            sock.send(frame)
            sock.recv()
            out.append(time.perf_counter() - t0)
    finally:
        sock.close()
        ctx.term()
    return out


def _client_worker(
    endpoint: str, app_id: str, agent: str, n: int, window: int, q: mp.Queue
) -> None:
    frames = _event_frames(app_id, agent, n)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sent = received = errors = 0
    decoder = msgspec.msgpack.Decoder(p.ReplyEnvelope)
    seen: set[int] = set()
    t0 = time.perf_counter()
    while received < n:
        while sent < n and sent - received < window:
            sock.send(frames[sent])
            sent += 1
        env = decoder.decode(sock.recv())
        received += 1
        if env.id in seen:
            errors += 1
        seen.add(env.id)
        if not env.ok:
            errors += 1
    elapsed = time.perf_counter() - t0
    sock.close()
    ctx.term()
    q.put((received, errors, len(seen), elapsed))


def sustained_rate(endpoint: str, clients: int, events: int, window: int) -> tuple[float, int, int]:
    with TokenCakeClient(endpoint) as c:
        c.call(p.RegisterApp("bench-rate", DAG))
    per = events // clients
    per -= per % 2
    q: mp.Queue[tuple[int, int, int, float]] = mp.Queue()
    procs = [
        mp.Process(target=_client_worker, args=(endpoint, "bench-rate", f"a{i}", per, window, q))
        for i in range(clients)
    ]
    t0 = time.perf_counter()
    for proc in procs:
        proc.start()
    results = [q.get(timeout=600) for _ in procs]
    wall = time.perf_counter() - t0
    for proc in procs:
        proc.join()
    total = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    unique = sum(r[2] for r in results)
    return total / wall, errors, total - unique


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--round-trips", type=int, default=20000)
    ap.add_argument("--events", type=int, default=200000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--window", type=int, default=8, help="requests in flight per client")
    args = ap.parse_args()
    if min(args.round_trips, args.events, args.clients, args.window) < 1:
        ap.error("--round-trips, --events, --clients and --window must be >= 1")

    tmp = Path(tempfile.mkdtemp(prefix="tcbench-"))
    echo_ep = f"ipc://{tmp}/echo.sock"
    daemon_ep = f"ipc://{tmp}/daemon.sock"
    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, echo_ep])
    daemon = spawn(
        *daemon_flags(arena="16MiB", log_text=False, log_level="WARNING"),
        endpoint=daemon_ep,
        instance=f"bench{os.getpid()}",
        workdir=tmp,
        inherit_settings=True,
    )
    try:
        daemon.wait_ready(30)
        time.sleep(0.2)
        with TokenCakeClient(daemon_ep) as c:
            c.call(p.RegisterApp("bench-rt", DAG))
        frames = _event_frames("bench-rt", "a0", args.round_trips)
        echo_rt = round_trips(echo_ep, frames)
        daemon_rt = round_trips(daemon_ep, frames)
        # Interleave a second pass of each to even out machine noise.
        echo_rt += round_trips(echo_ep, frames)
        daemon_rt += round_trips(daemon_ep, frames)
        e50, d50 = statistics.median(echo_rt), statistics.median(daemon_rt)
        e99 = statistics.quantiles(echo_rt, n=100)[98]
        d99 = statistics.quantiles(daemon_rt, n=100)[98]
        rate, errors, dup = sustained_rate(daemon_ep, args.clients, args.events, args.window)
        with TokenCakeClient(daemon_ep) as c:
            stats = c.call(p.Stats())
    finally:
        daemon.stop()
        echo.kill()
        echo.wait(10)

    print(f"{'metric':<44}{'value':>14}{'target':>12}")
    print(f"{'bare ROUTER echo p50 (us)':<44}{e50 * 1e6:>14.1f}")
    print(f"{'bare ROUTER echo p99 (us)':<44}{e99 * 1e6:>14.1f}")
    print(f"{'tokencaked event round trip p50 (us)':<44}{d50 * 1e6:>14.1f}")
    print(f"{'tokencaked event round trip p99 (us)':<44}{d99 * 1e6:>14.1f}")
    ratio = d50 / e50
    verdict = "MET" if ratio <= 1.5 else "MISSED"
    print(f"{'p50 ratio daemon / echo':<44}{ratio:>14.2f}{'<= 1.50':>12}  {verdict}")
    label = f"events/s, {args.clients} clients x window {args.window}"
    verdict = "MET" if rate >= 20000 else "MISSED"
    print(f"{label:<44}{rate:>14,.0f}{'>= 20,000':>12}  {verdict}")
    print(f"{'error replies / duplicate replies':<44}{f'{errors} / {dup}':>14}")
    print(f"{'daemon-side error count':<44}{sum(stats.errors.values()):>14}")


if __name__ == "__main__":
    main()
