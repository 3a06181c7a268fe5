"""Sweeps: every (workload, qps, policy) on the same engine model, with the real policies.

``oracle`` is not a scheduler policy: it is the engine with unbounded GPU KV memory, driven
by ``OraclePolicy`` (vLLM's, without the safety deadline's drop). Nothing is ever evicted,
dropped, preempted or recomputed, so it bounds what any policy could reach on this engine
model.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokencake.daemon.scheduler import PolicyConfig, create_policy, list_policies
from tokencake.daemon.scheduler.agents import AgentState
from tokencake.daemon.scheduler.baselines import VllmPolicy
from tokencake.protocol import DecisionRecord
from tokencake.sim.engine import KeyCache, SimulationError, Simulator
from tokencake.sim.generators import get_generator, make_trace
from tokencake.sim.kvpool import PoolInvariantError
from tokencake.sim.metrics import RunMeta, by_class, summarise
from tokencake.sim.profiles import Profile
from tokencake.sim.workload import NoiseConfig

logger = logging.getLogger(__name__)

ORACLE = "oracle"


class OraclePolicy(VllmPolicy):
    """The oracle's policy: vLLM's FCFS and nothing else. It never drops KV (the tracking
    policies' safety deadline drops an overdue tool call's KV, which the next call then
    recomputes: no bound should pay for that) and never moves any."""

    name = ORACLE

    def _on_deadline(self, agent: AgentState, out: list[DecisionRecord]) -> None:
        """Memory is unbounded: an overdue tool call's KV stays where it is."""


def all_policies() -> list[str]:
    return [p.name for p in list_policies()] + [ORACLE]


def resolve_policies(spec: str) -> list[str]:
    if spec.strip() == "all":
        return all_policies()
    names = [s.strip() for s in spec.split(",") if s.strip()]
    known = set(all_policies())
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"unknown policies {bad}; known: {', '.join(sorted(known))}")
    return names


def policy_config(profile: Profile) -> PolicyConfig:
    """The physical facts a policy starts from, taken from the same profile the engine uses."""
    bt = profile.block_tokens
    prefill_s_per_token = profile.step_s(profile.max_batched_tokens, 0, 0) / (
        profile.max_batched_tokens
    )
    return PolicyConfig(
        block_tokens=bt,
        bytes_per_block=profile.block_bytes,
        d2h_bytes_per_s=profile.gpu.host_bytes_per_s,
        h2d_bytes_per_s=profile.gpu.host_bytes_per_s,
        copy_overhead_s=profile.copy_overhead_s,
        host_blocks=profile.host_blocks,
        recompute_s_per_block=prefill_s_per_token * bt,
    )


@dataclass(slots=True)
class Series:
    """Per-run data for the plots (kept out of results.json to keep records flat)."""

    workload: str
    policy: str
    qps: float
    app_latency_s: list[float] = field(default_factory=list)
    timeline: list[tuple[float, float]] = field(default_factory=list)


def failure_record(meta: RunMeta, sim: Simulator, error: Exception) -> dict[str, Any]:
    """The record of a run that did not finish: what it had counted when it stopped."""
    return {
        **meta.identity(),
        "completed_apps": len(sim.results_latency),
        "mean_latency_s": None,
        "p95_latency_s": None,
        "by_class": by_class(sim.results_latency, sim.results_plain),
        "critical_path_latency_s": None,
        "gpu_kv_util": None,
        "recompute_tokens": sim.c.recompute_tokens,
        "offload_bytes": sim.c.offload_bytes,
        "upload_bytes": sim.c.upload_bytes,
        "preemptions": sim.c.preemptions,
        "decisions": dict(sorted(sim.c.decisions.items())),
        "wall_s": meta.wall_s,
        "error": f"{type(error).__name__}: {error}",
    }


def run_one(
    workload: str,
    policy: str,
    qps: float,
    profile: Profile,
    *,
    seed: int,
    n_apps: int | None = None,
    noise: NoiseConfig | None = None,
    key_cache: KeyCache | None = None,
    check_invariants: bool = False,
    lru_eviction: bool = False,
) -> tuple[dict[str, Any], Series]:
    """One run. ``lru_eviction``: the engine evicts LRU, as vLLM does, instead of in the
    policy's ``eviction_order``; its records say ``engine_eviction: "lru"``."""
    gen = get_generator(workload)
    trace = make_trace(gen, qps=qps, seed=seed, n_apps=n_apps, noise=noise)
    unbounded = policy == ORACLE
    engine_policy = ORACLE if unbounded else policy
    cfg = policy_config(profile)
    pol = OraclePolicy(cfg) if unbounded else create_policy(engine_policy, cfg)
    sim = Simulator(
        trace,
        pol,
        profile,
        unbounded_gpu=unbounded,
        key_cache=key_cache,
        check_invariants=check_invariants,
        lru_eviction=lru_eviction,
    )
    t0 = time.perf_counter()
    meta = RunMeta(
        policy=policy,
        engine_policy=engine_policy,
        workload=gen.name,
        profile=profile.name,
        seed=seed,
        qps=qps,
        n_apps=len(trace.apps),
        unbounded_gpu=unbounded,
        wall_s=0.0,
    )
    series = Series(gen.name, policy, qps)
    try:
        res = sim.run()
    except (SimulationError, PoolInvariantError) as e:
        meta.wall_s = time.perf_counter() - t0
        logger.warning("%s/%s at %.3g app/s did not finish: %s", workload, policy, qps, e)
        rec = failure_record(meta, sim, e)
    else:
        meta.wall_s = time.perf_counter() - t0
        series.app_latency_s = list(res.app_latency_s)
        series.timeline = list(res.timeline)
        rec = summarise(res, meta)
    if lru_eviction:
        rec["engine_eviction"] = "lru"
    return rec, series


def sweep(
    workloads: list[str],
    qps_list: list[float],
    policies: list[str],
    profile: Profile,
    *,
    seed: int,
    n_apps: int | None = None,
    noise: NoiseConfig | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
    lru_eviction: bool = False,
) -> tuple[list[dict[str, Any]], list[Series]]:
    records: list[dict[str, Any]] = []
    series: list[Series] = []
    for wl in workloads:
        key_cache: KeyCache = {}  # same apps at every qps (see make_trace): share the keys
        for qps in qps_list:
            for pol in policies:
                rec, s = run_one(
                    wl,
                    pol,
                    qps,
                    profile,
                    seed=seed,
                    n_apps=n_apps,
                    noise=noise,
                    key_cache=key_cache,
                    lru_eviction=lru_eviction,
                )
                records.append(rec)
                series.append(s)
                if progress is not None:
                    progress(rec)
    return records, series
