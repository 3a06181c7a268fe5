"""``python -m tokencake.clients.demo``: tokencaked on its embedded default, shown working.

It starts ``tokencaked`` with no arguments (or uses one already serving the default socket),
then plays two parts against it over the real protocol and the real shared-memory arena:

- an **engine** with a small GPU KV pool (a numpy array standing in for GPU memory) that
  carries out the daemon's pushed decisions: an offload copies an agent's blocks into the
  arena and frees them; an upload copies them back and checks every byte;
- a few **agent apps** (planner -> two coders -> reviewer) whose agents make LLM calls and
  tool calls, reported through the client library's session helper.

It prints each decision as it is applied and, at the end, what was offloaded, uploaded and
verified. A daemon it started is stopped at the end, unless ``--keep`` leaves it running
for ``tokencake-ctl``. It is a demonstration of the daemon, not a benchmark (see ``bench/``).
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np

from tokencake import protocol as p
from tokencake.cli import HELP_OPTIONS, Command, is_endpoint
from tokencake.clients.client import (
    AgentSession,
    AppSession,
    DaemonUnavailable,
    TokenCakeClient,
    resolve_endpoint,
)
from tokencake.clients.kv_arena import ArenaMapping
from tokencake.clients.launcher import DaemonProcess, LaunchError, daemon_flags, launch
from tokencake.layout import KvLayout

LAYOUT = KvLayout(
    model_id="demo-llama-tiny",
    num_layers=2,
    block_size=32,
    num_kv_heads=2,
    head_dim=32,
    dtype="float16",
    bytes_per_block=2 * 2 * 32 * 2 * 32 * 2,
)
DAG = p.AppDag(
    nodes=[
        p.DagNode(
            "planner", agent_type="planner", importance=2.0, expected_tool_s=1.5, tool_kind="search"
        ),
        p.DagNode("coder_a", agent_type="coder", expected_tool_s=2.5, tool_kind="tests"),
        p.DagNode("coder_b", agent_type="coder", expected_tool_s=2.5, tool_kind="tests"),
        p.DagNode("reviewer", agent_type="reviewer"),
    ],
    edges=[
        ("planner", "coder_a"),
        ("planner", "coder_b"),
        ("coder_a", "reviewer"),
        ("coder_b", "reviewer"),
    ],
)
TOOLS = {"planner": ("search", 1.5), "coder_a": ("tests", 2.5), "coder_b": ("tests", 2.5)}
PROMPT_BLOCKS = 40
DECODE_S = 0.3
DAEMON_START_S = 30.0


def block_bytes(app_id: str, agent_id: str, index: int) -> np.ndarray:
    """The deterministic content of an agent's block ``index`` (what the GPU would hold)."""
    seed = int.from_bytes(
        hashlib.blake2b(f"{app_id}/{agent_id}/{index}".encode(), digest_size=8).digest(), "little"
    )
    return np.random.default_rng(seed).integers(0, 256, LAYOUT.bytes_per_block, dtype=np.uint8)


def chain_hashes(app_id: str, agent_id: str, n: int) -> list[bytes]:
    out: list[bytes] = []
    prev = b""
    for i in range(n):
        prev = hashlib.blake2b(prev + f"{app_id}/{agent_id}/{i}".encode(), digest_size=16).digest()
        out.append(prev)
    return out


@dataclass
class AgentKv:
    app_id: str
    agent_id: str
    gpu_blocks: list[int] = field(default_factory=list)
    host_blocks: int = 0  # how many of its blocks (a prefix) live only on the host


@dataclass
class Totals:
    offloads: int = 0
    uploads: int = 0
    blocks_offloaded: int = 0
    blocks_uploaded: int = 0
    blocks_verified: int = 0
    mismatches: int = 0
    prefix_hits: int = 0
    evicted_blocks: int = 0
    recomputed_blocks: int = 0


