"""Per-class latency in every record, and an oracle that never drops or recomputes."""

from __future__ import annotations

from tokencake.daemon.scheduler import create_policy
from tokencake.sim.engine import Simulator
from tokencake.sim.metrics import by_class
from tokencake.sim.profiles import get_profile
from tokencake.sim.runner import OraclePolicy, policy_config, run_one
from tokencake.sim.workload import AppSpec, NodeSpec, SegmentIds, ToolSpec, Trace, compose

PROFILE = get_profile("qwen2.5-14b-a800")


def _long_tool_trace() -> Trace:
    """One agent calls a 100 s tool (past the 60 s safety deadline), then a second reads its
    context; and one plain request arriving alongside."""
    ids = SegmentIds()
    agent = AppSpec(
        "a0",
        "t",
        [
            NodeSpec("n0", "w", output_tokens=50, tool=ToolSpec("slow", 100.0, 20, 1.0)),
            NodeSpec("n1", "w", predecessors=("n0",), output_tokens=50),
        ],
        initial_tokens=2000,
    )
    plain = AppSpec("p0", "t", [NodeSpec("q", "plain", output_tokens=30)], 800, 0.5, plain=True)
    for app in (agent, plain):
        compose(app, ids)
    return Trace("t", 0, 1.0, [agent, plain])


def test_by_class_splits_plain_and_agent_latency() -> None:
    got = by_class([10.0, 2.0, 4.0, 30.0], [False, True, True, False])
    assert got["plain"] == {"n": 2, "mean_latency_s": 3.0, "p95_latency_s": 3.9}
    assert got["agent"]["n"] == 2 and got["agent"]["mean_latency_s"] == 20.0
    empty = by_class([1.0], [False])["plain"]
    assert empty == {"n": 0, "mean_latency_s": None, "p95_latency_s": None}


def test_every_record_carries_by_class() -> None:
    rec, _ = run_one("code-writer", "tokencake", 1.0, PROFILE, seed=0, n_apps=2)
    assert rec["by_class"]["agent"]["n"] == 2 and rec["by_class"]["plain"]["n"] == 0
    assert rec["by_class"]["agent"]["mean_latency_s"] == rec["mean_latency_s"]


def test_oracle_keeps_kv_past_the_safety_deadline() -> None:
    """vLLM's tracking policy drops an overdue tool call's KV (the next call recomputes it);
    the oracle's never does, with the same unbounded pool."""
    cfg = policy_config(PROFILE)
    runs = {}
    for name, pol in (("vllm", create_policy("vllm", cfg)), ("oracle", OraclePolicy(cfg))):
        sim = Simulator(_long_tool_trace(), pol, PROFILE, unbounded_gpu=True)
        res = sim.run()
        runs[name] = (res, sim)
        assert sorted(res.app_plain) == [False, True]
    vllm, oracle = runs["vllm"][0], runs["oracle"][0]
    assert vllm.counters.recompute_tokens > 0 and vllm.counters.decisions.get("drop", 0) > 0
    assert oracle.counters.recompute_tokens == 0 and "drop" not in oracle.counters.decisions
    assert max(oracle.app_latency_s) < max(vllm.app_latency_s)
