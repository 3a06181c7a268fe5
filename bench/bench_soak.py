"""Soak tokencaked for up to two hours with engines and apps coming and going: is memory flat?

One driver process talks to a real tokencaked over a private ipc socket, at ``--rate``
requests/s in all:

- ``--engines`` engine sessions, each a DEALER socket that registers an engine, heartbeats
  every second with a GPU pool under pressure (so the scheduler pushes offload and upload
  decisions, which the session reads); from ``--engine-life-s`` on, one engine drawn at
  random every ``--engine-life-s / --engines`` seconds goes away and comes back on a new
  socket under the same name (as a restarted vLLM does), or, every other time, unregisters
  first; the daemon drops its policy, and a new one starts;
- ``--clients`` app clients, each a DEALER socket running agent lives (register_app, LLM
  and tool calls, app_end) with a store and a load each (lookup, reserve, commit,
  load_begin, load_end, drop) against a live engine; after a random ``--client-life``
  requests (200..2,000) a client waits for its replies, closes its socket and a new client
  with a new name takes its place. It leaves wherever it is, mid-app, as a crashed agent
  does: its app gets no ``app_end`` and its reservations no commit, so the daemon must end
  the app (``app_idle_timeout_s``, ``--app-idle-s``) and reclaim the leases itself. With
  ``--fresh-names`` that share of the clients names each app's agent type and tool kind
  anew, so the policy's tables keyed by those names are put to the test.

The daemon runs with ``debug_memory_file`` (tracemalloc on; ``--no-tracemalloc`` keeps the
reports but leaves the traces, whose own memory would count in RSS, out) and reports every
``--sample-s``, glibc's ``mallinfo2`` included; the driver samples the daemon's RSS, RssAnon,
open descriptors and sockets from /proc at the same pace. At the end it prints the slopes
(least squares, after ``--warmup-min``) of RSS, RssAnon, the traced Python heap and
descriptors, the allocation sites that grew most after the warm-up, and the verdict:
every request answered exactly once, the daemon up, and RSS growing under
``--target-kib-min`` (10 KiB/min). ``--plot`` writes the memory lines as a PNG.

Bounded: ipc under a temp dir (nothing leaves the host), ``--minutes`` at most 120, every
wait has a deadline.

    python bench/bench_soak.py --minutes 60 --rate 600 --no-tracemalloc --plot soak.png

(At ``nice -n 10`` on a loaded box the driver starved its engines' heartbeats once; nice 5 at
most.) The daemon inherits the environment, so ``MALLOC_ARENA_MAX`` reaches it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import zmq

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench_load import LAYOUT, _Client, _start_daemon, _stop_daemon, arena_size  # noqa: E402
from soak_report import (  # noqa: E402
    Sample,
    collector_rows,
    growth_sites,
    memory_reports,
    plot,
    report_rows,
    slopes,
)

from tokencake import protocol as p  # noqa: E402
from tokencake.clients.client import TokenCakeClient  # noqa: E402
from tokencake.daemon.memwatch import proc_status  # noqa: E402

MAX_MINUTES = 120.0
REPLY_DEADLINE_S = 30.0
GPU_BLOCKS = 512
_register_dec = msgspec.msgpack.Decoder(p.RegisterEngineReply)


@dataclass
class Totals:
    sent: int = 0
    replied: int = 0
    lost: int = 0
    duplicates: int = 0
    unknown_ids: int = 0
    pushes: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    clients_started: int = 0
    engine_restarts: int = 0


class _EngineSession:
    """An engine's link: register, heartbeat, read pushes; restarted on a new socket."""

    def __init__(self, ctx: zmq.Context[Any], endpoint: str, name: str, totals: Totals) -> None:
        self.ctx, self.endpoint, self.name, self.totals = ctx, endpoint, name, totals
        self.sock: zmq.Socket[Any] | None = None
        self.engine_id = ""
        self.ids = 0
        self.generation = 0
        self.next_beat = 0.0
        self.inflight: set[int] = set()

    def connect(self, rng: random.Random) -> None:
        """(Re)register on a fresh socket; every other restart unregisters first."""
        if self.sock is not None:
            if self.generation % 2 == 0:
                self._call(p.UnregisterEngine(self.engine_id))
            self.drain()
            self.sock.close(linger=0)
            self.totals.engine_restarts += 1
        self.generation += 1
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(self.endpoint)
        env = self._call(p.RegisterEngine(self.name, LAYOUT, GPU_BLOCKS))
        if env is None or not env.ok:
            raise SystemExit(f"engine {self.name} could not register: {env}")
        self.engine_id = _register_dec.decode(env.body).engine_id

    def _call(self, req: p.Request) -> p.ReplyEnvelope | None:
        """Send and wait for this request's reply (pushes read meanwhile are counted)."""
        assert self.sock is not None
        rid = self.send(req)
        deadline = time.monotonic() + REPLY_DEADLINE_S
        while time.monotonic() < deadline:
            env = self.recv(timeout_ms=200)
            if env is not None and env.id == rid:
                return env
        self.totals.lost += 1
        return None

    def send(self, req: p.Request) -> int:
        assert self.sock is not None
        self.ids += 1
        self.sock.send(p.encode_request(req, self.ids))
        self.inflight.add(self.ids)
        self.totals.sent += 1
        return self.ids

    def recv(self, timeout_ms: int = 0) -> p.ReplyEnvelope | None:
        assert self.sock is not None
        if not self.sock.poll(timeout_ms):
            return None
        env = p.decode_reply_envelope(self.sock.recv())
        if env.id == 0:
            self.totals.pushes += 1
        elif env.id in self.inflight:
            self.inflight.discard(env.id)
            _count_reply(self.totals, env)
        elif 0 < env.id <= self.ids:
            self.totals.duplicates += 1
        else:
            self.totals.unknown_ids += 1
        return env

    def drain(self) -> None:
        deadline = time.monotonic() + REPLY_DEADLINE_S
        while self.inflight and time.monotonic() < deadline:
            self.recv(timeout_ms=100)
        self.totals.lost += len(self.inflight)
        self.inflight.clear()

    def heartbeat(self, now: float, rng: random.Random) -> None:
        """Once a second: a pool under pressure, so tool calls trigger offloads."""
        if now < self.next_beat:
            return
        self.next_beat = now + 1.0
        free = rng.randint(0, GPU_BLOCKS // 8)
        self.send(p.EngineHeartbeat(self.engine_id, free, rng.randint(0, 8), 8))


def _count_reply(totals: Totals, env: p.ReplyEnvelope) -> None:
    totals.replied += 1
    if not env.ok:
        code = env.error.code if env.error else "?"
        totals.errors[code] = totals.errors.get(code, 0) + 1


class _AppClient:
    """bench_load's client (a DEALER and its agent workload) with a lifetime in requests."""

    def __init__(self, inner: _Client, life: int, engine: _EngineSession) -> None:
        self.inner = inner
        self.life = life
        self.engine = engine
        self.generation = engine.generation

    @property
    def retiring(self) -> bool:
        """Past its lifetime, or its engine restarted (its engine id is gone)."""
        return self.inner.stats.sent >= self.life or self.engine.generation != self.generation

    def pump(self, totals: Totals) -> None:
        """Read every reply that is there; feed the workload the ones it waits for."""
        c = self.inner
        while True:
            try:
                raw = c.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            env = p.decode_reply_envelope(raw)
            if env.id == 0:
                totals.pushes += 1
                continue
            if c.inflight.pop(env.id, None) is None:
                if 0 < env.id <= c.ids[0]:
                    totals.duplicates += 1
                else:
                    totals.unknown_ids += 1
                continue
            _count_reply(totals, env)
            if env.id == c.waiting_for:
                c.waiting_for = None
                c.next = c.steps.send(env)

    def send_one(self, totals: Totals) -> bool:
        c = self.inner
        if self.retiring or c.next is None or c.waiting_for is not None or len(c.inflight) >= 4:
            return False
        frame, needs_reply = c.next
        c.sock.send(frame)
        c.inflight[c.ids[0]] = time.perf_counter_ns()
        c.stats.sent += 1
        totals.sent += 1
        if needs_reply:
            c.waiting_for = c.ids[0]
            c.next = None
        else:
            c.next = c.steps.send(None)
        return True


class _Soak:
    """The driver: engines, churning app clients, the rate limit and the samples."""

    def __init__(self, args: argparse.Namespace, endpoint: str, pid: int) -> None:
        self.args, self.endpoint, self.pid = args, endpoint, pid
        self.rng = random.Random(args.seed)
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.totals = Totals()
        self.samples: list[Sample] = []
        self.engines = [
            _EngineSession(self.ctx, endpoint, f"soak-engine-{i}", self.totals)
            for i in range(args.engines)
        ]
        self.clients: list[_AppClient | None] = [None] * args.clients
        self.retired: list[_AppClient] = []

    def _new_client(self) -> _AppClient:
        self.totals.clients_started += 1
        name = f"app{self.totals.clients_started:06d}"
        engine = self.rng.choice(self.engines)
        fresh = self.args.fresh_names > 0 and self.rng.random() < self.args.fresh_names
        inner = _Client(self.ctx, self.endpoint, name, engine.engine_id, fresh)
        return _AppClient(inner, self.rng.randint(*self.args.client_life), engine)

    def _retire(self, i: int, client: _AppClient) -> None:
        """Waits for the client's replies (counted lost after the deadline), then closes."""
        deadline = time.monotonic() + REPLY_DEADLINE_S
        while client.inner.inflight and time.monotonic() < deadline:
            client.inner.sock.poll(50)
            client.pump(self.totals)
        self.totals.lost += len(client.inner.inflight)
        client.inner.sock.close(linger=0)
        self.clients[i] = None

    def sample(self, t0: float) -> None:
        try:
            st = proc_status(self.pid)
        except OSError:
            raise SystemExit("the daemon exited during the soak") from None
        if st["rss_kib"] == 0:
            raise SystemExit("the daemon exited during the soak")
        self.samples.append(
            Sample(
                (time.monotonic() - t0) / 60.0,
                st["rss_kib"],
                st["anon_kib"],
                st["fds"],
                st["socket_fds"],
            )
        )
        s = self.samples[-1]
        t = self.totals
        print(
            f"  {s.t_min:6.1f} min  RSS {s.rss_kib:>8} KiB  anon {s.anon_kib:>8} KiB  "
            f"fds {s.fds:>4} (sockets {s.socket_fds:>3})  sent {t.sent:>10,}  "
            f"pushes {t.pushes:>8,}  clients {t.clients_started:>6,}",
            flush=True,
        )

    def run(self) -> float:
        args = self.args
        for e in self.engines:
            e.connect(self.rng)
        t0 = time.monotonic()
        end = t0 + args.minutes * 60.0
        next_sample = t0
        next_restart = t0 + args.engine_life_s
        budget_sent = 0
        while (now := time.monotonic()) < end:
            if now >= next_sample:
                self.sample(t0)
                next_sample += args.sample_s
            if now >= next_restart:
                self.rng.choice(self.engines).connect(self.rng)
                next_restart += args.engine_life_s / len(self.engines)
            for e in self.engines:
                e.heartbeat(now, self.rng)
                while e.recv() is not None:
                    pass
            allowed = int((now - t0) * args.rate)
            budget_sent = self._step_clients(allowed - budget_sent) + budget_sent
            zmq.select([c.inner.sock for c in self.clients if c is not None], [], [], 0.005)
        for i, c in enumerate(self.clients):
            if c is not None:
                self._retire(i, c)
        for e in self.engines:
            e.drain()
        time.sleep(1.0)
        self.sample(t0)
        return time.monotonic() - t0

    def _step_clients(self, budget: int) -> int:
        """One pass over the clients: read replies, send at most one each, churn."""
        sent = 0
        order = list(range(len(self.clients)))
        self.rng.shuffle(order)
        for i in order:
            c = self.clients[i]
            if c is None:
                c = self.clients[i] = self._new_client()
            c.pump(self.totals)
            if c.retiring:
                if not c.inner.inflight:
                    self._retire(i, c)
                continue
            if sent < budget and c.send_one(self.totals):
                sent += 1
        return sent


def _print_report(soak: _Soak, wall: float, reports: list[dict[str, Any]]) -> bool:
    args, t, samples = soak.args, soak.totals, soak.samples
    sl = slopes(samples, reports, args.warmup_min)
    rows: list[tuple[str, Any]] = [
        ("wall (min)", f"{wall / 60:.1f}"),
        ("requests sent / replies", f"{t.sent:,} / {t.replied:,}"),
        ("lost / duplicate / unknown-id replies", f"{t.lost} / {t.duplicates} / {t.unknown_ids}"),
        ("decision pushes received", f"{t.pushes:,}"),
        ("app clients started (sockets opened)", f"{t.clients_started:,}"),
        ("engine restarts", f"{t.engine_restarts:,}"),
        ("error replies", f"{sum(t.errors.values()):,} {t.errors or ''}"),
        ("RSS start / end (KiB)", f"{samples[0].rss_kib} / {samples[-1].rss_kib}"),
        ("RSS slope, whole run (KiB/min)", f"{sl['rss_whole_kib_min']:.2f}"),
        (f"RSS slope after {args.warmup_min:g} min (KiB/min)", f"{sl['rss_kib_min']:.2f}"),
        ("RssAnon slope after warm-up (KiB/min)", f"{sl['anon_kib_min']:.2f}"),
        ("open fds start / end", f"{samples[0].fds} / {samples[-1].fds}"),
        ("socket fds start / end", f"{samples[0].socket_fds} / {samples[-1].socket_fds}"),
    ]
    rows += report_rows(sl, reports) + collector_rows(reports, args.warmup_min * 60.0)
    for label, value in rows:
        print(f"{label:<46}{value}")
    for site, grown in growth_sites(reports, args.warmup_min * 60.0):
        print(f"  grew after warm-up {grown:>+10,} B  {site}")
    if reports:
        print(f"  container sizes at the end: {reports[-1]['sizes']}")
    ok = t.lost == 0 and t.duplicates == 0 and t.unknown_ids == 0 and t.sent == t.replied
    flat = sl["rss_kib_min"] < args.target_kib_min
    print(
        f"verdict: {'every request answered once' if ok else 'REPLIES LOST OR DUPLICATED'}; "
        f"RSS slope {sl['rss_kib_min']:.2f} KiB/min "
        f"{'under' if flat else 'OVER'} the {args.target_kib_min:g} KiB/min target"
    )
    return ok and flat


def _life(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    try:
        bounds = (int(lo), int(hi if sep else lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not MIN:MAX") from None
    if not 1 <= bounds[0] <= bounds[1]:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return bounds


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=600.0, help="requests/s in all")
    ap.add_argument("--engines", type=int, default=4)
    ap.add_argument("--clients", type=int, default=32, help="app clients alive at a time")
    ap.add_argument(
        "--engine-life-s",
        type=float,
        default=300.0,
        help="an engine restarts every this/--engines seconds (one at random)",
    )
    ap.add_argument(
        "--client-life",
        type=_life,
        default="200:2000",
        help="MIN:MAX requests an app client sends before it leaves (drawn uniformly)",
    )
    ap.add_argument("--sample-s", type=float, default=60.0)
    ap.add_argument("--warmup-min", type=float, default=10.0, help="left out of the slopes")
    ap.add_argument("--target-kib-min", type=float, default=10.0)
    ap.add_argument("--arena-bytes", type=arena_size, default="64MiB")
    ap.add_argument(
        "--app-idle-s",
        type=float,
        default=120.0,
        help="the daemon's app_idle_timeout_s: apps of clients that left mid-app end then",
    )
    ap.add_argument(
        "--fresh-names",
        type=float,
        default=0.0,
        help="share of app clients whose apps name their agent type and tool kind anew each "
        "time (frameworks that name them per instance); 0 to 1",
    )
    ap.add_argument("--no-tracemalloc", action="store_true")
    ap.add_argument("--plot", type=Path, help="write the memory lines to this PNG")
    ap.add_argument("--json", type=Path, help="write samples, reports and totals here")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    if not 0 < args.minutes <= MAX_MINUTES:
        ap.error(f"--minutes must be within 0..{MAX_MINUTES:g}")
    if not (0 < args.rate <= 100_000 and 1 <= args.engines <= 64 and 1 <= args.clients <= 1024):
        ap.error("--rate must be within 0..100000, --engines 1..64, --clients 1..1024")
    if not 0.0 <= args.fresh_names <= 1.0:
        ap.error("--fresh-names must be within 0..1")
    if not (1.0 <= args.sample_s <= 3600.0 and args.engine_life_s >= 1.0):
        ap.error("--sample-s must be within 1..3600 and --engine-life-s at least 1")
    return args


def main() -> None:
    args = _args()
    tmp = Path(tempfile.mkdtemp(prefix="tcsoak-"))
    report_file = tmp / "memory.jsonl"
    os.environ.pop("TOKENCAKE_ENDPOINT", None)
    os.environ["TOKENCAKE_APP_IDLE_TIMEOUT_S"] = str(args.app_idle_s)
    os.environ["TOKENCAKE_DEBUG_MEMORY_FILE"] = str(report_file)
    os.environ["TOKENCAKE_DEBUG_MEMORY_S"] = str(args.sample_s)
    os.environ["TOKENCAKE_DEBUG_MEMORY_TRACE"] = "off" if args.no_tracemalloc else "on"
    proc, endpoint = _start_daemon(tmp, args.arena_bytes)
    print(
        f"tokencaked soak: {args.minutes:g} min at {args.rate:g} req/s, {args.engines} engines, "
        f"{args.clients} app clients, tracemalloc {'off' if args.no_tracemalloc else 'on'}, "
        f"MALLOC_ARENA_MAX={os.environ.get('MALLOC_ARENA_MAX', 'unset')}",
        flush=True,
    )
    soak = _Soak(args, endpoint, proc.pid)
    try:
        wall = soak.run()
        with TokenCakeClient(endpoint, timeout_s=10.0) as c:
            alive = c.call(p.Ping()).uptime_s > 0
    finally:
        _stop_daemon(proc)
        soak.ctx.destroy(linger=0)
    reports = memory_reports(report_file)
    ok = _print_report(soak, wall, reports) and alive and proc.returncode == 0
    if args.plot:
        title = f"tokencaked soak, {args.minutes:g} min at {args.rate:g} req/s"
        plot(args.plot, soak.samples, reports, title)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: str(v) for k, v in vars(args).items()},
                    "totals": msgspec.to_builtins(soak.totals),
                    "samples": [msgspec.to_builtins(s) for s in soak.samples],
                    "reports": reports,
                }
            )
        )
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
