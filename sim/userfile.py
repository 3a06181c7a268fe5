"""A user's own workload, described in JSON (schema in docs/workloads.md).

The file is decoded into typed structs, so a misspelt key or a wrong type fails at load time
with the path of the offending field, never half-way through a simulation.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Literal

import msgspec
import numpy as np

from tokencake.sim.workload import (
    AppSpec,
    NodeSpec,
    NoiseConfig,
    ToolSpec,
    WorkloadError,
    WorkloadGenerator,
    validate,
)

logger = logging.getLogger(__name__)

SCHEMA = "tokencake-sim-workload/1"


class TokenRange(msgspec.Struct, forbid_unknown_fields=True):
    min: int
    max: int


class ToolDef(msgspec.Struct, forbid_unknown_fields=True):
    kind: str
    duration_s: float
    sigma: float = 0.0
    result_tokens: int = 0
    hint_s: float | None = None
    preserve_generation: bool = True


class NodeDef(msgspec.Struct, forbid_unknown_fields=True):
    id: str
    agent_type: str = ""
    kind: Literal["llm", "local"] = "llm"
    predecessors: list[str] = []
    instruction_tokens: int = 0
    output_tokens: int = 0
    composition: Literal["append", "fresh"] = "append"
    importance: float = 1.0
    critical: bool | None = None
    tool: ToolDef | None = None


class AppTemplate(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    nodes: list[NodeDef]
    initial_tokens: int | TokenRange = 0
    weight: float = 1.0
    plain: bool = False
    """Plain traffic: its requests carry no agent metadata (the policy never hears of them)."""


class WorkloadFile(msgspec.Struct, forbid_unknown_fields=True):
    schema: str
    name: str
    apps: list[AppTemplate]
    default_apps: int = 24


class FileWorkload(WorkloadGenerator):
    """Applications drawn from the file's templates by weight, seeded like the built-ins."""

    name = "file"
    description = "a user's workload file"

    def __init__(self, spec: WorkloadFile) -> None:
        if spec.schema != SCHEMA:
            raise WorkloadError(f"workload schema {spec.schema!r} is not {SCHEMA!r}")
        if not spec.apps:
            raise WorkloadError("a workload file needs at least one app template")
        if any(a.weight <= 0 for a in spec.apps):
            raise WorkloadError("app template weights must be > 0")
        self.spec = spec
        self.name = spec.name  # type: ignore[misc]
        self.default_apps = spec.default_apps  # type: ignore[misc]
        w = np.array([a.weight for a in spec.apps], dtype=float)
        self._p = w / w.sum()

    @classmethod
    def load(cls, path: Path) -> FileWorkload:
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise WorkloadError(f"cannot read workload file {path}: {e}") from e
        try:
            spec = msgspec.json.decode(raw, type=WorkloadFile)
        except msgspec.ValidationError as e:
            raise WorkloadError(f"{path}: {e}") from e
        except msgspec.DecodeError as e:
            raise WorkloadError(f"{path}: not valid JSON: {e}") from e
        return cls(spec)

    def build_app(self, index: int, rng: np.random.Generator, noise: NoiseConfig) -> AppSpec:
        tmpl = self.spec.apps[int(rng.choice(len(self.spec.apps), p=self._p))]
        init = tmpl.initial_tokens
        if isinstance(init, TokenRange):
            initial = int(rng.integers(init.min, init.max + 1))
        else:
            initial = init
        nodes: list[NodeSpec] = []
        for nd in tmpl.nodes:
            tool = None
            if nd.tool is not None:
                t = nd.tool
                nominal = t.duration_s
                if t.sigma > 0 and nominal > 0:
                    nominal = float(rng.lognormal(math.log(nominal), t.sigma))
                hint = t.duration_s if t.hint_s is None else t.hint_s
                tool = ToolSpec(
                    kind=t.kind,
                    duration_s=noise.actual(nominal, rng),
                    result_tokens=t.result_tokens,
                    predicted_s=noise.predicted(hint, rng),
                    preserve_generation=t.preserve_generation,
                )
            nodes.append(
                NodeSpec(
                    id=nd.id,
                    agent_type=nd.agent_type or nd.id,
                    kind=nd.kind,
                    predecessors=tuple(nd.predecessors),
                    instruction_tokens=nd.instruction_tokens,
                    output_tokens=nd.output_tokens,
                    tool=tool,
                    composition=nd.composition,
                    importance=nd.importance,
                    declared_critical=nd.critical,
                )
            )
        app = AppSpec(
            app_id=f"{tmpl.name}-{index}",
            workload=self.name,
            nodes=nodes,
            initial_tokens=initial,
            plain=tmpl.plain,
        )
        validate(app)
        return app
