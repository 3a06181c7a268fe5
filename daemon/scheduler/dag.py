"""Structural analysis of an application DAG, done once at registration in O(V + E).

Expected node time = expected LLM time + expected tool time (defaults when the app gave
none). From it, for every node:

* ``head``: longest expected time from any source to the node's start;
* ``tail``: longest expected time from the node's start to the end of the app;
* ``slack`` = critical length - head - tail: how long the node may be delayed without
  delaying the app; zero on the critical path;
* depth (edges from a source), remaining depth (edges to a sink), fan-out, fan-in, and
  the join group (the join node a branch feeds, when that join has several inputs);
* ``next_gap``: expected time between this node's end and its earliest successor's
  start (the successor waits for other join branches): how long its KV sits unused.
"""

from __future__ import annotations

import graphlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from tokencake.protocol import AppDag

logger = logging.getLogger(__name__)

CRITICAL_TOLERANCE = 0.01
"""A node is on the critical path when its slack is within 1 % of the critical length."""


class DagError(ValueError):
    """A DAG the scheduler cannot analyse (a cycle, or an edge to an unknown node)."""


@dataclass(slots=True)
class NodeInfo:
    node_id: str
    agent_type: str
    importance: float
    tool_kind: str
    expected_llm_s: float
    expected_tool_s: float
    duration_s: float = 0.0
    head_s: float = 0.0
    tail_s: float = 0.0
    slack_s: float = 0.0
    depth: int = 0
    remaining_depth: int = 0
    fan_out: int = 0
    fan_in: int = 0
    join_group: str = ""
    on_critical_path: bool = False
    next_gap_s: float = math.inf
    succ: list[int] = field(default_factory=list)
    pred: list[int] = field(default_factory=list)


@dataclass(slots=True, weakref_slot=True)
class DagInfo:
    """An application DAG's analysis. Read-only once ``analyse`` returns it: the apps that
    registered the same DAG share one (``AccountingPolicy._analysed``)."""

    nodes: list[NodeInfo]
    index: dict[str, int]
    critical_length_s: float
    critical_path: list[str]
    max_fan_out: int
    join_sizes: dict[str, int]


def analyse(dag: AppDag, llm_s_default: float, tool_s_default: float) -> DagInfo:
    """Analyse ``dag``. Raises DagError for cycles and dangling edges."""
    nodes, index = _nodes(dag, llm_s_default, tool_s_default)
    order = [index[i] for i in topological_order(index, _edges(nodes))]
    _forward(nodes, order)
    _backward(nodes, order)
    length = max((n.head_s + n.tail_s for n in nodes), default=0.0)
    join_sizes = _slack_and_joins(nodes, length)
    ids = [nodes[i].node_id for i in order]
    preds = {n.node_id: [nodes[j].node_id for j in n.pred] for n in nodes}
    path = longest_path(ids, preds, {n.node_id: n.duration_s for n in nodes})
    return DagInfo(
        nodes=nodes,
        index=index,
        critical_length_s=length,
        critical_path=path,
        max_fan_out=max((n.fan_out for n in nodes), default=0),
        join_sizes=join_sizes,
    )


def _nodes(
    dag: AppDag, llm_s_default: float, tool_s_default: float
) -> tuple[list[NodeInfo], dict[str, int]]:
    """One ``NodeInfo`` per node (expected times defaulted), linked by the edges."""
    nodes: list[NodeInfo] = []
    index: dict[str, int] = {}
    for n in dag.nodes:
        if n.id in index:
            raise DagError(f"duplicate node id {n.id!r}")
        llm = n.expected_llm_s if n.expected_llm_s > 0 else llm_s_default
        tool = (
            n.expected_tool_s if n.expected_tool_s > 0 else (tool_s_default if n.tool_kind else 0.0)
        )
        info = NodeInfo(
            node_id=n.id,
            agent_type=n.agent_type or n.id,
            importance=n.importance if n.importance > 0 else 1.0,
            tool_kind=n.tool_kind,
            expected_llm_s=llm,
            expected_tool_s=tool,
            duration_s=llm + tool,
        )
        index[n.id] = len(nodes)
        nodes.append(info)
    for src, dst in dag.edges:
        if src not in index or dst not in index:
            raise DagError(f"edge {src!r} -> {dst!r} names an unknown node")
        a, b = index[src], index[dst]
        if b in nodes[a].succ:
            continue
        nodes[a].succ.append(b)
        nodes[b].pred.append(a)
    return nodes, index