class DemoEngine:
    """A tiny engine: a GPU KV pool in numpy, carrying out the daemon's decisions."""

    def __init__(self, client: TokenCakeClient, num_gpu_blocks: int, say: Callable[[str], None]):
        self.client = client
        self.say = say
        reg = client.call(p.RegisterEngine("demo-engine", LAYOUT, num_gpu_blocks=num_gpu_blocks))
        self.engine_id = reg.engine_id
        self.arena = ArenaMapping.open(reg.arena_name, reg.slot_bytes)
        self.gpu = np.zeros((num_gpu_blocks, LAYOUT.bytes_per_block), dtype=np.uint8)
        self.free = list(range(num_gpu_blocks))
        self.agents: dict[tuple[str, str], AgentKv] = {}
        self.waiting = 0
        self.running: set[tuple[str, str]] = set()
        self.totals = Totals()

    def kv(self, app_id: str, agent_id: str) -> AgentKv:
        return self.agents.setdefault((app_id, agent_id), AgentKv(app_id, agent_id))

    def heartbeat(self) -> None:
        self.client.call(p.EngineHeartbeat(self.engine_id, len(self.free), self.waiting, 0))

    def prefill(self, app_id: str, agent_id: str, n_blocks: int) -> bool:
        """Make the agent's first ``n_blocks`` resident; False when the pool is too full."""
        kv = self.kv(app_id, agent_id)
        if kv.host_blocks and not self.upload(kv, kv.host_blocks, "on demand"):
            return False
        resident = len(kv.gpu_blocks)
        need = n_blocks - resident
        if need > len(self.free) and not self.make_room(need, kv):
            return False
        self.running.add((app_id, agent_id))
        self.totals.prefix_hits += min(resident, n_blocks)
        self.totals.recomputed_blocks += max(0, need)
        for i in range(resident, n_blocks):
            block = self.free.pop()
            self.gpu[block] = block_bytes(app_id, agent_id, i)
            kv.gpu_blocks.append(block)
        return True

    def make_room(self, need: int, for_kv: AgentKv) -> bool:
        """Free the cached KV of idle agents, as an engine's prefix cache would; their next
        call recomputes it."""
        idle = [
            kv
            for key, kv in self.agents.items()
            if key not in self.running and kv is not for_kv and kv.gpu_blocks
        ]
        if len(self.free) + sum(len(kv.gpu_blocks) for kv in idle) < need:
            return False
        for kv in idle:
            if len(self.free) >= need:
                break
            self.free.extend(kv.gpu_blocks)
            self.totals.evicted_blocks += len(kv.gpu_blocks)
            kv.gpu_blocks.clear()
        return True

    def finished(self, app_id: str, agent_id: str) -> None:
        self.running.discard((app_id, agent_id))

    def release(self, app_id: str) -> None:
        for key in [k for k in self.agents if k[0] == app_id]:
            kv = self.agents.pop(key)
            self.free.extend(kv.gpu_blocks)
            if kv.host_blocks:
                self.client.call(p.Drop(self.engine_id, chain_hashes(*key, kv.host_blocks)))

    def apply(self, decision: p.DecisionRecord) -> None:
        kv = self.agents.get((decision.app_id, decision.agent_id))
        if kv is None:
            return
        if isinstance(decision, p.OffloadDecision) and decision.free_gpu:
            self.offload(kv, decision)
        elif decision.kind == "upload":
            self.upload(kv, decision.blocks, f"rule {decision.reason.rule}")

    def offload(self, kv: AgentKv, decision: p.DecisionRecord) -> None:
        n = min(decision.blocks, len(kv.gpu_blocks))
        if n <= 0:
            return
        hashes = chain_hashes(kv.app_id, kv.agent_id, kv.host_blocks + n)[kv.host_blocks :]
        slots = self.client.call(
            p.Reserve(self.engine_id, hashes, app_id=kv.app_id, agent_id=kv.agent_id)
        ).slots
        moved = kv.gpu_blocks[: len(slots)]
        writes = [(s, b) for s, b in zip(slots, moved, strict=False) if s >= 0]
        if writes:
            self.arena.write_blocks([s for s, _ in writes], self.gpu[[b for _, b in writes]])
            self.client.call(p.Commit(self.engine_id, [s for s, _ in writes]))
        self.free.extend(moved)
        del kv.gpu_blocks[: len(slots)]
        kv.host_blocks += len(slots)
        self.totals.offloads += 1
        self.totals.blocks_offloaded += len(slots)
        terms = decision.reason.terms
        self.say(
            f"  offload  {kv.app_id}/{kv.agent_id}: {len(slots)} blocks to host "
            f"(stall q={_seconds(terms.get('stall_quantile_s'))}, "
            f"margin {_seconds(terms.get('margin_s'))}, rule {decision.reason.rule})"
        )

    def upload(self, kv: AgentKv, blocks: int, why: str) -> bool:
        """Bring the agent's host blocks back; False when the GPU pool has no room yet."""
        if kv.host_blocks <= 0:
            return True
        if kv.host_blocks > len(self.free) and not self.make_room(kv.host_blocks, kv):
            return False
        # The host holds a prefix of the agent's blocks (a hash chain): load all of it.
        hashes = chain_hashes(kv.app_id, kv.agent_id, kv.host_blocks)
        slots = self.client.call(
            p.LoadBegin(self.engine_id, hashes, app_id=kv.app_id, agent_id=kv.agent_id)
        ).slots
        got = len(slots)
        if got < kv.host_blocks:  # evicted from the host meanwhile: recompute the rest
            self.client.call(p.LoadEnd(self.engine_id, slots))
            self.totals.recomputed_blocks += kv.host_blocks
            kv.host_blocks = 0
            return True
        targets = [self.free.pop() for _ in range(got)]
        staged = np.empty((got, LAYOUT.bytes_per_block), dtype=np.uint8)
        self.arena.read_blocks(slots, staged)
        self.client.call(p.LoadEnd(self.engine_id, slots))
        for i, (target, data) in enumerate(zip(targets, staged, strict=True)):
            ok = np.array_equal(data, block_bytes(kv.app_id, kv.agent_id, i))
            self.totals.blocks_verified += ok
            self.totals.mismatches += not ok
            self.gpu[target] = data
        kv.gpu_blocks[:0] = targets
        kv.host_blocks = 0
        self.client.call(p.Drop(self.engine_id, hashes))
        self.totals.uploads += 1
        self.totals.blocks_uploaded += got
        self.say(f"  upload   {kv.app_id}/{kv.agent_id}: {got} blocks back, bytes verified ({why})")
        return True


