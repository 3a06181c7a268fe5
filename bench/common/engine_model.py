"""A small continuous-batching engine used to drive policies in tests.

It owns the ground truth (GPU blocks per agent, host blocks, copies in flight), carries out
every decision, reports back with events, and checks the invariants the issue asks for
after every step. It is deliberately simpler than ``tokencake.sim`` (one step = ``dt``
seconds, every copy completes in one step, every LLM call runs ``run_steps`` steps).
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

from tokencake import protocol as p
from tokencake.daemon.scheduler import (
    CachedKv,
    EngineState,
    Event,
    KvEvicted,
    Policy,
    PolicyConfig,
    TransferDone,
    WaitingRequest,
    create_policy,
)
from tokencake.protocol import (
    AppDag,
    AppEnd,
    DagNode,
    DecisionRecord,
    DropDecision,
    LlmCallAdmitted,
    LlmCallFinish,
    LlmCallStart,
    OffloadDecision,
    PinDecision,
    RegisterApp,
    ToolCallEnd,
    ToolCallStart,
    UnpinDecision,
    UploadDecision,
)


class InvariantError(AssertionError):
    pass


@dataclass(slots=True)
class Call:
    prompt_blocks: int
    out_blocks: int
    tool_s: float | None  # tool call after this LLM call
    tool_hint: float | None = None


@dataclass(slots=True)
class NodeSpec:
    node_id: str
    calls: list[Call]
    importance: float = 1.0


@dataclass(slots=True)
class AppSpec:
    app_id: str
    arrival_s: float
    nodes: list[NodeSpec]
    edges: list[tuple[str, str]]


@dataclass(slots=True)
class Agent:
    app_id: str
    agent_id: str
    spec: NodeSpec
    call: int = 0
    phase: str = "pending"  # pending, waiting, running, tool, done
    cached: int = 0
    running_blocks: int = 0
    host: int = 0
    d2h: int = 0
    d2h_move: bool = True
    h2d: int = 0
    pinned_until: float = -math.inf
    need: int = 0
    wait_start: float = 0.0
    wait_start_step: int = 0
    run_left: int = 0
    tool_end_s: float = 0.0
    last_used: float = 0.0


@dataclass(slots=True)
class Stats:
    offloaded: int = 0
    uploaded: int = 0
    dropped_host: int = 0
    max_wait_steps: int = 0
    max_wait_steps_critical: int = 0
    admitted: int = 0
    decisions: list[dict[str, object]] = field(default_factory=list)


class ToyEngine:
    def __init__(
        self,
        policy: Policy,
        apps: list[AppSpec],
        gpu_blocks: int,
        host_blocks: int,
        dt: float = 0.1,
        run_steps: int = 2,
    ) -> None:
        self.policy = policy
        self.apps = sorted(apps, key=lambda a: (a.arrival_s, a.app_id))
        self.gpu_total = gpu_blocks
        self.host_total = host_blocks
        self.dt = dt
        self.run_steps = run_steps
        self.now = 0.0
        self.step_no = 0
        self.agents: dict[tuple[str, str], Agent] = {}
        self.preds: dict[tuple[str, str], list[str]] = {}
        self.succs: dict[tuple[str, str], list[str]] = {}
        self.waiting: list[Agent] = []
        self.pending_copies: list[tuple[Agent, str, int]] = []
        self.next_app = 0
        self.live_apps: dict[str, list[Agent]] = {}
        self.done_apps = 0
        self.stats = Stats()
        self.keep_host_copy = bool(getattr(policy, "keep_host_copy", False))
        self._queue: deque[DecisionRecord] = deque()
        self._draining = False

    # ------------------------------------------------------------------ accounting

    def gpu_used(self) -> int:
        return sum(a.cached + a.running_blocks + a.h2d for a in self.agents.values())

    def host_used(self) -> int:
        return sum(a.host + a.d2h for a in self.agents.values())

    def check(self) -> None:
        used = self.gpu_used()
        if used > self.gpu_total:
            raise InvariantError(f"GPU over capacity: {used} > {self.gpu_total} at {self.now}")
        host = self.host_used()
        if host > self.host_total:
            raise InvariantError(f"host over capacity: {host} > {self.host_total} at {self.now}")

    # ------------------------------------------------------------------ events

    def feed(self, event: Event) -> None:
        """Report an event and carry out the decisions, in the order they were made.

        Carrying out a decision may report events (an eviction to make room for an
        upload); their decisions queue behind the ones already made, as an engine applies
        pushed decisions in order, instead of cutting in (the policy's plan for a batch of
        upload pieces counts on them landing in that order)."""
        self._carry_out(self.policy.on_event(event, self.now))

    def _carry_out(self, decisions: list[DecisionRecord]) -> None:
        self._queue.extend(decisions)
        if self._draining:
            return
        self._draining = True
        try:
            while self._queue:
                self.apply(self._queue.popleft())
        finally:
            self._draining = False

    def apply(self, dec: DecisionRecord) -> None:
        self.stats.decisions.append(p.to_builtins(dec))
        agent = self.agents.get((dec.app_id, dec.agent_id))
        if isinstance(dec, OffloadDecision):
            assert agent is not None
            if agent.phase == "running":
                raise InvariantError(f"offload of running agent {dec.agent_id} at {self.now}")
            if dec.blocks > agent.cached - agent.d2h:
                raise InvariantError(f"offload of {dec.blocks} > cached {agent.cached}")
            if self.host_used() + dec.blocks > self.host_total:
                raise InvariantError("offload beyond host capacity")
            agent.d2h += dec.blocks
            agent.d2h_move = dec.free_gpu
            # An offload ends the agent's pin: the copy takes the pinned blocks over (the
            # vLLM connector and the simulator do the same; no Unpin is sent).
            agent.pinned_until = -math.inf
            self.pending_copies.append((agent, "d2h", dec.blocks))
            self.stats.offloaded += dec.blocks
        elif isinstance(dec, UploadDecision):
            assert agent is not None
            # As in vLLM, blocks for an upload may come from idle cached KV (evicted).
            room = self.gpu_total - self.gpu_used() + self.evictable_blocks(agent)
            if dec.blocks > room:
                raise InvariantError(f"upload of {dec.blocks} with {room} free at {self.now}")
            if self.make_room(agent, dec.blocks) < dec.blocks:
                raise InvariantError(f"upload of {dec.blocks}: eviction could not make room")
            if dec.blocks > agent.host - (0 if self.keep_host_copy else agent.h2d):
                raise InvariantError("upload of blocks that are not on the host")
            agent.h2d += dec.blocks
            self.pending_copies.append((agent, "h2d", dec.blocks))
            self.stats.uploaded += dec.blocks
        elif isinstance(dec, DropDecision):
            assert agent is not None
            if dec.where == "gpu":
                if agent.phase == "running":
                    raise InvariantError("drop of a running agent's KV")
                agent.cached -= min(dec.blocks, agent.cached)
            else:
                if dec.blocks > agent.host - agent.h2d:
                    raise InvariantError("drop of host blocks being uploaded or absent")
                agent.host -= dec.blocks
                self.stats.dropped_host += dec.blocks
        elif isinstance(dec, PinDecision):
            assert agent is not None
            agent.pinned_until = self.now + dec.ttl_s
        elif isinstance(dec, UnpinDecision):
            assert agent is not None
            agent.pinned_until = -math.inf

    # ------------------------------------------------------------------ run

    def run(self, max_steps: int = 5000) -> Stats:
        while self.step_no < max_steps:
            if self.next_app >= len(self.apps) and not self.live_apps:
                break
            self.step()
        else:
            raise InvariantError(
                f"not done after {max_steps} steps: {len(self.live_apps)} apps live, "
                f"{len(self.waiting)} waiting"
            )
        for _ in range(3):
            self.step()
        return self.stats

    def step(self) -> None:
        self.step_no += 1
        self.now = round(self.step_no * self.dt, 9)
        copies, self.pending_copies = self.pending_copies, []
        for agent, direction, blocks in copies:
            if direction == "d2h":
                agent.d2h -= blocks
                agent.host += blocks
                if agent.d2h_move:
                    agent.cached -= blocks
            else:
                agent.h2d -= blocks
                if agent.phase == "running":
                    agent.running_blocks += blocks
                else:
                    agent.cached += blocks
                if not self.keep_host_copy:
                    agent.host -= blocks
            self.feed(TransferDone(agent.app_id, agent.agent_id, direction, blocks))  # type: ignore[arg-type]
        while self.next_app < len(self.apps) and self.apps[self.next_app].arrival_s <= self.now:
            self.start_app(self.apps[self.next_app])
            self.next_app += 1
        for agent in list(self.agents.values()):
            if agent.phase == "tool" and agent.tool_end_s <= self.now:
                self.feed(ToolCallEnd(agent.app_id, agent.agent_id))
                self.begin_call(agent)
            elif agent.phase == "running":
                agent.run_left -= 1
                if agent.run_left <= 0:
                    self.finish_call(agent)
        waiting_blocks = sum(a.need for a in self.waiting)
        self.feed(
            EngineState(
                self.gpu_total,
                # vLLM's count: empty blocks plus idle cached ones a new request may evict
                self.gpu_total - self.gpu_used() + self.evictable_blocks(None),
                num_waiting=len(self.waiting),
                num_running=sum(a.phase == "running" for a in self.agents.values()),
                waiting_blocks=waiting_blocks,
                host_blocks_total=self.host_total,
                host_blocks_free=self.host_total - self.host_used(),
            )
        )
        self.feed_tick()
        self.admit()
        self.check()

    def feed_tick(self) -> None:
        self._carry_out(self.policy.tick(self.now))

    def start_app(self, spec: AppSpec) -> None:
        dag = AppDag(
            nodes=[
                DagNode(
                    id=n.node_id,
                    agent_type=n.node_id.rstrip("0123456789") or n.node_id,
                    importance=n.importance,
                    expected_llm_s=self.run_steps * self.dt,
                    expected_tool_s=sum(c.tool_s or 0.0 for c in n.calls),
                    tool_kind="tool" if any(c.tool_s is not None for c in n.calls) else "",
                )
                for n in spec.nodes
            ],
            edges=spec.edges,
        )
        self.feed(RegisterApp(spec.app_id, dag))
        agents = []
        for n in spec.nodes:
            key = (spec.app_id, n.node_id)
            self.agents[key] = Agent(spec.app_id, n.node_id, n)
            self.preds[key] = [s for s, t in spec.edges if t == n.node_id]
            self.succs[key] = [t for s, t in spec.edges if s == n.node_id]
            agents.append(self.agents[key])
        self.live_apps[spec.app_id] = agents
        for agent in agents:
            if not self.preds[(agent.app_id, agent.agent_id)]:
                self.begin_call(agent)

    def begin_call(self, agent: Agent) -> None:
        call = agent.spec.calls[agent.call]
        agent.phase = "waiting"
        agent.need = call.prompt_blocks
        agent.wait_start = self.now
        agent.wait_start_step = self.step_no
        self.waiting.append(agent)
        self.feed(
            LlmCallStart(
                agent.app_id,
                agent.agent_id,
                request_id=f"{agent.agent_id}#{agent.call}",
                blocks=call.prompt_blocks,
            )
        )

    def finish_call(self, agent: Agent) -> None:
        call = agent.spec.calls[agent.call]
        agent.phase = "idle"
        agent.cached += agent.running_blocks
        agent.running_blocks = 0
        agent.last_used = self.now
        self.feed(LlmCallFinish(agent.app_id, agent.agent_id, kv_blocks=agent.cached))
        agent.call += 1
        if call.tool_s is not None and agent.call < len(agent.spec.calls):
            agent.phase = "tool"
            agent.tool_end_s = self.now + call.tool_s
            self.feed(ToolCallStart(agent.app_id, agent.agent_id, "tool", call.tool_hint))
            return
        if agent.call < len(agent.spec.calls):
            self.begin_call(agent)
            return
        agent.phase = "done"
        app_agents = self.live_apps[agent.app_id]
        for succ_id in self.succs[(agent.app_id, agent.agent_id)]:
            succ = self.agents[(agent.app_id, succ_id)]
            if succ.phase == "pending" and all(
                self.agents[(agent.app_id, p)].phase == "done"
                for p in self.preds[(agent.app_id, succ_id)]
            ):
                self.begin_call(succ)
        if all(a.phase == "done" for a in app_agents):
            self.feed(AppEnd(agent.app_id))
            del self.live_apps[agent.app_id]
            self.done_apps += 1
            for a in app_agents:
                # the engine's prefix cache forgets the app; host copies were dropped by policy
                a.cached = 0

    def evictable_blocks(self, exclude: Agent | None) -> int:
        """Idle cached blocks a new allocation may evict (not pinned, not ``exclude``'s)."""
        return sum(
            a.cached - a.d2h
            for a in self.agents.values()
            if a is not exclude and a.phase != "running" and a.pinned_until <= self.now
        )

    def make_room(self, agent: Agent, need: int) -> int:
        """Evict idle KV in the policy's order until ``need`` blocks are empty; the result.

        The order is asked again after each eviction: the policy may answer a ``KvEvicted``
        with decisions (an upload released into the room) that change what is left."""
        free = self.gpu_total - self.gpu_used()
        while free < need:
            victim = next(
                (
                    c
                    for c in self.policy.eviction_order(self.evictable(), self.now)
                    if self.agents[(c.app_id, c.agent_id)] is not agent
                ),
                None,
            )
            if victim is None:
                break
            v = self.agents[(victim.app_id, victim.agent_id)]
            take = min(v.cached - v.d2h, need - free)
            v.cached -= take
            self.feed(KvEvicted(v.app_id, v.agent_id, take, "gpu"))
            free = self.gpu_total - self.gpu_used()  # decisions may have taken some
        return free

    def evictable(self) -> list[CachedKv]:
        return [
            CachedKv(a.app_id, a.agent_id, a.cached - a.d2h, a.last_used)
            for a in self.agents.values()
            if a.phase not in ("running",) and a.cached - a.d2h > 0
        ]

    def admit(self) -> None:
        order = self.policy.admission_order(
            [
                WaitingRequest(f"{a.agent_id}#{a.call}", a.app_id, a.agent_id, a.need, a.wait_start)
                for a in self.waiting
            ],
            self.now,
        )
        by_key = {(a.app_id, a.agent_id): a for a in self.waiting}
        for req in order:
            agent = by_key[(req.app_id, req.agent_id)]
            if not self.policy.may_allocate(agent.app_id, agent.agent_id, agent.need, self.now):
                continue
            free = self.make_room(agent, agent.need)
            if free < agent.need:
                break
            self.waiting.remove(agent)
            agent.phase = "running"
            agent.running_blocks = agent.cached + agent.need
            agent.cached = 0
            agent.run_left = self.run_steps
            waited = self.step_no - agent.wait_start_step
            self.stats.max_wait_steps = max(self.stats.max_wait_steps, waited)
            self.stats.admitted += 1
            self.feed(LlmCallAdmitted(agent.app_id, agent.agent_id, kv_blocks=agent.running_blocks))


def random_apps(
    rng: random.Random, n_apps: int, max_nodes: int, max_prompt: int, rate_s: float
) -> list[AppSpec]:
    """Random DAG applications (layered, with forks and joins) and random tool calls."""
    apps = []
    t = 0.0
    for i in range(n_apps):
        t += rng.expovariate(1.0 / rate_s)
        n_nodes = rng.randint(1, max_nodes)
        nodes = []
        for j in range(n_nodes):
            calls = []
            for _ in range(rng.randint(1, 3)):
                tool = rng.choice([None, rng.uniform(0.05, 3.0), rng.uniform(0.05, 0.5)])
                hint = None if tool is None or rng.random() < 0.3 else tool * rng.uniform(0.5, 2.0)
                calls.append(Call(rng.randint(1, max_prompt), rng.randint(0, 3), tool, hint))
            nodes.append(NodeSpec(f"n{j}", calls, importance=rng.choice([1.0, 1.0, 2.0])))
        edges = []
        for j in range(1, n_nodes):
            for pred in rng.sample(range(j), k=min(j, rng.randint(1, 2))):
                edges.append((f"n{pred}", f"n{j}"))
        apps.append(AppSpec(f"app{i}", round(t, 3), nodes, edges))
    return apps


MOVE_POLICIES = frozenset({"tokencake", "tokencake-temporal", "infercept"})
"""Policies that offload during tool calls: every offloaded block comes back or is dropped."""


def run_policy(name: str, apps: list[AppSpec], gpu: int, host: int) -> ToyEngine:
    """Drive policy ``name`` over ``apps`` with the property tests' configuration."""
    cfg = PolicyConfig(
        bytes_per_block=1 << 20,
        host_blocks=host,
        min_margin_s=0.0,
        deadline_min_s=5.0,
        deadline_max_s=5.0,
        host_ttl_s=2.0,
        partition_interval_s=0.2,
        upload_piece_blocks=8,
    )
    eng = ToyEngine(create_policy(name, cfg), apps, gpu_blocks=gpu, host_blocks=host)
    eng.run(max_steps=2500)
    return eng


def check_random_workload(name: str, seed: int, n_apps: int, gpu: int, host: int) -> None:
    """One case of the invariant property: raises ``AssertionError`` on any violation.

    Shared by ``test_properties`` (a fixed, derandomized set of cases) and
    ``bench/bench_invariants.py`` (the long random sweep)."""
    apps = random_apps(random.Random(seed), n_apps, max_nodes=6, max_prompt=gpu // 6, rate_s=0.4)
    eng = run_policy(name, apps, gpu, host)  # raises InvariantError on any violated invariant
    assert eng.done_apps == len(apps), f"{eng.done_apps} of {len(apps)} apps done"
    assert eng.host_used() == 0, f"{eng.host_used()} host blocks left"
    assert not eng.pending_copies, "copies in flight at the end"
    stats = eng.stats
    if name in MOVE_POLICIES:
        assert stats.offloaded == stats.uploaded + stats.dropped_host, (
            f"offloaded {stats.offloaded} != uploaded {stats.uploaded} + "
            f"dropped {stats.dropped_host}"
        )
    else:
        assert stats.uploaded <= stats.offloaded, "uploaded more than was offloaded"
    policy = eng.policy
    assert getattr(policy, "host_used", 0) == 0, "policy still counts host blocks"
    assert getattr(policy, "h2d_in_flight", 0) == 0, "policy still counts uploads in flight"
    assert not getattr(policy, "apps", {}), "policy still tracks apps"
