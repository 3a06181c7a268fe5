"""What the simulator tells the policy about an application: its DAG with expected
durations, and which nodes lie on its critical path."""

from __future__ import annotations

from tokencake.daemon.scheduler.dag import longest_path, topological_order
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


def critical_path(app: AppDag) -> set[str]:
    """Nodes on the longest path by expected LLM + tool time (ties: first declared)."""
    weight = {n.id: n.expected_llm_s + n.expected_tool_s for n in app.nodes}
    preds: dict[str, list[str]] = {n.id: [] for n in app.nodes}
    for src, dst in app.edges:
        preds[dst].append(src)
    return set(longest_path(topological_order(weight, app.edges), preds, weight))
