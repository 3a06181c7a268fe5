"""Load and soak against a real tokencaked over loopback ipc: nothing lost, nothing leaked.

Load (default): ``--clients`` concurrent DEALER clients (64) spread over a few worker
processes send ``--events`` requests in all (1,000,000): agent events (register_app,
llm_call_start/finish, tool_call_start/end, app_end) and KV ops (lookup, reserve, commit,
load_begin, load_end, drop), each client with up to ``--window`` requests in flight. Every
request id is tracked: a reply for an id never sent, a second reply, or a request left
without a reply is counted, and the run fails unless all three are 0. The daemon's own
event counter must equal the number of requests sent. Prints p50/p99/p99.9 round-trip
latency (send to reply, including queueing behind the client's window).

Soak (``--soak-seconds N``): the same traffic, rate-limited (``--soak-rate`` requests/s in
all), for N seconds; the daemon's RSS (anonymous and total) and open descriptors are sampled
every ``--sample-s`` seconds. Prints the RSS slope (least squares, after a warm-up) and the
descriptor count at start and end.

Bounded: the socket is a private ipc path under a temp dir (no TCP, nothing leaves the
host), ``--events`` is capped at 10M and ``--soak-seconds`` at 2 h, and every wait has a
deadline.

    python bench/bench_load.py [--clients 64] [--events 1000000]
    python bench/bench_load.py --soak-seconds 600 [--soak-rate 3000]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq

from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.clients.launcher import daemon_flags, launch
from tokencake.daemon.config import ConfigError, load_config
from tokencake.daemon.memwatch import proc_status
from tokencake.layout import KvLayout

LAYOUT = KvLayout("bench-load", 1, 16, 1, 16, "float16", 1024)
MAX_EVENTS = 10_000_000
MAX_SOAK_S = 7200.0
REPLY_DEADLINE_S = 30.0

Step = Generator[tuple[bytes, bool], "p.ReplyEnvelope | None", None]


@dataclass
class ClientStats:
    sent: int = 0
    replied: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    unknown_ids: int = 0
    duplicates: int = 0
    pushes: int = 0
    not_accepted: int = 0
    lost: int = 0
    error_samples: list[str] = field(default_factory=list)


def _workload(client: str, engine_id: str, ids: list[int], fresh_names: bool = False) -> Step:
    """An endless cycle of one agent's life plus a store and a load, as request frames.

    Yields ``(frame, needs_reply)``; when ``needs_reply`` the driver sends the frame's reply
    back in (the next step depends on it: commit needs the reserved slots). With
    ``fresh_names`` each app names its agent type and tool kind anew (as frameworks that
    name them per instance do), so the daemon's tables keyed by them are put to the test.
    """
    reserve_dec = msgspec.msgpack.Decoder(p.ReserveReply)
    load_dec = msgspec.msgpack.Decoder(p.LoadBeginReply)
    dag = p.AppDag(nodes=[p.DagNode("agent", expected_tool_s=2.0)])
    kind = "search"
    salt = f"tenant-{client}"
    gen = 0

    def frame(req: p.Request) -> bytes:
        ids[0] += 1
        return p.encode_request(req, ids[0])

    while True:
        gen += 1
        app = f"{client}-app{gen}"
        hashes = [f"{client}/{gen}/{i}".encode() for i in range(4)]
        if fresh_names:
            kind = f"search-{app}"
            node = p.DagNode("agent", agent_type=f"type-{app}", expected_tool_s=2.0)
            dag = p.AppDag(nodes=[node])
        yield frame(p.RegisterApp(app, dag, tenant=salt)), False
        yield frame(p.LlmCallStart(app, "agent", engine_id, f"r{gen}", 256)), False
        yield frame(p.LlmCallFinish(app, "agent", f"r{gen}", 32, 8)), False
        yield frame(p.ToolCallStart(app, "agent", kind, 2.0, f"c{gen}")), False
        yield frame(p.ToolCallEnd(app, "agent", f"c{gen}")), False
        yield frame(p.Lookup(engine_id, hashes, salt)), False
        env = yield frame(p.Reserve(engine_id, hashes, salt, app, "agent")), True
        slots = (
            [s for s in reserve_dec.decode(env.body).slots if s >= 0]
            if env is not None and env.ok
            else []
        )
        yield frame(p.Commit(engine_id, slots)), False
        env = yield frame(p.LoadBegin(engine_id, hashes, salt, app, "agent")), True
        pinned = load_dec.decode(env.body).slots if env is not None and env.ok else []
        yield frame(p.LoadEnd(engine_id, pinned)), False
        yield frame(p.Drop(engine_id, hashes, salt)), False
        yield frame(p.AppEnd(app)), False


class _Client:
    """One DEALER socket with its own workload and in-flight bookkeeping."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        name: str,
        engine_id: str,
        fresh_names: bool = False,
    ) -> None:
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = [0]
        self.steps = _workload(name, engine_id, self.ids, fresh_names)
        self.inflight: dict[int, int] = {}
        self.waiting_for: int | None = None  # a request whose reply the next step needs
        self.feed: p.ReplyEnvelope | None = None
        self.next: tuple[bytes, bool] | None = next(self.steps)
        self.stats = ClientStats()


