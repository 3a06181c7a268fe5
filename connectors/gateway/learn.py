"""What the gateway learns from traffic: tool durations and app structures.

``ToolDurations`` keeps the last ``window`` observed durations per (model, tool name) and
predicts their median (robust to the odd slow call). With no observation yet it predicts
nothing, and the daemon's own predictor decides.

``Structures`` keeps, per root agent type, the structure of the last finished app instance
that started with an agent of that type: its agents (by type, in arrival order) and which
followed which. The next instance with the same root is registered with that DAG, so the
daemon's spatial scheduler sees the whole app from its first request.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict, deque
from dataclasses import dataclass, field


class ToolDurations:
    def __init__(self, window: int = 64, capacity: int = 4096) -> None:
        self.window = window
        self.capacity = capacity
        self._obs: OrderedDict[tuple[str, str], deque[float]] = OrderedDict()
        self._by_type: dict[str, deque[float]] = {}

    def observe(self, model: str, tool: str, seconds: float, agent_type: str = "") -> None:
        key = (model, tool)
        window = self._obs.get(key)
        if window is None:
            window = self._obs[key] = deque(maxlen=self.window)
            while len(self._obs) > self.capacity:
                self._obs.popitem(last=False)
        window.append(seconds)
        self._obs.move_to_end(key)
        if agent_type:
            self._by_type.setdefault(agent_type, deque(maxlen=self.window)).append(seconds)
            if len(self._by_type) > self.capacity:
                self._by_type.pop(next(iter(self._by_type)))

    def predict(self, model: str, tool: str) -> float | None:
        window = self._obs.get((model, tool))
        return statistics.median(window) if window else None

    def expected_for_type(self, agent_type: str) -> float:
        """Median tool time of an agent type (0.0 unknown): the DAG node's expected_tool_s."""
        window = self._by_type.get(agent_type)
        return statistics.median(window) if window else 0.0

    def table(self) -> list[dict[str, object]]:
        return [
            {"model": m, "tool": t, "observations": len(w), "median_s": statistics.median(w)}
            for (m, t), w in self._obs.items()
        ]


@dataclass(slots=True)
class Structure:
    """Agents of one app instance (node id -> agent type, arrival order) and its edges."""

    nodes: dict[str, str] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    seen: int = 1

    def add_node(self, agent_type: str, wanted: str = "") -> str:
        """A fresh node id for an agent of ``agent_type`` (``wanted``, else the type, ~2...)."""
        base = wanted or agent_type
        node, n = base, 1
        while node in self.nodes:
            n += 1
            node = f"{base}~{n}"
        self.nodes[node] = agent_type
        return node

    def add_edge(self, src: str, dst: str) -> None:
        if src != dst and src in self.nodes and dst in self.nodes and (src, dst) not in self.edges:
            self.edges.append((src, dst))

    def same_shape(self, other: Structure) -> bool:
        return self.nodes == other.nodes and sorted(self.edges) == sorted(other.edges)


class Structures:
    def __init__(self, capacity: int = 1024) -> None:
        self.capacity = capacity
        self._templates: OrderedDict[str, Structure] = OrderedDict()

    def template(self, root_type: str) -> Structure | None:
        return self._templates.get(root_type)

    def learn(self, root_type: str, observed: Structure) -> None:
        """An instance rooted at ``root_type`` finished with structure ``observed``."""
        if len(observed.nodes) < 2:
            return  # a lone agent: nothing to learn about who follows whom
        old = self._templates.get(root_type)
        learnt = Structure(dict(observed.nodes), list(observed.edges))
        if old is not None and old.same_shape(learnt):
            learnt.seen = old.seen + 1
        self._templates[root_type] = learnt
        self._templates.move_to_end(root_type)
        while len(self._templates) > self.capacity:
            self._templates.popitem(last=False)

    def table(self) -> list[dict[str, object]]:
        return [
            {"root_type": root, "nodes": dict(s.nodes), "edges": list(s.edges), "seen": s.seen}
            for root, s in self._templates.items()
        ]
