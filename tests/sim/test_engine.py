"""Engine invariants with the real policies: budget, completion, conservation, determinism."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from tokencake.daemon.scheduler import (
    CachedKv,
    Policy,
    WaitingRequest,
    create_policy,
)
from tokencake.daemon.scheduler.events import Event
from tokencake.protocol import (
    DecisionReason,
    DecisionRecord,
    OffloadDecision,
    ToolCallEnd,
    ToolCallStart,
    UploadDecision,
)
from tokencake.sim.engine import SimulationError, SimulationStalled, Simulator
from tokencake.sim.generators import get_generator, make_trace
from tokencake.sim.kvpool import GpuPool, chain_keys
from tokencake.sim.profiles import PROFILES, get_profile
from tokencake.sim.runner import policy_config, run_one
from tokencake.sim.workload import Trace

# A small pool so a handful of apps is under real memory pressure.
TIGHT = get_profile("qwen2.5-14b-a800").with_overrides(gpu_mem_util=0.425)


def _trace(name: str = "code-writer", n: int = 3, qps: float = 1.0) -> Trace:
    return make_trace(get_generator(name), qps=qps, seed=0, n_apps=n)


def test_profiles_give_the_published_block_count() -> None:
    assert get_profile("qwen2.5-14b-a800").gpu_blocks == 3050
    assert get_profile("qwen2.5-14b-a800").block_bytes == 3 * 1024 * 1024
    for p in PROFILES.values():
        assert p.step_s(8192, 0, 0) > p.step_s(1, 0, 0) > 0


def test_chain_keys_depend_on_the_whole_prefix() -> None:
    a = chain_keys([(1, 40)], 16)
    b = chain_keys([(1, 32), (2, 8)], 16)
    assert len(a) == 2 and a[:2] == b[:2]
    c = chain_keys([(3, 16), (1, 24)], 16)
    assert a[0] != c[1]


@pytest.mark.parametrize("policy", ["vllm", "tokencake", "lru-offload"])
def test_invariants_under_pressure(policy: str) -> None:
    """Blocks never exceed the budget, every app and request completes, bytes balance."""
    assert TIGHT.gpu_blocks < 1200
    tr = _trace(n=2)
    sim = Simulator(tr, create_policy(policy, policy_config(TIGHT)), TIGHT, check_invariants=True)
    res = sim.run()
    sim.pool.check()
    c = res.counters
    assert len(res.app_latency_s) == 2
    assert not sim.waiting and not sim.running and not sim.loading and not sim.by_rid
    assert res.peak_used_blocks <= TIGHT.gpu_blocks
    assert sim.pool.used == 0
    # Conservation of bytes moved: each way, bytes = blocks moved x block size, and
    # nothing is uploaded that was never offloaded (the host starts empty).
    assert c.offload_bytes == c.offload_blocks * TIGHT.block_bytes
    assert c.upload_bytes == c.upload_blocks * TIGHT.block_bytes
    # Host blocks: every block written is still there, evicted or dropped.
    stored = c.offload_blocks - c.host_evicted_blocks - c.host_dropped_blocks
    assert len(sim.host.lru) == stored and not sim.host.writing
    # Nothing comes back from the host that never went there.
    if c.offload_blocks == 0:
        assert c.upload_blocks == 0 and c.host_hit_tokens == 0
    if policy == "vllm":
        assert c.offload_bytes == 0 and c.upload_bytes == 0
    # Every prompt token is either computed or reused.
    total_prompt = sum(sum(t for _, t in p) for a in tr.apps for p in a.prompts.values())
    assert c.prefill_tokens + c.gpu_hit_tokens + c.host_hit_tokens >= total_prompt


def test_offload_policies_move_bytes_and_use_host_hits() -> None:
    tr = _trace(n=2)
    sim = Simulator(tr, create_policy("lru-offload", policy_config(TIGHT)), TIGHT)
    c = sim.run().counters
    assert c.offload_blocks > 0
    assert c.host_hit_tokens + c.upload_blocks * TIGHT.block_tokens > 0


def test_lru_eviction_leaves_the_order_to_the_engine() -> None:
    """``lru_eviction``: the engine evicts as vLLM does and never asks the policy."""
    from tokencake.daemon.scheduler.agent_aware import TokenCakePolicy

    class Counting(TokenCakePolicy):
        asked = 0

        def eviction_order(self, candidates: Sequence[CachedKv], now: float) -> list[CachedKv]:
            Counting.asked += 1
            return super().eviction_order(candidates, now)

    asked = {}
    for lru in (False, True):
        Counting.asked = 0
        sim = Simulator(_trace(), Counting(policy_config(TIGHT)), TIGHT, lru_eviction=lru)
        res = sim.run()
        assert len(res.app_latency_s) == 3
        assert res.counters.gpu_evicted_blocks > 0  # there was something to order
        asked[lru] = Counting.asked
    assert asked[False] > 0 and asked[True] == 0
    rec, _ = run_one("code-writer", "tokencake", 1.0, TIGHT, seed=0, n_apps=3, lru_eviction=True)
    assert rec["engine_eviction"] == "lru" and rec["error"] is None


def test_oracle_never_evicts_or_recomputes() -> None:
    prof = get_profile("qwen2.5-14b-a800")
    rec, _ = run_one("code-writer", "oracle", 1.0, prof, seed=0, n_apps=3)
    assert rec["preemptions"] == 0 and rec["recompute_tokens"] == 0
    assert rec["gpu_kv_util"] is None
    assert rec["engine_policy"] == "oracle"
    assert rec["decisions"].get("drop", 0) == 0


def test_same_inputs_same_results() -> None:
    prof = get_profile("qwen2.5-14b-a800")
    a, _ = run_one("deep-research", "tokencake", 1.0, prof, seed=2, n_apps=2)
    b, _ = run_one("deep-research", "tokencake", 1.0, prof, seed=2, n_apps=2)
    assert a["error"] is None
    for k in ("mean_latency_s", "recompute_tokens", "offload_bytes", "preemptions", "steps"):
        assert a[k] == b[k]


def test_memory_pressure_costs_latency() -> None:
    """The same trace is slower on a tight pool than with unbounded memory (vllm policy)."""
    tight, _ = run_one("code-writer", "vllm", 1.0, TIGHT, seed=0, n_apps=3)
    free, _ = run_one("code-writer", "oracle", 1.0, TIGHT, seed=0, n_apps=3)
    assert tight["mean_latency_s"] > free["mean_latency_s"]
    assert tight["recompute_tokens"] > 0


class _PinEverything(Policy):
    """Test double: refuses every eviction, so a tiny pool must stall (detected, not hung)."""

    name = "pin-everything"

    def on_event(self, event: Event, now: float) -> list[DecisionRecord]:
        return []

    def admission_order(
        self, waiting: Sequence[WaitingRequest], now: float
    ) -> list[WaitingRequest]:
        return list(waiting)

    def eviction_order(self, candidates: Sequence[CachedKv], now: float) -> list[CachedKv]:
        return []

    def may_allocate(self, app_id: str, agent_id: str, n_blocks: int, now: float) -> bool:
        return True


def test_a_deadlocking_policy_is_reported() -> None:
    with pytest.raises(SimulationStalled):
        Simulator(_trace(n=2), _PinEverything(), TIGHT, stall_s=5.0).run()


def test_a_request_larger_than_the_pool_is_an_error() -> None:
    prof = get_profile("qwen2.5-14b-a800").with_overrides(gpu_mem_util=0.405)
    with pytest.raises(SimulationError, match="can never run"):
        Simulator(_trace(n=1), create_policy("vllm"), prof).run()


class _Recorder(Policy):
    """Test double wrapping a real policy: checks the event stream the engine produces."""

    name = "recorder"

    def __init__(self, inner: Policy) -> None:
        super().__init__(inner.config)
        self.inner = inner
        self.times: list[float] = []
        self.tool_starts = 0
        self.tool_ends = 0
        self.offloads = 0
        self.uploads = 0

    def on_event(self, event: Event, now: float) -> list[DecisionRecord]:
        self.times.append(now)
        self.tool_starts += isinstance(event, ToolCallStart)
        self.tool_ends += isinstance(event, ToolCallEnd)
        out = self.inner.on_event(event, now)
        self.offloads += sum(isinstance(d, OffloadDecision) for d in out)
        self.uploads += sum(isinstance(d, UploadDecision) for d in out)
        return out

    def admission_order(
        self, waiting: Sequence[WaitingRequest], now: float
    ) -> list[WaitingRequest]:
        return self.inner.admission_order(waiting, now)

    def eviction_order(self, candidates: Sequence[CachedKv], now: float) -> list[CachedKv]:
        return self.inner.eviction_order(candidates, now)

    def may_allocate(self, app_id: str, agent_id: str, n_blocks: int, now: float) -> bool:
        return self.inner.may_allocate(app_id, agent_id, n_blocks, now)


def test_event_stream_is_ordered_and_complete() -> None:
    tr = _trace(n=2)
    rec = _Recorder(create_policy("tokencake", policy_config(TIGHT)))
    Simulator(tr, rec, TIGHT).run()
    assert rec.times == sorted(rec.times)
    assert rec.tool_starts == rec.tool_ends == 2 * 18
    assert DecisionReason("x").rule == "x"


def test_pool_rejects_double_release() -> None:
    pool = GpuPool(4)
    res = pool.allocate(2, list)
    assert res is not None
    blocks, _ = res
    from tokencake.sim.kvpool import AgentKv, PoolInvariantError

    a = AgentKv("app", "n")
    for b in blocks:
        pool.release(b, a, 0.0)
    pool.check()
    with pytest.raises(PoolInvariantError):
        pool.release(blocks[0], a, 0.0)


def test_preempted_request_reloads_its_copied_kv() -> None:
    """Family scenario 81 preempts one request (579 blocks) under tokencake. Its released
    blocks stay cached under its keys (the agent's KV, as after a finished call), so the
    copy the policy decides on the preemption finds them, and the request's readmission
    loads them from the host: nothing is recomputed (7,872 tokens were before)."""
    from tokencake.sim.family import draw_scenario, scenario_qps

    prof = get_profile("qwen2.5-14b-a800")
    qps = scenario_qps(draw_scenario(81, 10), prof)
    rec, _ = run_one("family:81", "tokencake", qps, prof, seed=81, n_apps=10)
    assert rec["preemptions"] >= 1
    assert rec["recompute_tokens"] == 0 and rec["host_hit_tokens"] > 0
