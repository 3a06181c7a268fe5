"""A seeded family of workload shapes: one seed draws a whole scenario (for robustness runs).

``draw_scenario(seed)`` picks, from ``numpy.random.default_rng([seed, 7])``:

* a DAG shape: ``chain`` (2-12 agents in sequence sharing one context), ``fanout`` (a
  planner, 2-16 parallel workers with 1-3 tool calls each, a reducer), ``join`` (2-4
  layers of 1-4 nodes, each joining 1-2 nodes of the layer above) or ``react`` (one agent,
  3-12 think -> tool -> observe steps whose tool results grow the context);
* a tool-time law: ``lognormal`` (median 0.2-20 s, sigma 0.3-1.2), ``heavy`` (Pareto tail,
  alpha 1.1-1.8, scale 0.3-5 s, capped at 300 s), ``near_zero`` (0-0.3 s) or ``bimodal``
  (80 % near zero, 20 % log-normal around 10-60 s); the scheduler's hint is the law's median
  (an agent knows the kind of tool, not this call's duration), or no hint in a third of the
  scenarios;
* a plain-traffic fraction: 0 in a quarter of the scenarios, else 5-70 %; plain apps are one
  request (0.5k-4k prompt tokens, 50-300 output) with no agent metadata;
* a context range within 0.5k-32k tokens (the apps' initial context, log-uniform);
* an arrival rate from idle to overload: a target number of apps in flight (log-uniform in
  0.1-16) over the app's estimated duration alone (tool time on its critical path plus its
  LLM time on an idle engine), i.e. ``qps = in_flight / duration``.

``FamilyWorkload(scenario)`` is a ``WorkloadGenerator`` like the built-ins, so a drawn
scenario replays anywhere a workload name goes: ``get_generator("family:<seed>")`` (and
``tokencake-sim run --workload family:<seed> --qps <qps> --apps <n> --seed <seed>``, with the
scenario's ``qps`` and ``n_apps``, and its seed as the trace's, as the robustness bench runs it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from tokencake.sim.profiles import Profile
from tokencake.sim.workload import (
    AppSpec,
    NodeSpec,
    NoiseConfig,
    ToolSpec,
    WorkloadError,
    WorkloadGenerator,
    make_trace,
)

SHAPES = ("chain", "fanout", "join", "react")
TOOL_LAWS = ("lognormal", "heavy", "near_zero", "bimodal")
PREFIX = "family:"
HEAVY_CAP_S = 300.0


@dataclass(frozen=True, slots=True)
class Scenario:
    """Everything one seed draws; ``describe()`` is its one-line summary."""

    seed: int
    shape: str
    size: int
    """chain/react: agents or steps; fanout: workers; join: layers."""
    tool_law: str
    tool_median_s: float
    tool_sigma: float
    """lognormal/bimodal: sigma of the log; heavy: the Pareto alpha."""
    hints: bool
    plain_fraction: float
    context_lo: int
    context_hi: int
    in_flight: float
    n_apps: int

    def describe(self) -> str:
        hint = "" if self.hints else ", no hints"
        return (
            f"{self.shape}({self.size}), {self.tool_law} tools (median {self.tool_median_s:.2g}"
            f" s{hint}), plain {self.plain_fraction:.0%}, context {self.context_lo}-"
            f"{self.context_hi}, {self.in_flight:.2g} apps in flight"
        )


def draw_scenario(seed: int, n_apps: int = 12) -> Scenario:
    rng = np.random.default_rng([seed, 7])
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    size = {
        "chain": int(rng.integers(2, 13)),
        "fanout": int(rng.integers(2, 17)),
        "join": int(rng.integers(2, 5)),
        "react": int(rng.integers(3, 13)),
    }[shape]
    law = TOOL_LAWS[int(rng.integers(len(TOOL_LAWS)))]
    if law == "lognormal":
        median, sigma = math.exp(rng.uniform(math.log(0.2), math.log(20.0))), rng.uniform(0.3, 1.2)
    elif law == "heavy":
        median, sigma = rng.uniform(0.3, 5.0), rng.uniform(1.1, 1.8)
    elif law == "near_zero":
        median, sigma = 0.15, 0.0
    else:
        median, sigma = rng.uniform(10.0, 60.0), 0.5
    plain = 0.0 if rng.random() < 0.25 else float(rng.uniform(0.05, 0.7))
    lo = math.exp(rng.uniform(math.log(512), math.log(32768)))
    hi = min(32768.0, lo * math.exp(rng.uniform(0.0, math.log(4.0))))
    in_flight = math.exp(rng.uniform(math.log(0.1), math.log(16.0)))
    return Scenario(
        seed=seed,
        shape=shape,
        size=size,
        tool_law=law,
        tool_median_s=float(median),
        tool_sigma=float(sigma),
        hints=bool(rng.random() >= 1 / 3),
        plain_fraction=round(plain, 3),
        context_lo=int(lo),
        context_hi=int(hi),
        in_flight=float(in_flight),
        n_apps=n_apps,
    )


def scenario_from_name(name: str, n_apps: int = 12) -> Scenario:
    """``family:<seed>`` -> its scenario; a typed error for anything else."""
    tail = name[len(PREFIX) :] if name.startswith(PREFIX) else ""
    if not tail.isdigit():
        raise WorkloadError(f"a family workload is named family:<seed>, got {name!r}")
    return draw_scenario(int(tail), n_apps)


class FamilyWorkload(WorkloadGenerator):
    """The applications of one drawn scenario (plain or agent app, by its plain fraction)."""

    name = "family"
    description = "a scenario drawn from the seeded workload family (family:<seed>)"

    def __init__(self, scenario: Scenario) -> None:
        self.sc = scenario
        self.name = f"{PREFIX}{scenario.seed}"  # type: ignore[misc]
        self.default_apps = scenario.n_apps  # type: ignore[misc]

    # ------------------------------------------------------------------ tools

    def _tool_s(self, rng: np.random.Generator) -> float:
        sc = self.sc
        if sc.tool_law == "lognormal":
            return float(rng.lognormal(math.log(sc.tool_median_s), sc.tool_sigma))
        if sc.tool_law == "heavy":
            # Pareto with median tool_median_s: scale = median / 2^(1/alpha)
            scale = sc.tool_median_s / 2 ** (1 / sc.tool_sigma)
            return float(min(HEAVY_CAP_S, scale * (1.0 + rng.pareto(sc.tool_sigma))))
        if sc.tool_law == "near_zero":
            return float(rng.uniform(0.0, 0.3))
        if rng.random() < 0.8:
            return float(rng.uniform(0.0, 0.3))
        return float(rng.lognormal(math.log(sc.tool_median_s), sc.tool_sigma))

    def _hint(self) -> float:
        """What an agent knows of a call in advance: the law's median."""
        sc = self.sc
        if sc.tool_law == "bimodal":
            return 0.15
        return sc.tool_median_s

    def _tool(self, kind: str, result_tokens: int, rng: np.random.Generator) -> ToolSpec:
        return ToolSpec(
            kind=kind,
            duration_s=self._tool_s(rng),
            result_tokens=result_tokens,
            predicted_s=self._hint() if self.sc.hints else None,
        )

    # ------------------------------------------------------------------ apps

    def build_app(self, index: int, rng: np.random.Generator, noise: NoiseConfig) -> AppSpec:
        sc = self.sc
        if rng.random() < sc.plain_fraction:
            prompt = int(rng.integers(512, 4097))
            node = NodeSpec("request", "plain", output_tokens=int(rng.integers(50, 301)))
            return AppSpec(f"plain-{index}", self.name, [node], prompt, plain=True)
        ctx = int(math.exp(rng.uniform(math.log(sc.context_lo), math.log(sc.context_hi + 1))))
        build = {
            "chain": self._chain,
            "fanout": self._fanout,
            "join": self._join,
            "react": self._react,
        }[sc.shape]
        return AppSpec(f"{sc.shape}-{index}", self.name, build(rng), ctx)

    def _chain(self, rng: np.random.Generator) -> list[NodeSpec]:
        nodes = []
        for i in range(self.sc.size):
            last = i == self.sc.size - 1
            nodes.append(
                NodeSpec(
                    f"a{i}",
                    f"agent{i % 3}",
                    predecessors=(f"a{i - 1}",) if i else (),
                    instruction_tokens=int(rng.integers(100, 400)),
                    output_tokens=int(rng.integers(80, 400)),
                    tool=None if last else self._tool("step", int(rng.integers(50, 400)), rng),
                )
            )
        return nodes

    def _fanout(self, rng: np.random.Generator) -> list[NodeSpec]:
        nodes = [NodeSpec("planner", "planner", instruction_tokens=200, output_tokens=200)]
        tails = []
        for w in range(self.sc.size):
            prev = "planner"
            calls = int(rng.integers(1, 4))
            for c in range(calls):
                nid = f"w{w}_{c}"
                nodes.append(
                    NodeSpec(
                        nid,
                        "worker",
                        predecessors=(prev,),
                        instruction_tokens=int(rng.integers(40, 160)),
                        output_tokens=int(rng.integers(40, 200)),
                        tool=self._tool("work", int(rng.integers(50, 300)), rng),
                    )
                )
                prev = nid
            last = f"w{w}_done"
            nodes.append(
                NodeSpec(
                    last, "worker", predecessors=(prev,), instruction_tokens=30, output_tokens=80
                )
            )
            tails.append(last)
        nodes.append(
            NodeSpec(
                "reducer",
                "reducer",
                predecessors=tuple(tails),
                instruction_tokens=60,
                output_tokens=300,
            )
        )
        return nodes

    def _join(self, rng: np.random.Generator) -> list[NodeSpec]:
        nodes = [NodeSpec("root", "root", instruction_tokens=150, output_tokens=150)]
        above = ["root"]
        for layer in range(self.sc.size):
            width = int(rng.integers(1, 5))
            here = []
            for j in range(width):
                k = min(len(above), int(rng.integers(1, 3)))
                preds = tuple(str(x) for x in rng.choice(above, size=k, replace=False))
                nid = f"l{layer}_{j}"
                nodes.append(
                    NodeSpec(
                        nid,
                        f"layer{layer}",
                        predecessors=preds,
                        instruction_tokens=int(rng.integers(50, 250)),
                        output_tokens=int(rng.integers(50, 300)),
                        tool=self._tool("step", int(rng.integers(50, 300)), rng)
                        if rng.random() < 0.7
                        else None,
                    )
                )
                here.append(nid)
            above = here
        nodes.append(
            NodeSpec(
                "sink", "sink", predecessors=tuple(above), instruction_tokens=50, output_tokens=200
            )
        )
        return nodes

    def _react(self, rng: np.random.Generator) -> list[NodeSpec]:
        nodes = []
        for i in range(self.sc.size):
            last = i == self.sc.size - 1
            nodes.append(
                NodeSpec(
                    f"step{i}",
                    "coder",
                    predecessors=(f"step{i - 1}",) if i else (),
                    instruction_tokens=20,
                    output_tokens=int(rng.integers(60, 300)),
                    tool=None if last else self._tool("shell", int(rng.integers(100, 1200)), rng),
                )
            )
        return nodes


