"""The seeded workload family: whole scenarios from one seed, replayable by name."""

from __future__ import annotations

import pytest

from tokencake.sim.family import SHAPES, TOOL_LAWS, FamilyWorkload, draw_scenario, scenario_qps
from tokencake.sim.generators import get_generator, make_trace
from tokencake.sim.profiles import get_profile
from tokencake.sim.runner import run_one
from tokencake.sim.workload import WorkloadError

PROFILE = get_profile("qwen2.5-14b-a800")


def test_draws_cover_the_family() -> None:
    scs = [draw_scenario(s) for s in range(300)]
    assert {s.shape for s in scs} == set(SHAPES)
    assert {s.tool_law for s in scs} == set(TOOL_LAWS)
    assert max(s.size for s in scs if s.shape == "chain") == 12
    assert max(s.size for s in scs if s.shape == "fanout") == 16
    plain = [s.plain_fraction for s in scs]
    assert min(plain) == 0.0 and 0.6 < max(plain) <= 0.7
    assert min(s.context_lo for s in scs) < 600 and max(s.context_hi for s in scs) > 30000
    assert all(512 <= s.context_lo <= s.context_hi <= 32768 for s in scs)
    flight = [s.in_flight for s in scs]
    assert min(flight) < 0.2 and max(flight) > 12  # idle to overload
    assert draw_scenario(5) == draw_scenario(5) and draw_scenario(5) != draw_scenario(6)


def test_a_scenario_replays_by_name() -> None:
    a = make_trace(get_generator("family:17"), qps=0.5, seed=17, n_apps=12)
    b = make_trace(FamilyWorkload(draw_scenario(17)), qps=0.5, seed=17, n_apps=12)
    assert [x.prompts for x in a.apps] == [x.prompts for x in b.apps]
    assert any(x.plain for x in a.apps) and not all(x.plain for x in a.apps)
    for bad in ("family:", "family:x", "family:-1"):
        with pytest.raises(WorkloadError):
            get_generator(bad)


def test_plain_traffic_is_not_starved_by_agent_priority() -> None:
    """family:17: 3-agent chains on 11k-17k-token contexts and 46 % plain requests, heavily
    loaded. Ranked behind every agent app (the old order), plain requests took 2.2x their
    vllm latency; ranked as apps PLAIN_HEAD_START_S old, they take less than under vllm."""
    sc = draw_scenario(17)
    qps = scenario_qps(sc, PROFILE)
    runs = {
        p: run_one("family:17", p, qps, PROFILE, seed=17, n_apps=sc.n_apps)[0]
        for p in ("vllm", "tokencake")
    }
    plain = {p: r["by_class"]["plain"]["mean_latency_s"] for p, r in runs.items()}
    assert runs["tokencake"]["by_class"]["plain"]["n"] > 0
    assert plain["tokencake"] <= 1.10 * plain["vllm"]
    assert runs["tokencake"]["mean_latency_s"] < runs["vllm"]["mean_latency_s"]