class _Driver:
    """One worker's clients: sends under the window, the quota and the rate; takes replies."""

    def __init__(
        self,
        ctx: zmq.Context[Any],
        endpoint: str,
        names: list[str],
        engine_id: str,
        per_client: int,
        window: int,
        rate: float,
    ) -> None:
        self.clients = [_Client(ctx, endpoint, name, engine_id) for name in names]
        self.poller = zmq.Poller()
        self.by_sock: dict[Any, _Client] = {}
        for c in self.clients:
            self.poller.register(c.sock, zmq.POLLIN)
            self.by_sock[c.sock] = c
        self.per_client, self.window, self.rate = per_client, window, rate
        self.ack_dec = msgspec.msgpack.Decoder(p.EventAck)
        self.latencies = np.empty(
            per_client * len(self.clients) if per_client else 1 << 22, dtype=np.float64
        )
        self.nlat = 0
        self.sent_total = 0
        self.end_at: float | None = None
        self.last_progress = time.monotonic()

    def quota_left(self, c: _Client) -> bool:
        if self.end_at is not None:
            return time.monotonic() < self.end_at
        return c.stats.sent < self.per_client

    def send_pass(self, turn: int, allowed: int) -> None:
        """One pass over the clients, starting at ``turn``. Rotating who goes first, and
        under a rate limit letting each client send at most one request per pass, keeps
        the first clients from taking the whole budget while the last ones starve past
        their slot leases."""
        clients = self.clients
        for c in clients[turn:] + clients[:turn]:
            burst = 1 if self.rate > 0 else self.window
            while (
                burst > 0
                and c.next is not None
                and c.waiting_for is None
                and len(c.inflight) < self.window
                and self.sent_total < allowed
                and self.quota_left(c)
            ):
                frame, needs_reply = c.next
                rid = c.ids[0]
                c.sock.send(frame)
                c.inflight[rid] = time.perf_counter_ns()
                c.stats.sent += 1
                self.sent_total += 1
                burst -= 1
                if needs_reply:
                    c.waiting_for = rid
                    c.next = None
                else:
                    c.next = c.steps.send(None)

    def receive(self, c: _Client) -> None:
        """Every reply waiting on the client's socket: timed, checked and counted."""
        while True:
            try:
                raw = c.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            t1 = time.perf_counter_ns()
            self.last_progress = time.monotonic()
            env = p.decode_reply_envelope(raw)
            if env.id == 0:
                c.stats.pushes += 1
                continue
            t0 = c.inflight.pop(env.id, None)
            if t0 is None:
                if 0 < env.id <= c.ids[0]:
                    c.stats.duplicates += 1
                else:
                    c.stats.unknown_ids += 1
                continue
            c.stats.replied += 1
            self._latency((t1 - t0) / 1e9)
            if not env.ok:
                code = env.error.code if env.error else "?"
                c.stats.errors[code] = c.stats.errors.get(code, 0) + 1
                if len(c.stats.error_samples) < 3 and env.error is not None:
                    c.stats.error_samples.append(f"{env.op}: {env.error.message}")
            elif env.op in p.AGENT_EVENT_OPS and not self.ack_dec.decode(env.body).accepted:
                c.stats.not_accepted += 1
            if env.id == c.waiting_for:
                c.waiting_for = None
                c.next = c.steps.send(env)

    def _latency(self, seconds: float) -> None:
        if self.nlat == len(self.latencies):
            self.latencies = np.resize(self.latencies, 2 * len(self.latencies))
        self.latencies[self.nlat] = seconds
        self.nlat += 1

    def run(self, seconds: float) -> float:
        """Until every client's quota is sent and answered (or ``seconds`` passed, or no
        reply came for ``REPLY_DEADLINE_S``); the seconds it ran."""
        t_start = time.monotonic()
        self.end_at = t_start + seconds if seconds else None
        turn = 0
        while True:
            now = time.monotonic()
            allowed = sys.maxsize if self.rate <= 0 else int((now - t_start) * self.rate) + 1
            turn = (turn + 1) % len(self.clients)
            self.send_pass(turn, allowed)
            busy = [c for c in self.clients if c.inflight]
            if not busy and all(not self.quota_left(c) for c in self.clients):
                break
            if time.monotonic() - self.last_progress > REPLY_DEADLINE_S:
                break  # requests left in flight are counted as lost
            for sock, _ in self.poller.poll(5 if self.rate > 0 else 100):
                self.receive(self.by_sock[sock])
        for c in self.clients:
            c.stats.lost = len(c.inflight)
            c.sock.close(linger=0)
        return time.monotonic() - t_start