def estimated_duration_s(app: AppSpec, profile: Profile) -> float:
    """An app's duration alone on an idle engine: along its longest path, each node's prefill
    (one step over its prompt) and decode (one small step per output token) plus its tool."""
    decode_s = profile.step_s(1, 0, 0)
    done: dict[str, float] = {}
    for n in app.nodes:  # generators list nodes in dependency order
        start = max((done[p] for p in n.predecessors), default=0.0)
        prompt = sum(t for _, t in app.prompts.get(n.id, ()))
        llm = profile.step_s(min(prompt, profile.max_batched_tokens), 0, 0) * max(
            1, prompt // max(profile.max_batched_tokens, 1)
        )
        llm += n.output_tokens * decode_s
        tool = n.tool.duration_s if n.tool is not None else 0.0
        done[n.id] = start + llm + tool
    return max(done.values(), default=0.0)


def scenario_qps(scenario: Scenario, profile: Profile) -> float:
    """The arrival rate that puts ``scenario.in_flight`` apps in flight on average: the
    apps do not depend on the rate (``make_trace``), so their durations are measured first."""
    trace = make_trace(
        FamilyWorkload(scenario), qps=1.0, seed=scenario.seed, n_apps=scenario.n_apps
    )
    mean_s = float(np.mean([estimated_duration_s(a, profile) for a in trace.apps]))
    return round(scenario.in_flight / max(mean_s, 1e-3), 6)
