"""Workload generators behind one API, and the built-in ones.

Every generator builds one application at a time from a seeded random stream; the trace
builder adds Poisson arrivals from a *separate* stream, so a QPS sweep replays the very same
applications at different rates. Calibration sources are given per generator and in
``docs/workloads.md``.
"""

from __future__ import annotations

import json
import logging
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tokencake.sim.workload import (
    AppSpec,
    NodeSpec,
    NoiseConfig,
    ToolSpec,
    WorkloadError,
    WorkloadGenerator,
    make_trace,
)

__all__ = [
    "BUILTIN",
    "CodeWriter",
    "DeepResearch",
    "InferceptSingle",
    "ReactCoding",
    "WorkloadGenerator",
    "chars_to_tokens",
    "get_generator",
    "make_trace",
]
"""``WorkloadGenerator`` and ``make_trace`` (``sim/workload.py``) are the API every generator
here, in ``sim/userfile.py`` and in ``sim/family.py`` implements; exported here too, beside
the built-ins."""

logger = logging.getLogger(__name__)

CHARS_PER_TOKEN = 4.0
"""The README's rule of thumb when no tokenizer is at hand."""


def chars_to_tokens(chars: int) -> int:
    return math.ceil(chars / CHARS_PER_TOKEN) if chars > 0 else 0


def _tool(
    kind: str,
    nominal_s: float,
    result_tokens: int,
    rng: np.random.Generator,
    noise: NoiseConfig,
    hint_s: float | None = None,
) -> ToolSpec:
    """A tool call lasting ``nominal_s`` (plus noise).

    ``hint_s`` is what the application can know in advance (a tier's median when durations
    are drawn at random); it defaults to the nominal duration, as in the authors' fixed waits.
    """
    return ToolSpec(
        kind=kind,
        duration_s=noise.actual(nominal_s, rng),
        result_tokens=result_tokens,
        predicted_s=noise.predicted(nominal_s if hint_s is None else hint_s, rng),
    )


# --------------------------------------------------------------------------- code-writer


class CodeWriter(WorkloadGenerator):
    """The authors' Code-Writer DAG, exactly (``sim/data/code_writer_dag.json``).

    29 nodes (27 LLM calls, an input and a collector), 36 edges, 18 tool waits per app and
    24 applications; templates and tool results are converted at 4 characters per token and
    the initial input is the file's ``context_token_count``. Output lengths are the nodes'
    ``max_tokens`` (6,464 per application), as in the authors' replay. More than 24 apps
    cycle through the 24 records.
    """

    name = "code-writer"
    description = "the TokenCake authors' Code-Writer DAG (29 nodes, 18 tool waits)"
    default_apps = 24

    def __init__(self, path: Path | None = None) -> None:
        if path is None:
            text = resources.files("tokencake.sim").joinpath("data/code_writer_dag.json")
            self.data: dict[str, Any] = json.loads(text.read_text(encoding="utf-8"))
        else:
            self.data = json.loads(path.read_text(encoding="utf-8"))
        self.records: list[dict[str, Any]] = self.data["applications"]
        if not self.records:
            raise WorkloadError("code-writer data has no applications")

    def build_app(self, index: int, rng: np.random.Generator, noise: NoiseConfig) -> AppSpec:
        rec = self.records[index % len(self.records)]
        templates: dict[str, int] = self.data["templates_chars"]
        overrides: dict[str, int] = rec.get("tool_result_override_chars", {})
        nodes: list[NodeSpec] = []
        for raw in self.data["nodes"]:
            nid = raw["id"]
            is_llm = raw["kind"] == "llm"
            tool = None
            if raw.get("tool"):
                t = raw["tool"]
                result_chars = overrides.get(nid, t.get("result_chars", 0))
                tokens = chars_to_tokens(result_chars)
                tool = _tool(t["kind"], float(t["wait_s"]), tokens, rng, noise)
                tool.preserve_generation = bool(
                    t.get("retention", {}).get("preserve_generation", True)
                )
            tmpl = raw.get("template")
            meta = raw.get("metadata", {})
            nodes.append(
                NodeSpec(
                    id=nid,
                    agent_type=raw["type"],
                    kind="llm" if is_llm else "local",
                    predecessors=tuple(raw["predecessors"]),
                    instruction_tokens=chars_to_tokens(templates.get(tmpl, 0)) if tmpl else 0,
                    output_tokens=int(raw["max_tokens"]) if is_llm else 0,
                    tool=tool,
                    declared_critical=meta.get("critical_path"),
                )
            )
        return AppSpec(
            app_id=f"cw-{index}",
            workload=self.name,
            nodes=nodes,
            initial_tokens=int(rec["context_token_count"]),
        )


# --------------------------------------------------------------------------- deep-research


