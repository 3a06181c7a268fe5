"""The workload model every generator produces: applications as DAGs of LLM calls and tools.

One shape serves every workload (built-in or a user's JSON file) so the engine never knows
which generator made a trace. An application is a DAG of nodes; an ``llm`` node is one LLM
call, optionally followed by one tool call; a ``local`` node (an input or a collector) costs
nothing and only passes context along.

Context is append-only, as in the authors' Code-Writer trace ("append-only-conversation-v1"):
a node's prompt is its predecessors' context followed by its own instruction. A node's
context handed to successors is its prompt, its generated text (unless the tool discards
it) and the tool's result. A join keeps the predecessors' common prefix once and appends
each predecessor's suffix in the declared order. Prompts are sequences of *segments*
(unique id, token count) so that the engine can derive prefix-hash chains from them: two
prompts share KV exactly as far as they share segments.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import numpy as np

from tokencake.daemon.scheduler import dag

logger = logging.getLogger(__name__)

NodeKind = Literal["llm", "local"]
Composition = Literal["append", "fresh"]
NoiseKind = Literal["none", "gaussian", "uniform"]

Segment = tuple[int, int]
"""(unique id, tokens). Equal ids mean equal token content."""


class WorkloadError(ValueError):
    """A workload that cannot be built: a bad DAG, a bad file, an unknown name."""


@dataclass(slots=True)
class ToolSpec:
    """The tool call that follows a node's LLM call.

    ``duration_s`` is what the tool really takes in this trace; ``predicted_s`` is the hint
    the application hands the scheduler (``None``: no hint), which may be wrong on purpose.
    """

    kind: str
    duration_s: float
    result_tokens: int
    predicted_s: float | None = None
    preserve_generation: bool = True


@dataclass(slots=True)
class NodeSpec:
    id: str
    agent_type: str
    kind: NodeKind = "llm"
    predecessors: tuple[str, ...] = ()
    instruction_tokens: int = 0
    output_tokens: int = 0
    tool: ToolSpec | None = None
    composition: Composition = "append"
    importance: float = 1.0
    declared_critical: bool | None = None


@dataclass(slots=True)
class AppSpec:
    """One application instance of a trace, with its arrival time and its composed prompts.

    ``prompts`` maps each llm node to its prompt segments and ``outputs`` to the segment of
    its generated text; both are filled by :func:`compose` so that every consumer sees the
    same token layout.
    """

    app_id: str
    workload: str
    nodes: list[NodeSpec]
    initial_tokens: int
    arrival_s: float = 0.0
    plain: bool = False
    """Plain traffic: requests with no agent metadata (a vLLM request without TokenCake's
    ``kv_transfer_params``). The engine serves them; the policy hears nothing about them."""
    prompts: dict[str, tuple[Segment, ...]] = field(default_factory=dict)
    outputs: dict[str, Segment] = field(default_factory=dict)

    def node(self, node_id: str) -> NodeSpec:
        for n in self.nodes:
            if n.id == node_id:
                return n
        raise WorkloadError(f"app {self.app_id}: no node {node_id!r}")

    @property
    def edges(self) -> list[tuple[str, str]]:
        return [(p, n.id) for n in self.nodes for p in n.predecessors]

    @property
    def llm_nodes(self) -> list[NodeSpec]:
        return [n for n in self.nodes if n.kind == "llm"]

    @property
    def tool_waits(self) -> int:
        return sum(1 for n in self.nodes if n.tool is not None)

    @property
    def output_tokens(self) -> int:
        return sum(n.output_tokens for n in self.nodes)


@dataclass(slots=True)
class Trace:
    """A seeded, replayable list of applications. ``seed`` is recorded with every result."""

    workload: str
    seed: int
    qps: float
    apps: list[AppSpec]


# --------------------------------------------------------------------------- validation


def topological_order(nodes: list[NodeSpec]) -> list[NodeSpec]:
    """Nodes in dependency order; raises on cycles, duplicates and dangling edges."""
    by_id: dict[str, NodeSpec] = {}
    for n in nodes:
        if n.id in by_id:
            raise WorkloadError(f"duplicate node id {n.id!r}")
        by_id[n.id] = n
    for n in nodes:
        for p in n.predecessors:
            if p not in by_id:
                raise WorkloadError(f"node {n.id!r} depends on unknown node {p!r}")
    edges = [(p, n.id) for n in nodes for p in n.predecessors]
    try:
        return [by_id[i] for i in dag.topological_order(by_id, edges)]
    except dag.DagError as exc:
        raise WorkloadError(str(exc)) from None


def validate(app: AppSpec) -> None:
    topological_order(app.nodes)
    for n in app.nodes:
        if n.kind == "llm" and n.output_tokens <= 0:
            raise WorkloadError(f"{app.app_id}/{n.id}: an llm node needs output_tokens > 0")
        if n.kind == "local" and n.tool is not None:
            raise WorkloadError(f"{app.app_id}/{n.id}: a local node cannot call a tool")
        if n.tool is not None and (n.tool.duration_s < 0 or n.tool.result_tokens < 0):
            raise WorkloadError(f"{app.app_id}/{n.id}: negative tool duration or result")
        if n.instruction_tokens < 0:
            raise WorkloadError(f"{app.app_id}/{n.id}: negative instruction_tokens")


# --------------------------------------------------------------------------- composition


class SegmentIds:
    """Hands out segment ids; one instance per trace keeps ids unique across applications."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 1

    def new(self, tokens: int) -> Segment:
        sid = self._next
        self._next += 1
        return (sid, tokens)


