"""The cluster model's predictive upload follows the daemon's rule (``upload_lead_s``): KV
in L2 is brought back earlier by its L2 fetch, within the tool call before the call."""

from __future__ import annotations

from tokencake.daemon.scheduler.costmodel import upload_lead_s
from tokencake.sim.cluster import ClusterConfig, ClusterSim, _Call, simulate
from tokencake.sim.profiles import DEFAULT_PROFILE, get_profile
from tokencake.sim.workload import AppSpec, NodeSpec

PROFILE = get_profile(DEFAULT_PROFILE)
GIB = 2**30


def run(predictive: bool) -> tuple[float, int, int]:
    cfg = ClusterConfig(hosts=4, host_bytes=1 * GIB, routing="random", predictive_upload=predictive)
    r = simulate("code-writer", PROFILE, cfg, apps=30, qps=0.5, seed=3)
    return r.mean_restore_s, r.host_hit_tokens + r.l2_hit_tokens, r.prompt_tokens


def test_predictive_upload_hides_restores_and_reuses_the_same_tokens() -> None:
    off, on = run(False), run(True)
    assert off[0] > 0
    assert on[0] < off[0]
    assert on[2] == off[2]


def test_the_lead_is_the_policy_rule() -> None:
    sim = ClusterSim(PROFILE, ClusterConfig(predictive_upload=True), seed=0)
    app = AppSpec("a", "test", [], 0)
    node = NodeSpec("n", "coder")
    long_tool = _Call(app, node, 0.0, after_tool_s=1e6)
    bt = PROFILE.block_tokens  # the cluster counts blocks of the profile's size
    host_tok, l2_tok = bt * 100, bt * 60
    expected = upload_lead_s(sim.cost, 160, 60, 64)
    assert sim._upload_early_s(long_tool, host_tok, l2_tok) == expected
    assert expected > upload_lead_s(sim.cost, 160, 0, 64)  # L2 blocks start it earlier
    short_tool = _Call(app, node, 0.0, after_tool_s=expected / 2)
    assert sim._upload_early_s(short_tool, host_tok, l2_tok) == expected / 2
    assert sim._upload_early_s(_Call(app, node, 0.0), host_tok, l2_tok) == 0.0
