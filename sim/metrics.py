"""From one engine run to the reported record: every number here is measured in that run.

Definitions (docs/benchmarks.md repeats them):

* latency: application end-to-end, arrival -> last node done; mean, p50, p95, p99.
* critical_path_latency_s: per app, the time the nodes on its critical path (longest path by
  expected LLM + tool time) spent in the engine, ready -> LLM call done (queueing, loads,
  prefill, decode; tool time excluded), averaged over apps. It isolates what scheduling
  does to the path that bounds the app.
* gpu_kv_util: effective GPU KV utilisation as the paper defines it, time-averaged over the
  run: blocks held by requests that run or are about to run (running, loading their prefix,
  or an in-flight upload for the agent's next call), over the pool's blocks. Cached-but-idle
  blocks do not count. ``None`` for the oracle, whose pool has no size.
* recompute_tokens: prefill tokens whose KV had been computed before (a prefix miss or a
  preemption), i.e. work done twice.
* by_class: the latency of plain traffic (apps without agent metadata) and of agent apps,
  each ``{"n", "mean_latency_s", "p95_latency_s"}`` (None when the class has no app).
* queueing_s: per app, the sum over its LLM calls of the time spent waiting for admission
  (including after preemptions), averaged over apps.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from tokencake.sim.engine import EngineResult

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RunMeta:
    policy: str
    engine_policy: str
    workload: str
    profile: str
    seed: int
    qps: float
    n_apps: int
    unbounded_gpu: bool
    wall_s: float

    def identity(self) -> dict[str, Any]:
        """The fields that name a run, first in every record."""
        return {
            "policy": self.policy,
            "engine_policy": self.engine_policy,
            "workload": self.workload,
            "profile": self.profile,
            "seed": self.seed,
            "qps": self.qps,
            "n_apps": self.n_apps,
        }


CLASSES = ("plain", "agent")


def by_class(latency_s: list[float], plain: list[bool]) -> dict[str, dict[str, Any]]:
    """Latency per traffic class: ``plain`` (no agent metadata) and ``agent``."""
    out: dict[str, dict[str, Any]] = {}
    for name in CLASSES:
        want = name == "plain"
        lat = np.asarray([x for x, p in zip(latency_s, plain, strict=True) if p == want])
        out[name] = {
            "n": len(lat),
            "mean_latency_s": float(lat.mean()) if len(lat) else None,
            "p95_latency_s": float(np.percentile(lat, 95)) if len(lat) else None,
        }
    return out


def summarise(res: EngineResult, meta: RunMeta) -> dict[str, Any]:
    lat = np.asarray(res.app_latency_s, dtype=float)
    c = res.counters
    n = max(len(lat), 1)
    hits = c.gpu_hit_tokens + c.host_hit_tokens
    events = c.heap_events + c.policy_events + c.ticks + c.steps
    util = None
    if not meta.unbounded_gpu:
        util = res.util_integral / (res.util_window_s * res.gpu_blocks)
    return {
        **meta.identity(),
        "completed_apps": len(lat),
        "mean_latency_s": float(lat.mean()) if len(lat) else None,
        "p50_latency_s": float(np.percentile(lat, 50)) if len(lat) else None,
        "p95_latency_s": float(np.percentile(lat, 95)) if len(lat) else None,
        "p99_latency_s": float(np.percentile(lat, 99)) if len(lat) else None,
        "by_class": by_class(res.app_latency_s, res.app_plain),
        "critical_path_latency_s": float(np.mean(res.critical_llm_s)) if len(lat) else None,
        "gpu_kv_util": util,
        "peak_gpu_blocks": res.peak_used_blocks,
        "gpu_blocks": res.gpu_blocks,
        "recompute_tokens": c.recompute_tokens,
        "prefill_tokens": c.prefill_tokens,
        "gpu_hit_tokens": c.gpu_hit_tokens,
        "host_hit_tokens": c.host_hit_tokens,
        "prefix_reuse": hits / (hits + c.prefill_tokens) if hits + c.prefill_tokens else 0.0,
        "offload_bytes": c.offload_bytes,
        "upload_bytes": c.upload_bytes,
        "offload_blocks": c.offload_blocks,
        "upload_blocks": c.upload_blocks,
        "offload_unread_blocks": c.offload_unread_blocks,
        "gpu_evicted_blocks": c.gpu_evicted_blocks,
        "host_evicted_blocks": c.host_evicted_blocks,
        "failed_uploads": c.failed_uploads,
        "preemptions": c.preemptions,
        "queueing_s": float(np.mean(res.app_queue_s)) if len(lat) else None,
        "breakdown_s": {
            "queueing": c.time_queue_s / n,
            "transfer_wait": c.time_load_s / n,
            "prefill_recompute": c.time_prefill_re_s / n,
            "prefill_new": c.time_prefill_new_s / n,
            "decode": c.time_decode_s / n,
        },
        "decisions": dict(sorted(c.decisions.items())),
        "makespan_s": res.makespan_s,
        "steps": c.steps,
        "events": events,
        "wall_s": meta.wall_s,
        "events_per_s": events / meta.wall_s if meta.wall_s > 0 else None,
        "error": None,
    }


def target_ratios(records: list[dict[str, Any]], qps: float) -> dict[str, Any] | None:
    """The issue's four targets at ``qps``, as measured ratios (None where a run is missing)."""
    at = {r["policy"]: r for r in records if r["qps"] == qps and r["mean_latency_s"] is not None}
    tc, vl = at.get("tokencake"), at.get("vllm")
    if tc is None or vl is None:
        return None
    peers = [r for p, r in at.items() if p != "oracle" and not p.startswith("tokencake")]
    best = min(peers, key=lambda r: r["mean_latency_s"]) if peers else None
    oracle = at.get("oracle")
    out: dict[str, Any] = {
        "qps": qps,
        "vs_vllm": tc["mean_latency_s"] / vl["mean_latency_s"],
        "best_peer": best["policy"] if best else None,
        "vs_best_peer": tc["mean_latency_s"] / best["mean_latency_s"] if best else None,
        "vs_oracle": tc["mean_latency_s"] / oracle["mean_latency_s"] if oracle else None,
        "util_gain": (
            tc["gpu_kv_util"] / vl["gpu_kv_util"] - 1.0
            if tc["gpu_kv_util"] is not None and vl["gpu_kv_util"]
            else None
        ),
    }
    out["met"] = {
        "vs_vllm<=0.53": out["vs_vllm"] <= 0.53,
        "vs_best_peer<=0.85": out["vs_best_peer"] is not None and out["vs_best_peer"] <= 0.85,
        "vs_oracle<=1.25": out["vs_oracle"] is not None and out["vs_oracle"] <= 1.25,
        "util_gain>=+16.9%": out["util_gain"] is not None and out["util_gain"] >= 0.169,
    }
    return out
