"""The policy's arena accounting with an L2 tier: blocks that left the arena for L2 take no
arena room (``host_used``), blocks brought back take it again, and a host copy's losses
leave the arena first. Decisions in virtual time, fixed seeds."""

from __future__ import annotations

import random

import pytest

from tokencake import protocol as p
from tokencake.daemon.scheduler import (
    EngineState,
    KvEvicted,
    KvTierMoved,
    PolicyConfig,
    TransferDone,
    create_policy,
)
from tokencake.daemon.scheduler.agent_aware import TokenCakePolicy

MB = 1 << 20
AGENTS = ("a", "b", "c")


def make(host_blocks: int) -> TokenCakePolicy:
    conf = PolicyConfig(
        bytes_per_block=MB, d2h_bytes_per_s=1e9, h2d_bytes_per_s=1e9, host_blocks=host_blocks
    )
    policy = create_policy("tokencake", conf)
    assert isinstance(policy, TokenCakePolicy)
    dag = p.AppDag(nodes=[p.DagNode(a, agent_type="coder", tool_kind="test") for a in AGENTS])
    policy.on_event(EngineState(1000, 50, num_waiting=1, waiting_blocks=10), 0.0)
    policy.on_event(p.RegisterApp("app", dag), 0.0)
    return policy


def tool_call(policy: TokenCakePolicy, agent: str, blocks: int, t: float) -> p.DecisionRecord:
    """The agent's call leaves ``blocks`` on the GPU and its 20 s tool call starts at ``t``
    (under pressure); returns the policy's first decision for its KV."""
    policy.on_event(p.LlmCallStart("app", agent, request_id=agent, blocks=blocks), t)
    policy.on_event(p.LlmCallAdmitted("app", agent, agent, kv_blocks=blocks), t)
    policy.on_event(p.LlmCallFinish("app", agent, agent, kv_blocks=blocks), t + 0.5)
    policy.on_event(EngineState(1000, 50, num_waiting=1, waiting_blocks=10), t + 0.5)
    out = policy.on_event(p.ToolCallStart("app", agent, "test", 20.0), t + 0.5)
    return next(d for d in out if d.agent_id == agent and d.kind in ("offload", "keep"))


def arena_blocks(policy: TokenCakePolicy) -> int:
    """What ``host_used`` must be: each agent's host blocks not in L2, plus copies in flight."""
    agents = policy.apps["app"].agents.values() if "app" in policy.apps else []
    return sum(a.host_blocks - a.l2_blocks + a.offloading for a in agents)


def test_blocks_in_l2_leave_room_for_another_offload() -> None:
    """An arena of 150 blocks holds a's 100; b's 100 fit only once 60 of a's went to L2."""
    plain, tiered = make(150), make(150)
    for policy in (plain, tiered):
        assert tool_call(policy, "a", 100, 1.0).kind == "offload"
        policy.on_event(TransferDone("app", "a", "d2h", 100), 1.7)
        assert policy.host_used == 100
    tiered.on_event(KvTierMoved("app", "a", 60, to="l2"), 1.8)
    assert tiered.host_used == 40 and plain.host_used == 100
    kept = tool_call(plain, "b", 100, 2.0)
    assert (kept.kind, kept.reason.rule) == ("keep", "keep:host_full")
    assert tool_call(tiered, "b", 100, 2.0).kind == "offload"
    assert tiered.host_used == 140
    # a's blocks come back from L2 (an upload's prefetch placed them): they take room again.
    tiered.on_event(KvTierMoved("app", "a", 60, to="host"), 2.6)
    assert tiered.host_used == 200 == arena_blocks(tiered)


def test_losing_a_host_copy_frees_only_its_arena_blocks() -> None:
    policy = make(1000)
    tool_call(policy, "a", 100, 1.0)
    policy.on_event(TransferDone("app", "a", "d2h", 100), 1.7)
    policy.on_event(KvTierMoved("app", "a", 70, to="l2"), 1.8)
    assert policy.host_used == 30
    policy.on_event(KvEvicted("app", "a", 50, where="host"), 1.9)  # 30 arena + 20 of L2's
    agent = policy.apps["app"].agents["a"]
    assert (agent.host_blocks, agent.l2_blocks, policy.host_used) == (50, 50, 0)
    policy.on_event(p.AppEnd("app"), 2.0)  # the rest is dropped: none of it in the arena
    assert policy.host_used == 0


@pytest.mark.parametrize("seed", range(6))
def test_host_used_is_the_arena_share_through_any_sequence(seed: int) -> None:
    """Property: after every event, ``host_used`` is each agent's host blocks not in L2 plus
    offloads in flight; never negative; 0 once the app ended."""
    rng = random.Random(seed)
    policy = make(10_000)
    t = 1.0
    for name in AGENTS:
        tool_call(policy, name, rng.randint(5, 60), t)
        t += 1.0
    for _ in range(60):
        t += 0.05
        agent = policy.apps["app"].agents[rng.choice(AGENTS)]
        roll = rng.random()
        event: TransferDone | KvTierMoved | KvEvicted
        if roll < 0.2 and agent.offloading:
            event = TransferDone("app", agent.key[1], "d2h", rng.randint(1, 30))
        elif roll < 0.5:
            event = KvTierMoved("app", agent.key[1], rng.randint(0, 40), to="l2")
        elif roll < 0.75:
            event = KvTierMoved("app", agent.key[1], rng.randint(0, 40), to="host")
        else:
            event = KvEvicted("app", agent.key[1], rng.randint(0, 20), where="host")
        policy.on_event(event, t)
        assert policy.host_used == arena_blocks(policy) >= 0
    policy.on_event(p.AppEnd("app"), t + 1.0)
    assert policy.host_used == arena_blocks(policy)
