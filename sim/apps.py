"""The agent applications the engine model serves: what their client library would send.

An app arrives and registers its DAG; each node becomes an LLM request once its
predecessors are done (a ``local`` node is done at once); a call that ends in a tool call
starts it and schedules its end; the app ends with its last node. The engine
(``engine.Simulator``) runs the requests; these functions move the apps along and tell the
policy, in the order a client sends the events.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokencake.daemon.scheduler import WaitingRequest
from tokencake.protocol import AppEnd, LlmCallStart, RegisterApp, ToolCallEnd, ToolCallStart
from tokencake.sim.appdag import app_dag, critical_path
from tokencake.sim.kvpool import chain_keys
from tokencake.sim.records import TOOL_END, AppRun, Request, SimulationError
from tokencake.sim.workload import AppSpec, NodeSpec, prompt_tokens

if TYPE_CHECKING:
    from tokencake.sim.engine import Simulator


def arrive(sim: Simulator, spec: AppSpec) -> None:
    succ: dict[str, list[str]] = {n.id: [] for n in spec.nodes}
    for n in spec.nodes:
        for p in n.predecessors:
            succ[p].append(n.id)
    dag = app_dag(spec, sim.profile)
    run = AppRun(
        spec=spec,
        pending_preds={n.id: len(n.predecessors) for n in spec.nodes},
        successors=succ,
        critical=critical_path(dag),
        nodes_left=len(spec.nodes),
    )
    sim.apps_in_flight += 1
    sim._emit(RegisterApp(spec.app_id, dag))
    for n in spec.nodes:
        if not n.predecessors:
            ready(sim, run, n)


def ready(sim: Simulator, run: AppRun, node: NodeSpec) -> None:
    if node.kind == "local":
        node_done(sim, run, node)
        return
    spec = run.spec
    ck = (spec.app_id, node.id)
    cached = sim.key_cache.get(ck)
    if cached is None:
        prompt = spec.prompts[node.id]
        seq = (*prompt, spec.outputs[node.id])
        cached = (chain_keys(seq, sim.bt), prompt_tokens(prompt))
        sim.key_cache[ck] = cached
    keys, ptoks = cached
    if not sim.pool.unbounded:
        largest = -(-(ptoks + node.output_tokens) // sim.bt)
        if largest > sim.pool.total:
            raise SimulationError(
                f"{spec.app_id}/{node.id} needs {largest} blocks; the pool has "
                f"{sim.pool.total}: it can never run"
            )
    sim._rid += 1
    rid = f"r{sim._rid}"
    agent = sim._agent(spec.app_id, node.id)
    need = -(-ptoks // sim.bt)
    view = WaitingRequest(rid, spec.app_id, node.id, need, sim.now)
    req = Request(
        rid=rid,
        app=run,
        node=node,
        agent=agent,
        keys=keys,
        prompt_tokens=ptoks,
        output_tokens=node.output_tokens,
        view=view,
        ready_s=sim.now,
        enqueued_s=sim.now,
    )
    sim.by_rid[rid] = req
    sim.waiting.append(req)
    if sim.call_trace is not None:
        sim.call_trace.submitted(req, sim.now)
    sim._emit(LlmCallStart(spec.app_id, node.id, request_id=rid, prompt_tokens=ptoks, blocks=need))


def node_done(sim: Simulator, run: AppRun, node: NodeSpec) -> None:
    run.nodes_left -= 1
    last = run.nodes_left == 0
    for s in run.successors[node.id]:
        run.pending_preds[s] -= 1
        if run.pending_preds[s] == 0:
            ready(sim, run, run.spec.node(s))
    if last:
        run.finish_s = sim.now
        sim.apps_in_flight -= 1
        sim.results_latency.append(sim.now - run.spec.arrival_s)
        sim.results_critical.append(run.critical_llm_s)
        sim.results_queue.append(run.queue_s)
        sim.results_plain.append(run.spec.plain)
        sim._emit(AppEnd(run.spec.app_id))


def tool_end(sim: Simulator, req: Request) -> None:
    spec = req.app.spec
    sim._emit(ToolCallEnd(spec.app_id, req.node.id, req.rid))
    node_done(sim, req.app, req.node)


def call_finished(sim: Simulator, req: Request) -> None:
    """The request's LLM call ended: its tool call starts, or the node is done."""
    tool = req.node.tool
    if tool is None:
        node_done(sim, req.app, req.node)
        return
    spec = req.app.spec
    sim._emit(ToolCallStart(spec.app_id, req.node.id, tool.kind, tool.predicted_s, req.rid))
    sim._push(sim.now + tool.duration_s, TOOL_END, req)