def _seconds(value: Any) -> str:
    """A decision term in seconds, to the millisecond (``?`` when the policy gave none)."""
    return f"{value:.3f}s" if isinstance(value, int | float) else "?"


class DemoRun:
    """Replays a few apps in real time: a heap of timed actions, pushes applied between."""

    def __init__(
        self, engine: DemoEngine, client: TokenCakeClient, apps: int, say: Callable[[str], None]
    ):
        self.engine = engine
        self.client = client
        self.say = say
        self.queue: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = 0
        self.sessions: dict[str, AppSession] = {}
        self.done: dict[str, set[str]] = {}
        self.apps_left = apps
        self.start = time.monotonic()
        for i in range(apps):
            self.at(i * 1.2, functools.partial(self.start_app, f"app{i}"))

    def at(self, delay_s: float, fn: Callable[[], None]) -> None:
        self.seq += 1
        heapq.heappush(self.queue, (time.monotonic() + delay_s, self.seq, fn))

    def start_app(self, app_id: str) -> None:
        self.sessions[app_id] = AppSession(self.client, app_id, DAG, strict=True)
        self.done[app_id] = set()
        self.say(f"{self.t():5.1f}s app {app_id} starts")
        self.llm(app_id, "planner", 0)

    def t(self) -> float:
        return time.monotonic() - self.start

    def agent(self, app_id: str, agent_id: str) -> AgentSession:
        return self.sessions[app_id].agent(agent_id, self.engine.engine_id)

    def llm(self, app_id: str, agent_id: str, turn: int) -> None:
        blocks = PROMPT_BLOCKS + 4 * turn
        session = self.agent(app_id, agent_id)
        self.client.call(
            p.LlmCallStart(
                app_id,
                agent_id,
                self.engine.engine_id,
                f"{app_id}-{agent_id}-{turn}",
                blocks * LAYOUT.block_size,
            )
        )
        self.admit(session, app_id, agent_id, turn, blocks, waited=False)

    def admit(
        self,
        session: AgentSession,
        app_id: str,
        agent_id: str,
        turn: int,
        blocks: int,
        waited: bool,
    ) -> None:
        if waited:
            self.engine.waiting -= 1
        if not self.engine.prefill(app_id, agent_id, blocks):
            # The request waits in the queue for blocks; the engine retries each step.
            self.engine.waiting += 1
            self.at(0.1, lambda: self.admit(session, app_id, agent_id, turn, blocks, True))
            return
        self.at(DECODE_S, lambda: self.llm_done(session, app_id, agent_id, turn, blocks))

    def llm_done(
        self, session: AgentSession, app_id: str, agent_id: str, turn: int, blocks: int
    ) -> None:
        self.client.call(p.LlmCallFinish(app_id, agent_id, output_tokens=64, kv_blocks=blocks))
        self.engine.finished(app_id, agent_id)
        tool = TOOLS.get(agent_id)
        if tool is not None and turn == 0:
            kind, seconds = tool
            call_id = f"{app_id}-{agent_id}"
            self.client.call(p.ToolCallStart(app_id, agent_id, kind, seconds, call_id))

            def back() -> None:
                self.client.call(p.ToolCallEnd(app_id, agent_id, call_id))
                self.llm(app_id, agent_id, 1)

            self.at(seconds, back)
            return
        self.agent_done(app_id, agent_id)

    def agent_done(self, app_id: str, agent_id: str) -> None:
        self.done[app_id].add(agent_id)
        for src, dst in DAG.edges:
            if src == agent_id and all(s in self.done[app_id] for s, d in DAG.edges if d == dst):
                self.llm(app_id, dst, 0)
        if len(self.done[app_id]) == len(DAG.nodes):
            self.sessions.pop(app_id).end()
            self.engine.release(app_id)
            self.apps_left -= 1
            self.say(f"{self.t():5.1f}s app {app_id} done")

    def run(self, timeout_s: float = 60.0) -> None:
        last_beat = 0.0
        while self.apps_left and self.t() < timeout_s:
            now = time.monotonic()
            while self.queue and self.queue[0][0] <= now:
                heapq.heappop(self.queue)[2]()
            if now - last_beat > 0.1:
                self.engine.heartbeat()
                last_beat = now
            for decision in self.client.poll_pushes(0.01):
                self.engine.apply(decision)