def _drive(
    endpoint: str,
    worker: int,
    names: list[str],
    per_client: int,
    window: int,
    rate: float,
    seconds: float,
    out: mp.Queue[Any],
) -> None:
    """Run one worker's clients to their quota (or for ``seconds``, at ``rate`` req/s)."""
    ctx: zmq.Context[Any] = zmq.Context()
    # Each worker registers one engine; its first client's socket receives the pushes.
    with TokenCakeClient(endpoint, timeout_s=10.0, context=ctx) as setup:
        engine_id = setup.call(p.RegisterEngine(f"load-engine-{worker}", LAYOUT, 4096)).engine_id
    driver = _Driver(ctx, endpoint, names, engine_id, per_client, window, rate)
    wall = driver.run(seconds)
    out.put(
        (
            worker,
            driver.latencies[: driver.nlat].tobytes(),
            [msgspec.to_builtins(c.stats) for c in driver.clients],
            wall,
        )
    )
    ctx.term()


# ---------------------------------------------------------------------- daemon process


def arena_size(text: str) -> str:
    """``--arena-bytes``, checked by the daemon's own config rules before it is started."""
    try:
        load_config(environ={}, flags={"arena_bytes": text})
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM (the daemon's clean stop), SIGKILL after 15 s."""
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _start_daemon(tmp: Path, arena: str) -> tuple[subprocess.Popen[bytes], str]:
    daemon = launch(
        *daemon_flags(arena=arena, log_text=False, log_level="WARNING"),
        endpoint=f"ipc://{tmp}/tokencaked.sock",
        instance=f"benchload{os.getpid()}",
        log_path=tmp / "daemon.log",
        inherit_settings=True,
        timeout_s=30,
    )
    return daemon.proc, daemon.endpoint


def slope_per_min(ts: list[float], ys: list[float]) -> float:
    if len(ts) < 2:
        return 0.0
    return float(np.polyfit(np.asarray(ts) / 60.0, np.asarray(ys), 1)[0])


def _run_workers(
    endpoint: str,
    clients: int,
    workers: int,
    per_client: int,
    window: int,
    rate: float,
    seconds: float,
    on_tick: Any = None,
) -> tuple[np.ndarray, list[dict[str, Any]], float]:
    mpctx = mp.get_context("spawn")
    q: mp.Queue[Any] = mpctx.Queue()
    names = [f"c{i:03d}" for i in range(clients)]
    groups = [names[w::workers] for w in range(workers)]
    procs = [
        mpctx.Process(
            target=_drive,
            args=(endpoint, w, g, per_client, window, rate / workers, seconds, q),
        )
        for w, g in enumerate(groups)
    ]
    t0 = time.perf_counter()
    for proc in procs:
        proc.start()
    results: list[Any] = []
    deadline = time.monotonic() + (seconds or 0) + 1800
    while len(results) < len(procs):
        if on_tick is not None:
            on_tick()
        try:
            results.append(q.get(timeout=1.0))
        except Exception:
            if time.monotonic() > deadline:
                raise SystemExit("workers did not finish in time") from None
            if any(pr.exitcode not in (None, 0) for pr in procs):
                raise SystemExit("a worker process died") from None
    # Throughput over the workers' own sending time (process spawn and imports left out).
    wall = max(r[3] for r in results) if results else time.perf_counter() - t0
    for proc in procs:
        proc.join(30)
    lat = np.concatenate([np.frombuffer(r[1], dtype=np.float64) for r in results])
    stats = [s for r in results for s in r[2]]
    return lat, stats, wall


def _summarise(stats: list[dict[str, Any]]) -> dict[str, Any]:
    errors: dict[str, int] = {}
    for s in stats:
        for k, v in s["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {
        "sent": sum(s["sent"] for s in stats),
        "replied": sum(s["replied"] for s in stats),
        "lost": sum(s["lost"] for s in stats),
        "duplicates": sum(s["duplicates"] for s in stats),
        "unknown_ids": sum(s["unknown_ids"] for s in stats),
        "pushes": sum(s["pushes"] for s in stats),
        "not_accepted": sum(s["not_accepted"] for s in stats),
        "errors": errors,
        "error_samples": [m for s in stats for m in s["error_samples"]][:5],
    }


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--workers", type=int, default=4, help="client processes")
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--window", type=int, default=4, help="requests in flight per client")
    ap.add_argument("--arena-bytes", type=arena_size, default="64MiB")
    ap.add_argument("--soak-seconds", type=float, default=0.0)
    ap.add_argument("--soak-rate", type=float, default=3000.0, help="requests/s in all")
    ap.add_argument("--sample-s", type=float, default=5.0)
    ap.add_argument("--warmup-s", type=float, default=60.0, help="left out of the RSS slope")
    args = ap.parse_args()
    if not 0 < args.events <= MAX_EVENTS:
        ap.error(f"--events must be within 1..{MAX_EVENTS}")
    if not 0 <= args.soak_seconds <= MAX_SOAK_S:
        ap.error(f"--soak-seconds must be within 0..{MAX_SOAK_S:.0f}")
    if not 1 <= args.clients <= 1024 or not 1 <= args.workers <= args.clients:
        ap.error("--clients must be within 1..1024 and --workers within 1..clients")
    if args.window < 1 or args.soak_rate <= 0 or args.sample_s <= 0:
        ap.error("--window must be >= 1, --soak-rate and --sample-s > 0")
    return args


class _Sampler:
    """The daemon's RSS, anonymous RSS and open descriptors, every ``every_s`` at most."""

    def __init__(self, pid: int, every_s: float) -> None:
        self.pid, self.every_s = pid, every_s
        self.samples: list[tuple[float, int, int, int]] = []
        self.t_begin = time.monotonic()
        self.next_at = self.t_begin

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self.next_at:
            st = proc_status(self.pid)
            self.samples.append((now - self.t_begin, st["rss_kib"], st["anon_kib"], st["fds"]))
            self.next_at = now + self.every_s


@dataclass
class _Run:
    lat: np.ndarray
    stats: list[dict[str, Any]]
    wall: float
    daemon_events: int
    """What the daemon saw during the run: less the closing stats call and the workers'
    register_engine calls, it must be exactly what was sent."""
    daemon_alive: bool


def _run(args: argparse.Namespace, endpoint: str, sampler: _Sampler) -> _Run:
    sampler.tick()
    with TokenCakeClient(endpoint, timeout_s=10.0) as c:
        events_before = sum(c.call(p.Stats()).events.values())
    if args.soak_seconds:
        lat, stats, wall = _run_workers(
            endpoint,
            args.clients,
            args.workers,
            0,
            args.window,
            args.soak_rate,
            args.soak_seconds,
            sampler.tick,
        )
        time.sleep(1.0)
        sampler.next_at = 0.0
        sampler.tick()
    else:
        per_client = args.events // args.clients
        lat, stats, wall = _run_workers(
            endpoint, args.clients, args.workers, per_client, args.window, 0.0, 0.0, sampler.tick
        )
    with TokenCakeClient(endpoint, timeout_s=10.0) as c:
        daemon_stats = c.call(p.Stats())
        daemon_alive = c.call(p.Ping()).uptime_s > 0
    daemon_events = sum(daemon_stats.events.values()) - events_before - 1 - args.workers
    return _Run(lat, stats, wall, daemon_events, daemon_alive)


def _print_load(args: argparse.Namespace, s: dict[str, Any], run: _Run) -> None:
    mode = (
        f"soak {args.soak_seconds:.0f} s at {args.soak_rate:.0f} req/s"
        if args.soak_seconds
        else "load"
    )
    print(
        f"tokencaked {mode}: {args.clients} clients in {args.workers} processes, "
        f"window {args.window}"
    )
    print(f"{'requests sent':<40}{s['sent']:>14,}")
    print(f"{'replies received (one per request)':<40}{s['replied']:>14,}")
    print(f"{'requests seen by the daemon':<40}{run.daemon_events:>14,}")
    print(f"{'lost (no reply)':<40}{s['lost']:>14,}")
    print(f"{'duplicate replies':<40}{s['duplicates']:>14,}")
    print(f"{'replies for unknown ids':<40}{s['unknown_ids']:>14,}")
    print(f"{'decision pushes received':<40}{s['pushes']:>14,}")
    print(f"{'events not accepted (state)':<40}{s['not_accepted']:>14,}")
    print(f"{'error replies':<40}{sum(s['errors'].values()):>14,}  {s['errors'] or ''}")
    for sample in s["error_samples"]:
        print(f"  e.g. {sample}")
    print(f"{'wall (s)':<40}{run.wall:>14.1f}")
    print(f"{'throughput (req/s)':<40}{s['replied'] / run.wall:>14,.0f}")
    for label, q in (("p50", 50), ("p99", 99), ("p99.9", 99.9)):
        print(f"{'latency ' + label + ' (us)':<40}{np.percentile(run.lat, q) * 1e6:>14.1f}")
    print(f"{'latency max (us)':<40}{run.lat.max() * 1e6:>14.1f}")


def _print_soak(args: argparse.Namespace, samples: list[tuple[float, int, int, int]]) -> None:
    ts = [x[0] for x in samples]
    warm = [x for x in samples if x[0] >= args.warmup_s] or samples
    rss_slope = slope_per_min([x[0] for x in warm], [x[1] for x in warm])
    anon_slope = slope_per_min([x[0] for x in warm], [x[2] for x in warm])
    print(f"{'samples':<40}{len(samples):>14}  (every {args.sample_s:.0f} s)")
    print(f"{'RSS start / end (KiB)':<40}{f'{samples[0][1]} / {samples[-1][1]}':>14}")
    print(f"{'RssAnon start / end (KiB)':<40}{f'{samples[0][2]} / {samples[-1][2]}':>14}")
    full_slope = slope_per_min(ts, [x[1] for x in samples])
    print(f"{'RSS slope, whole run (KiB/min)':<40}{full_slope:>14.2f}")
    label = f"RSS slope after {args.warmup_s:.0f} s (KiB/min)"
    print(f"{label:<40}{rss_slope:>14.2f}")
    print(f"{'RssAnon slope (KiB/min)':<40}{anon_slope:>14.2f}")
    print(f"{'open fds start / end':<40}{f'{samples[0][3]} / {samples[-1][3]}':>14}")
    print(f"{'sampled over (s)':<40}{(ts[-1] if ts else 0):>14.0f}")


def main() -> None:
    args = _args()
    tmp = Path(tempfile.mkdtemp(prefix="tcload-"))
    proc, endpoint = _start_daemon(tmp, args.arena_bytes)
    sampler = _Sampler(proc.pid, args.sample_s)
    try:
        run = _run(args, endpoint, sampler)
    finally:
        _stop_daemon(proc)
    s = _summarise(run.stats)
    _print_load(args, s, run)
    if args.soak_seconds:
        _print_soak(args, sampler.samples)
    ok = (
        s["lost"] == 0
        and s["duplicates"] == 0
        and s["unknown_ids"] == 0
        and s["replied"] == s["sent"]
        and run.daemon_events == s["sent"]
        and run.daemon_alive
    )
    print("verdict: " + ("every request got exactly one reply" if ok else "FAILED"))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