def _join(contexts: list[tuple[Segment, ...]]) -> tuple[Segment, ...]:
    """Common prefix once, then each context's suffix in the given order."""
    if not contexts:
        return ()
    if len(contexts) == 1:
        return contexts[0]
    common = 0
    shortest = min(len(c) for c in contexts)
    while common < shortest and all(c[common] == contexts[0][common] for c in contexts):
        common += 1
    out = list(contexts[0][:common])
    for c in contexts:
        out.extend(c[common:])
    return tuple(out)


def compose(app: AppSpec, ids: SegmentIds) -> None:
    """Fill ``app.prompts`` by the append-only rule described in the module docstring."""
    order = topological_order(app.nodes)
    carry: dict[str, tuple[Segment, ...]] = {}
    initial: tuple[Segment, ...] = (ids.new(app.initial_tokens),) if app.initial_tokens else ()
    app.prompts = {}
    app.outputs = {}
    for n in order:
        base = _join([carry[p] for p in n.predecessors]) if n.predecessors else initial
        if n.composition == "fresh":
            base = ()
        instr = (ids.new(n.instruction_tokens),) if n.instruction_tokens else ()
        if n.kind == "local":
            carry[n.id] = base + instr
            continue
        prompt = base + instr
        if not prompt:
            prompt = (ids.new(1),)
        app.prompts[n.id] = prompt
        out = ids.new(n.output_tokens)
        app.outputs[n.id] = out
        ctx = prompt
        if n.tool is None or n.tool.preserve_generation:
            ctx = (*ctx, out)
        if n.tool is not None and n.tool.result_tokens:
            ctx = (*ctx, ids.new(n.tool.result_tokens))
        carry[n.id] = ctx


def prompt_tokens(prompt: tuple[Segment, ...]) -> int:
    return sum(t for _, t in prompt)


# --------------------------------------------------------------------------- randomness


@dataclass(slots=True)
class NoiseConfig:
    """Perturbations applied when a trace is built, so the same generator can be stressed.

    ``tool_noise`` perturbs the real duration around the nominal one (``gaussian``: relative
    standard deviation ``tool_noise_scale``; ``uniform``: +- ``tool_noise_scale``); the result
    is clipped at zero. ``predict_error`` is the sigma of a log-normal factor applied to the
    hint the scheduler receives, independent of the real duration, so a hint can be wrong in
    both directions. ``hints=False`` sends no hint at all.
    """

    tool_noise: NoiseKind = "none"
    tool_noise_scale: float = 0.0
    predict_error: float = 0.0
    hints: bool = True

    def __post_init__(self) -> None:
        if self.tool_noise not in ("none", "gaussian", "uniform"):
            raise WorkloadError(f"unknown tool noise {self.tool_noise!r}")
        if self.tool_noise_scale < 0 or self.predict_error < 0:
            raise WorkloadError("noise scales must be >= 0")

    def actual(self, nominal_s: float, rng: np.random.Generator) -> float:
        if self.tool_noise == "gaussian" and self.tool_noise_scale > 0:
            return max(0.0, nominal_s * (1.0 + rng.normal(0.0, self.tool_noise_scale)))
        if self.tool_noise == "uniform" and self.tool_noise_scale > 0:
            s = self.tool_noise_scale
            return max(0.0, nominal_s * (1.0 + rng.uniform(-s, s)))
        return nominal_s

    def predicted(self, nominal_s: float, rng: np.random.Generator) -> float | None:
        if not self.hints:
            return None
        if self.predict_error > 0:
            return nominal_s * math.exp(rng.normal(0.0, self.predict_error))
        return nominal_s


def poisson_arrivals(n: int, qps: float, rng: np.random.Generator) -> list[float]:
    """Arrival times of a Poisson process of rate ``qps``; the first application arrives at 0."""
    if qps <= 0:
        raise WorkloadError("qps must be > 0")
    if n <= 0:
        return []
    gaps = rng.exponential(1.0 / qps, size=n - 1)
    return [0.0, *np.cumsum(gaps).tolist()]


class WorkloadGenerator(ABC):
    """Builds applications. Subclasses describe one kind of multi-agent app."""

    name: ClassVar[str]
    description: ClassVar[str]
    default_apps: ClassVar[int] = 24

    @abstractmethod
    def build_app(self, index: int, rng: np.random.Generator, noise: NoiseConfig) -> AppSpec:
        """The ``index``-th application; tools' real and predicted durations come from noise."""


def make_trace(
    gen: WorkloadGenerator,
    *,
    qps: float,
    seed: int,
    n_apps: int | None = None,
    noise: NoiseConfig | None = None,
) -> Trace:
    """A replayable trace: same seed, same apps and arrivals; same seed, other qps, same apps."""
    noise = noise or NoiseConfig()
    n = gen.default_apps if n_apps is None else n_apps
    app_rng = np.random.default_rng([seed, 1])
    arr_rng = np.random.default_rng([seed, 2])
    ids = SegmentIds()
    apps: list[AppSpec] = []
    for i, t in enumerate(poisson_arrivals(n, qps, arr_rng)):
        app = gen.build_app(i, app_rng, noise)
        validate(app)
        app.arrival_s = t
        compose(app, ids)
        apps.append(app)
    return Trace(workload=gen.name, seed=seed, qps=qps, apps=apps)