class DeepResearch(WorkloadGenerator):
    """Fan-out research: a planner, K parallel search agents, a summariser, a writer.

    Design (ours; documented in docs/workloads.md): a 1.5-2.5K-token question with a system
    prompt goes to a planner (256 output tokens). K (3..6) searchers each issue a query
    (64 tokens) and wait on web search (log-normal, median 4.0 s as Code-Writer's search tool),
    read the hits (1,200 result tokens) and request a page (0.7 s, InferCept's Wikipedia
    lookup), take notes on the page (1,800 result tokens, 256 output tokens). The summariser
    joins the K branches (512 output tokens), the writer drafts the report (1,024 tokens), calls
    a citation check (1.0 s) and a final editor pass writes 512 tokens.
    """

    name = "deep-research"
    description = "planner -> K parallel search agents (search, page fetch) -> summariser -> writer"
    default_apps = 24

    def build_app(self, index: int, rng: np.random.Generator, noise: NoiseConfig) -> AppSpec:
        k = int(rng.integers(3, 7))
        nodes = [NodeSpec("planner", "planner", instruction_tokens=40, output_tokens=256)]
        notes: list[str] = []
        for i in range(1, k + 1):
            nodes += _search_agent(i, rng, noise)
            notes.append(f"search_{i}_notes")
        nodes.append(
            NodeSpec(
                "summariser",
                "summariser",
                predecessors=tuple(notes),
                instruction_tokens=50,
                output_tokens=512,
            )
        )
        nodes.append(
            NodeSpec(
                "writer",
                "writer",
                predecessors=("summariser",),
                instruction_tokens=50,
                output_tokens=1024,
                tool=_tool("citation_check", 1.0, 200, rng, noise),
            )
        )
        nodes.append(
            NodeSpec(
                "editor",
                "writer",
                predecessors=("writer",),
                instruction_tokens=40,
                output_tokens=512,
            )
        )
        return AppSpec(
            app_id=f"dr-{index}",
            workload=self.name,
            nodes=nodes,
            initial_tokens=int(rng.integers(1500, 2500)),
        )


def _search_agent(i: int, rng: np.random.Generator, noise: NoiseConfig) -> list[NodeSpec]:
    """Search agent ``i`` of a deep-research app: query (web search), read (page fetch),
    notes; draws from ``rng`` in that order."""
    search_s = float(rng.lognormal(math.log(4.0), 0.4))
    query = NodeSpec(
        f"search_{i}_query",
        "searcher",
        predecessors=("planner",),
        instruction_tokens=60,
        output_tokens=64,
        tool=_tool("web_search", search_s, 1200, rng, noise, hint_s=4.0),
    )
    fetch_s = float(rng.lognormal(math.log(0.7), 0.3))
    read = NodeSpec(
        f"search_{i}_read",
        "searcher",
        predecessors=(f"search_{i}_query",),
        instruction_tokens=30,
        output_tokens=64,
        tool=_tool("fetch_page", fetch_s, 1800, rng, noise, hint_s=0.7),
    )
    notes = NodeSpec(
        f"search_{i}_notes",
        "searcher",
        predecessors=(f"search_{i}_read",),
        instruction_tokens=30,
        output_tokens=256,
    )
    return [query, read, notes]


# --------------------------------------------------------------------------- react-coding

# (tier, share, sampler(rng) -> seconds, result tokens) from workloads/README.md's SWE-smith
# table. Log-normal sigma from median m and mean u: sigma = sqrt(2 ln(u/m)).
_REACT_TIERS: tuple[tuple[str, float, float, float, int], ...] = (
    # name, share, median_s, sigma, result_tokens
    ("submit", 0.064, 0.0, 0.0, 0),
    ("editor", 0.543, 0.0002, 0.0, 350),
    ("light_shell", 0.131, 0.19, 0.5, 300),
    ("normal_shell", 0.050, 0.42, math.sqrt(2 * math.log(0.73 / 0.42)), 500),
    ("heavy_shell", 0.212, 0.49, math.sqrt(2 * math.log(4.95 / 0.49)), 800),
)


