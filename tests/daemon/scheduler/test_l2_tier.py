"""The policy knows where an agent's host KV lives (arena or L2) and what an L2 fetch costs:
an offloaded agent whose blocks left the arena for L2 is uploaded earlier, by the L2 fetch
time. Decisions in virtual time, fixed seeds."""

from __future__ import annotations

import random

import pytest

from tokencake.daemon.scheduler import (
    EngineState,
    KvTierMoved,
    PolicyConfig,
    TransferDone,
    TransferMeasured,
    create_policy,
)
from tokencake.daemon.scheduler.agent_aware import TokenCakePolicy
from tokencake.daemon.scheduler.costmodel import TransferCostModel, upload_lead_s
from tokencake.protocol import (
    AppDag,
    DagNode,
    LlmCallAdmitted,
    LlmCallFinish,
    LlmCallStart,
    RegisterApp,
    ToolCallStart,
    UploadDecision,
)

MB = 1 << 20
STEP = 0.01


def make(l2_bytes_per_s: float = 1e8) -> TokenCakePolicy:
    conf = PolicyConfig(
        bytes_per_block=MB, d2h_bytes_per_s=1e9, h2d_bytes_per_s=1e9, l2_bytes_per_s=l2_bytes_per_s
    )
    policy = create_policy("tokencake", conf)
    assert isinstance(policy, TokenCakePolicy)
    return policy


def offloaded(policy: TokenCakePolicy, blocks: int, hint_s: float) -> None:
    """Agent ``a`` in a tool call, its ``blocks`` offloaded to the host by t=1.2."""
    dag = AppDag(nodes=[DagNode(id="a", agent_type="coder", tool_kind="test")], edges=[])
    policy.on_event(EngineState(1000, 50, num_waiting=1, waiting_blocks=10), 0.0)
    policy.on_event(RegisterApp("app", dag), 0.0)
    policy.on_event(LlmCallStart("app", "a", request_id="r", blocks=blocks), 0.0)
    policy.on_event(LlmCallAdmitted("app", "a", "r", kv_blocks=blocks), 0.1)
    policy.on_event(LlmCallFinish("app", "a", "r", kv_blocks=blocks), 1.0)
    out = policy.on_event(ToolCallStart("app", "a", "test", hint_s), 1.0)
    assert [d.kind for d in out] == ["offload"]
    policy.on_event(TransferDone("app", "a", "d2h", blocks), 1.2)
    policy.on_event(EngineState(1000, 400, num_waiting=0), 1.3)


def first_upload(policy: TokenCakePolicy, until: float = 60.0) -> tuple[float, UploadDecision]:
    t = 1.5
    while t < until:
        t = round(t + STEP, 6)
        ups = [d for d in policy.tick(t) if isinstance(d, UploadDecision)]
        if ups:
            return t, ups[0]
    raise AssertionError("no upload")


def test_upload_starts_earlier_by_the_l2_fetch() -> None:
    plain, tiered = make(), make()
    for policy in (plain, tiered):
        offloaded(policy, 100, hint_s=20.0)
    tiered.on_event(KvTierMoved("app", "a", 60, to="l2"), 1.4)
    t_plain, up_plain = first_upload(plain)
    t_tiered, up_tiered = first_upload(tiered)
    l2_s = tiered.cost.seconds("l2", 60)  # 1 ms + 60 MiB at 100 MB/s
    assert l2_s == pytest.approx(0.001 + 60 * MB / 1e8)
    assert t_plain - t_tiered == pytest.approx(l2_s, abs=2 * STEP)
    assert up_plain.reason.rule == up_tiered.reason.rule == "predictive_upload"
    assert up_plain.reason.terms["l2_blocks"] == 0
    assert up_tiered.reason.terms["l2_blocks"] == 60


def test_kv_back_from_l2_is_planned_as_host_kv() -> None:
    plain, tiered = make(), make()
    for policy in (plain, tiered):
        offloaded(policy, 100, hint_s=20.0)
    tiered.on_event(KvTierMoved("app", "a", 60, to="l2"), 1.4)
    tiered.on_event(KvTierMoved("app", "a", 60, to="host"), 1.5)
    agent = tiered.apps["app"].agents["a"]
    assert agent.l2_blocks == 0
    # The earlier timer set while the blocks were in L2 fires first (an early start costs
    # some GPU time, never a stall); what counts is that nothing is left in L2 accounting.
    t_tiered, up = first_upload(tiered)
    assert up.reason.terms["l2_blocks"] == 0
    assert t_tiered <= first_upload(plain)[0]


def test_moves_of_unknown_agents_and_more_blocks_than_held_are_bounded() -> None:
    policy = make()
    offloaded(policy, 100, hint_s=20.0)
    assert policy.on_event(KvTierMoved("app", "nobody", 5), 1.4) == []
    assert policy.on_event(KvTierMoved("other-app", "a", 5), 1.4) == []
    policy.on_event(KvTierMoved("app", "a", 1000, to="l2"), 1.4)
    assert policy.apps["app"].agents["a"].l2_blocks == 100  # at most the host blocks
    policy.on_event(KvTierMoved("app", "a", 1000, to="host"), 1.5)
    assert policy.apps["app"].agents["a"].l2_blocks == 0


def test_measured_l2_fetches_set_the_lead() -> None:
    """The daemon measures L2 gets and feeds them as ``TransferMeasured("l2")``."""
    policy = make(l2_bytes_per_s=1e10)
    before = policy.cost.seconds("l2", 64)
    for i in range(20):  # a slow store: 16 blocks a fetch at 50 MB/s, 2 ms each
        policy.on_event(TransferMeasured("l2", 16 * MB, 0.002 + 16 * MB / 5e7, 16), 2.0 + i)
    after = policy.cost.seconds("l2", 64)
    assert after > 10 * before
    assert policy.cost.bandwidth("l2") == pytest.approx(5e7, rel=0.1)
    assert policy.cost.seconds("h2d", 64) == pytest.approx(0.002 + 64 * MB / 1e9)  # untouched


@pytest.mark.parametrize("seed", range(8))
def test_lead_grows_with_the_blocks_in_l2(seed: int) -> None:
    """Property: more of an agent's blocks in L2 never makes its upload start later."""
    rng = random.Random(seed)
    cost = TransferCostModel(MB, 1e9, rng.uniform(1e9, 2e10), 0.002, rng.uniform(1e7, 1e10))
    blocks = rng.randint(1, 2000)
    piece = rng.choice([16, 64, 256])
    leads = [
        upload_lead_s(cost, blocks, k, piece) for k in range(0, blocks + 1, max(1, blocks // 17))
    ]
    assert leads == sorted(leads)
    assert leads[0] == pytest.approx(cost.seconds("h2d", blocks, -(-blocks // piece)))
    assert upload_lead_s(cost, blocks, 10 * blocks, piece) == upload_lead_s(
        cost, blocks, blocks, piece
    )
    assert upload_lead_s(cost, 0, 5, piece) == 0.0