def _ensure_daemon(endpoint: str, say: Callable[[str], None]) -> DaemonProcess | None:
    try:
        with TokenCakeClient(endpoint, timeout_s=0.3) as c:
            c.call(p.Ping())
        say(f"using the tokencaked already serving {endpoint}")
        return None
    except DaemonUnavailable:
        pass
    say(f"starting tokencaked (embedded default) on {endpoint}")
    # Its own session and a log file: a daemon left running (--keep) outlives this process.
    fd, log_name = tempfile.mkstemp(prefix="tokencaked-demo-", suffix=".log")
    os.close(fd)
    try:
        return launch(
            *daemon_flags(metrics_port=None),
            endpoint=endpoint,
            instance=None,
            log_path=Path(log_name),
            inherit_settings=True,
            detach=True,
            timeout_s=DAEMON_START_S,
        )
    except LaunchError as exc:
        raise click.ClickException(str(exc)) from None


@click.command(cls=Command, context_settings=HELP_OPTIONS)
@click.option(
    "--apps", type=click.IntRange(1, 50), default=3, show_default=True, help="Applications."
)
@click.option(
    "--gpu-blocks",
    type=click.IntRange(2 * (PROMPT_BLOCKS + 4), 100_000),
    default=200,
    show_default=True,
    help="The demo engine's GPU pool (enough for two agents' prompts at least).",
)
@click.option(
    "--keep",
    is_flag=True,
    help="Leave the tokencaked this demo started running, to look at with tokencake-ctl.",
)
def main(apps: int, gpu_blocks: int, keep: bool) -> None:
    """Start tokencaked on its embedded default and replay a small agent workload."""
    say = click.echo
    endpoint = resolve_endpoint(None)
    if not is_endpoint(endpoint):
        raise click.UsageError(
            f"TOKENCAKE_ENDPOINT={endpoint!r} is not ipc://PATH or tcp://HOST:PORT"
        )
    started = _ensure_daemon(endpoint, say)
    try:
        with TokenCakeClient(endpoint, timeout_s=5.0) as client:
            engine = DemoEngine(client, gpu_blocks, say)
            say(
                f"engine {engine.engine_id}: {gpu_blocks} GPU blocks of "
                f"{LAYOUT.bytes_per_block} B; arena {engine.arena.name}"
            )
            DemoRun(engine, client, apps, say).run()
            stats = client.call(p.Stats())
            decisions = client.call(p.ListDecisions(limit=1000)).decisions
            kinds: dict[str, int] = {}
            for d in decisions:
                kinds[d.kind] = kinds.get(d.kind, 0) + 1
            t = engine.totals
            say("")
            say("summary")
            say(f"  decisions by kind:   {dict(sorted(kinds.items()))}")
            say(
                f"  offloads applied:    {t.offloads} ({t.blocks_offloaded} blocks, "
                f"{stats.bytes_offloaded} B through the arena)"
            )
            say(
                f"  uploads applied:     {t.uploads} ({t.blocks_uploaded} blocks, "
                f"{stats.bytes_uploaded} B)"
            )
            say(f"  bytes verified:      {t.blocks_verified} blocks, {t.mismatches} mismatches")
            say(
                f"  prefix reuse:        {t.prefix_hits} blocks reused, "
                f"{t.recomputed_blocks} computed, {t.evicted_blocks} evicted from the GPU"
            )
            say(f"  host pool now:       {stats.pool.ready} ready / {stats.pool.num_slots} slots")
            engine.arena.close()
            if t.mismatches:
                raise SystemExit(1)
    except BaseException:
        keep = False  # a failed demo leaves nothing behind
        raise
    finally:
        if started is not None and not keep:
            started.stop()
            started.log_path.unlink(missing_ok=True)
            say("tokencaked stopped (socket removed, arena unlinked); --keep leaves it running")
    if started is None or keep:
        ctl = Path(sys.executable).parent / "tokencake-ctl"
        say(f"inspect: {ctl if ctl.exists() else 'tokencake-ctl'} status | agents | decisions")
    if started is not None and keep:
        say(
            f"tokencaked left running (pid {started.proc.pid}, log {started.log_path}); "
            f"stop it with: kill {started.proc.pid}"
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
