"""What the simulator tells the policy about an application: its DAG with expected
durations, and which nodes lie on its critical path."""

from __future__ import annotations

from tokencake.protocol import AppDag, DagNode
from tokencake.sim.profiles import Profile
from tokencake.sim.workload import AppSpec, NodeSpec


def expected_llm_s(node: NodeSpec, profile: Profile) -> float:
    """What a gateway could estimate for one call: decode at a small-batch step time."""
    return node.output_tokens * profile.step_s(1, 4096, 4096)


def app_dag(spec: AppSpec, profile: Profile) -> AppDag:
    nodes = [
        DagNode(
            id=n.id,
            agent_type=n.agent_type,
            importance=n.importance,
            expected_llm_s=expected_llm_s(n, profile) if n.kind == "llm" else 0.0,
            expected_tool_s=(n.tool.predicted_s or 0.0) if n.tool is not None else 0.0,
            tool_kind=n.tool.kind if n.tool is not None else "",
        )
        for n in spec.nodes
    ]
    return AppDag(nodes=nodes, edges=spec.edges)


def critical_path(spec: AppSpec, profile: Profile) -> set[str]:
    """Nodes on the longest path by expected LLM + tool time (ties: first declared)."""
    from tokencake.sim.workload import topological_order

    order = topological_order(spec.nodes)
    best: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for n in order:
        own = 0.0
        if n.kind == "llm":
            own += expected_llm_s(n, profile)
        if n.tool is not None:
            own += n.tool.predicted_s or 0.0
        prev = max(n.predecessors, key=lambda p: best[p], default=None)
        best[n.id] = own + (best[prev] if prev is not None else 0.0)
        via[n.id] = prev
    if not best:
        return set()
    cur: str | None = max(best, key=lambda k: best[k])
    out: set[str] = set()
    while cur is not None:
        out.add(cur)
        cur = via[cur]
    return out
