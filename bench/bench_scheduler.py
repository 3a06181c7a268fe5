"""Pure scheduler throughput: events per second and cost per event vs number of agents.

Usage: ``python bench/bench_scheduler.py [--events 100000] [--agents 1000,10000,100000]
[--policies tokencake,vllm] [--seed 0] [--hash]``

Agents live in 10-node apps (a chain with one fork/join) and cycle through
LLM call start -> admitted -> finish -> tool start -> (copy done) -> tool end, with an engine
report and a tick every 64 events. The GPU pool is kept under pressure so TokenCake really
decides offloads and uploads. The event script is generated (seeded) before timing; only
``policy.on_event`` is timed, on one core, after the apps were registered and every agent
was put in a random phase of its cycle. Simulated time per event is 1/n_agents seconds, so
each agent sees the same event rate and the timers fire at the same rate per event. One
caveat: 100k timed events give each of 100k agents about one event, so that row leans to
first-touch work (more decisions per event) than the 1k row (about 100 events per agent).

``--hash`` adds a column: the SHA-256 (first 16 hex digits) of the msgpack of every
decision, setup and timed, in order. A change meant to leave the decisions alone must leave
it the same for every policy and size. The timed loop then also keeps the decisions, so
compare throughput only between runs with the same flags.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import math
import random
import time

from msgspec import msgpack

from tokencake.daemon.scheduler import (
    EngineState,
    Event,
    PolicyConfig,
    Tick,
    TransferDone,
    create_policy,
)
from tokencake.protocol import (
    AppDag,
    DagNode,
    DecisionRecord,
    LlmCallAdmitted,
    LlmCallFinish,
    LlmCallStart,
    RegisterApp,
    ToolCallEnd,
    ToolCallStart,
)

Timed = tuple[float, Event]
"""An event and the time it happens."""

NODES_PER_APP = 10
KINDS = ("search", "test", "file_write", "judge")


def make_dag() -> AppDag:
    nodes = [
        DagNode(
            id=f"n{i}", agent_type=f"t{i % 4}", expected_tool_s=1.0 + i % 3, tool_kind=KINDS[i % 4]
        )
        for i in range(NODES_PER_APP)
    ]
    edges = [(f"n{i}", f"n{i + 1}") for i in range(NODES_PER_APP - 1)]
    edges += [("n2", "n5"), ("n3", "n7")]
    return AppDag(nodes=nodes, edges=edges)


def script(n_agents: int, n_events: int, seed: int) -> tuple[list[Timed], list[Timed]]:
    """(setup events, timed events)."""
    rng = random.Random(seed)
    n_apps = max(1, n_agents // NODES_PER_APP)
    dag = make_dag()
    setup: list[Timed] = [(0.0, RegisterApp(f"a{i}", dag)) for i in range(n_apps)]
    total = 40 * n_agents
    setup.append((0.0, EngineState(total, total // 20, num_waiting=10, waiting_blocks=400)))
    n = n_apps * NODES_PER_APP
    phase = [0] * n
    dt = 1.0 / n  # the same event rate per agent (and so the same mix) at every size
    now = 0.0

    def step(k: int, out: list[Timed]) -> None:
        app, agent = f"a{k // NODES_PER_APP}", f"n{k % NODES_PER_APP}"
        p = phase[k]
        if p == 0:
            out.append((now, LlmCallStart(app, agent, request_id="r", blocks=rng.randint(8, 64))))
        elif p == 1:
            out.append((now, LlmCallAdmitted(app, agent, "r", kv_blocks=rng.randint(8, 64))))
        elif p == 2:
            out.append((now, LlmCallFinish(app, agent, "r", kv_blocks=rng.randint(16, 96))))
        elif p == 3:
            out.append((now, ToolCallStart(app, agent, KINDS[k % 4], rng.choice([None, 2.0, 5.0]))))
        elif p == 4:
            out.append((now, TransferDone(app, agent, "d2h", 96)))
        else:
            out.append((now, ToolCallEnd(app, agent)))
        phase[k] = (p + 1) % 6

    # untimed warm-up: every agent is put in a random phase of its cycle, so the timed mix
    # of events is the same whatever the number of agents
    for k in range(n):
        for _ in range(rng.randrange(6)):
            now += dt / 100
            step(k, setup)
    events: list[Timed] = []
    while len(events) < n_events:
        now += dt
        if len(events) % 64 == 0:
            events.append(
                (now, EngineState(total, total // 20, num_waiting=10, waiting_blocks=400))
            )
            events.append((now, Tick()))
            continue
        step(rng.randrange(n), events)
    return setup, events


def run(
    policy_name: str,
    n_agents: int,
    n_events: int,
    seed: int,
    kept: list[DecisionRecord] | None = None,
) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, decisions) of the timed events; every decision, setup
    and timed, is appended to ``kept`` when one is given."""
    setup, events = script(n_agents, n_events, seed)
    policy = create_policy(policy_name, PolicyConfig(host_blocks=20 * n_agents))
    for now, ev in setup:
        out = policy.on_event(ev, now)
        if kept is not None:
            kept += out
    on_event = policy.on_event
    decisions = 0
    gc.collect()
    gc.disable()
    try:
        c0 = time.process_time()
        t0 = time.perf_counter()
        if kept is None:
            for now, ev in events:
                decisions += len(on_event(ev, now))
        else:
            start = len(kept)
            for now, ev in events:
                kept += on_event(ev, now)
            decisions = len(kept) - start
        wall = time.perf_counter() - t0
        cpu = time.process_time() - c0
    finally:
        gc.enable()
    return cpu, wall, decisions


def stream_hash(decisions: list[DecisionRecord]) -> str:
    """The first 16 hex digits of the SHA-256 of every decision's msgpack, in order."""
    h = hashlib.sha256()
    encode = msgpack.Encoder().encode
    for d in decisions:
        h.update(encode(d))
    return h.hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--agents", default="1000,10000,100000")
    ap.add_argument("--policies", default="tokencake,tokencake-temporal,vllm,lru-offload,kvflow")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hash", action="store_true", help="also print a hash of the decision stream")
    args = ap.parse_args()
    try:
        sizes = [int(x) for x in args.agents.split(",")]
    except ValueError:
        ap.error(f"--agents: comma-separated whole numbers, got {args.agents!r}")
    if args.events < 1 or min(sizes) < 1:
        ap.error("--events and every --agents size must be >= 1")
    print("events/s and us/event use this process's CPU time (the host is shared); wall in ()")
    print(f"events per run: {args.events}, seed {args.seed}")
    print(
        f"{'policy':<20}{'agents':>8}{'events/s':>10}{'(wall)':>10}{'us/event':>10}"
        f"{'us/log2n':>10}{'decisions':>11}" + (f"{'stream':>18}" if args.hash else "")
    )
    for name in args.policies.split(","):
        for n in sizes:
            kept: list[DecisionRecord] | None = [] if args.hash else None
            cpu, wall, decisions = run(name, n, args.events, args.seed, kept)
            per = cpu / args.events * 1e6
            print(
                f"{name:<20}{n:>8}{args.events / cpu:>10.0f}{f'({args.events / wall:.0f})':>10}"
                f"{per:>10.2f}{per / math.log2(n):>10.3f}{decisions:>11}"
                + (f"{stream_hash(kept):>18}" if kept is not None else "")
            )


if __name__ == "__main__":
    main()