class ReactCoding(WorkloadGenerator):
    """One coding agent per app: a ReAct chain of think -> tool -> observe steps.

    Tool tiers and their shares, medians and means are the SWE-smith measurements in
    workloads/README.md (log-normal per tier, fitted to median and mean; heavy shell capped at
    120 s). The chain ends at a ``submit`` (not before step 4) or after 30 steps. The hint
    handed to the scheduler is the tier's median: an agent knows the kind of command it runs,
    not how long this one will take. The context starts at about
    10K tokens and grows by each step's output (180 tokens, Mooncake's mean) and tool result,
    reaching 20K+ over a typical run as the README reports.
    """

    name = "react-coding"
    description = "single coding agents: ReAct chains with SWE-smith tool-time tiers"
    default_apps = 24
    min_steps = 4
    max_steps = 30

    def build_app(self, index: int, rng: np.random.Generator, noise: NoiseConfig) -> AppSpec:
        shares = np.array([t[1] for t in _REACT_TIERS])
        shares = shares / shares.sum()
        nodes: list[NodeSpec] = []
        prev: tuple[str, ...] = ()
        for step in range(self.max_steps):
            tier = _REACT_TIERS[int(rng.choice(len(_REACT_TIERS), p=shares))]
            while tier[0] == "submit" and step < self.min_steps - 1:
                tier = _REACT_TIERS[int(rng.choice(len(_REACT_TIERS), p=shares))]
            name, _, median, sigma, result = tier
            last = name == "submit" or step == self.max_steps - 1
            tool = None
            if not last:
                dur = median if sigma == 0 else float(rng.lognormal(math.log(median), sigma))
                tool = _tool(name, min(dur, 120.0), result, rng, noise, hint_s=median)
            nid = f"step_{step}"
            nodes.append(
                NodeSpec(
                    nid,
                    "coder",
                    predecessors=prev,
                    instruction_tokens=20,
                    output_tokens=int(rng.integers(120, 241)),
                    tool=tool,
                )
            )
            prev = (nid,)
            if last:
                break
        return AppSpec(
            app_id=f"rc-{index}",
            workload=self.name,
            nodes=nodes,
            initial_tokens=int(rng.integers(9000, 11000)),
        )


# --------------------------------------------------------------------------- infercept-single

# InferCept's augmentation kinds and their return times (workloads/README.md).
_INFERCEPT_KINDS: tuple[tuple[str, float, float, int], ...] = (
    # kind, median_s, sigma, result_tokens
    ("calculator", 0.0005, 0.3, 20),
    ("env_step", 0.1, 0.3, 120),
    ("wikipedia", 0.7, 0.4, 300),
    ("chat_human", 12.0, 1.0, 60),
    ("image_gen", 20.0, 0.3, 40),
    ("speech_gen", 15.0, 0.3, 40),
)


class InferceptSingle(WorkloadGenerator):
    """Single requests interrupted by several tool calls, InferCept-style.

    Each app draws one augmentation kind (InferCept's datasets are per kind), 2-6
    interceptions, a 600-1,400-token prompt and 40-200 output tokens per segment. Tool return
    times: calculator < 1 ms, environment step 0.1 s, Wikipedia 0.7 s, human chat median 12 s,
    image and speech generation tens of seconds (log-normal around those medians).
    """

    name = "infercept-single"
    description = "single requests with 2-6 tool interceptions of one kind"
    default_apps = 48

    def build_app(self, index: int, rng: np.random.Generator, noise: NoiseConfig) -> AppSpec:
        kind, median, sigma, result = _INFERCEPT_KINDS[int(rng.integers(len(_INFERCEPT_KINDS)))]
        calls = int(rng.integers(2, 7))
        nodes: list[NodeSpec] = []
        prev: tuple[str, ...] = ()
        for i in range(calls + 1):
            tool = None
            if i < calls:
                dur = float(rng.lognormal(math.log(median), sigma))
                tool = _tool(kind, dur, result, rng, noise, hint_s=median)
            nid = f"seg_{i}"
            nodes.append(
                NodeSpec(
                    nid,
                    f"augmented_{kind}",
                    predecessors=prev,
                    instruction_tokens=0 if i == 0 else 8,
                    output_tokens=int(rng.integers(40, 201)),
                    tool=tool,
                )
            )
            prev = (nid,)
        return AppSpec(
            app_id=f"ic-{index}",
            workload=self.name,
            nodes=nodes,
            initial_tokens=int(rng.integers(600, 1401)),
        )


BUILTIN: dict[str, type[WorkloadGenerator]] = {
    CodeWriter.name: CodeWriter,
    DeepResearch.name: DeepResearch,
    ReactCoding.name: ReactCoding,
    InferceptSingle.name: InferceptSingle,
}


def get_generator(name_or_path: str) -> WorkloadGenerator:
    """A built-in by name, a scenario of the workload family (``family:<seed>``, see
    ``sim/family.py``), or a user's workload file (``.json``) by path."""
    if name_or_path in BUILTIN:
        return BUILTIN[name_or_path]()
    if name_or_path.startswith("family:"):
        from tokencake.sim.family import FamilyWorkload, scenario_from_name

        return FamilyWorkload(scenario_from_name(name_or_path))
    p = Path(name_or_path)
    if p.suffix == ".json" or p.exists():
        from tokencake.sim.userfile import FileWorkload

        return FileWorkload.load(p)
    raise WorkloadError(
        f"unknown workload {name_or_path!r}; built-ins: {', '.join(sorted(BUILTIN))}"
    )