def _forward(nodes: list[NodeInfo], order: list[int]) -> None:
    """Sources to sinks: fan-out, fan-in, each node's ``head_s`` and depth."""
    for i in order:
        node = nodes[i]
        node.fan_out = len(node.succ)
        node.fan_in = len(node.pred)
        for j in node.succ:
            s = nodes[j]
            s.head_s = max(s.head_s, node.head_s + node.duration_s)
            s.depth = max(s.depth, node.depth + 1)


def _backward(nodes: list[NodeInfo], order: list[int]) -> None:
    """Sinks to sources: each node's ``tail_s`` and remaining depth."""
    for i in reversed(order):
        node = nodes[i]
        best = 0.0
        rdepth = 0
        for j in node.succ:
            best = max(best, nodes[j].tail_s)
            rdepth = max(rdepth, nodes[j].remaining_depth + 1)
        node.tail_s = node.duration_s + best
        node.remaining_depth = rdepth


def _slack_and_joins(nodes: list[NodeInfo], length: float) -> dict[str, int]:
    """Slack, critical-path membership, ``next_gap_s`` and join groups; the join sizes."""
    tol = CRITICAL_TOLERANCE * length
    join_sizes: dict[str, int] = {}
    for node in nodes:
        node.slack_s = max(0.0, length - node.head_s - node.tail_s)
        node.on_critical_path = node.slack_s <= tol
        if node.succ:
            node.next_gap_s = min(
                max(0.0, nodes[j].head_s - node.head_s - node.duration_s) for j in node.succ
            )
        joins = [nodes[j] for j in node.succ if nodes[j].fan_in > 1]
        if joins:
            node.join_group = joins[0].node_id
            join_sizes[node.join_group] = joins[0].fan_in
    return join_sizes


def _edges(nodes: list[NodeInfo]) -> list[tuple[str, str]]:
    return [(n.node_id, nodes[j].node_id) for n in nodes for j in n.succ]


def topological_order(ids: Iterable[str], edges: Iterable[tuple[str, str]]) -> list[str]:
    """``ids`` in dependency order (``graphlib``): ready nodes first in the order declared,
    then in the order they became ready. Every edge must name declared ids (the callers
    check; each reports a dangling edge its own way). Raises DagError on a cycle."""
    sorter: graphlib.TopologicalSorter[str] = graphlib.TopologicalSorter()
    for node_id in ids:
        sorter.add(node_id)
    for src, dst in edges:
        sorter.add(dst, src)
    try:
        return list(sorter.static_order())
    except graphlib.CycleError:
        raise DagError("the DAG has a cycle") from None


def longest_path(
    order: Sequence[str], preds: Mapping[str, Sequence[str]], weight: Mapping[str, float]
) -> list[str]:
    """The heaviest source-to-sink path by node ``weight``, from source to sink; ``order``
    is a topological order. Ties go to the earlier node in ``order`` (predecessors: the
    first listed), so the same DAG always gives the same path."""
    best: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for node_id in order:
        prev = max(preds[node_id], key=best.__getitem__, default=None)
        best[node_id] = weight[node_id] + (best[prev] if prev is not None else 0.0)
        via[node_id] = prev
    cur = max(best, key=best.__getitem__) if best else None
    path: list[str] = []
    while cur is not None:
        path.append(cur)
        cur = via[cur]
    path.reverse()
    return path
