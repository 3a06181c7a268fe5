"""A preemption in vLLM's real scheduler reaches the daemon, and its write-through copies
exactly the blocks that are still cached (``SchedRig``: vLLM's ``Scheduler`` as
``TokenCakeScheduler`` at 9 blocks of 32 tokens, the connector's scheduler side and a real
daemon, no model)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from bench.common.vllm_workload import DaemonProcess  # noqa: E402
from tests.connectors.vllm.sched_rig import SchedRig  # noqa: E402
from tokencake import protocol as p  # noqa: E402
from tokencake.clients.client import TokenCakeClient  # noqa: E402

AGENTS = ("a", "b")


def test_preemption_is_reported_and_its_cached_blocks_written_through(
    tiny_model: Path, daemon: DaemonProcess
) -> None:
    rig = SchedRig(tiny_model, daemon.endpoint, "pre")
    conn, pool = rig.conn, rig.sched.kv_cache_manager.block_pool
    client = TokenCakeClient(daemon.endpoint, timeout_s=10.0)
    dag = p.AppDag(nodes=[p.DagNode(a) for a in AGENTS])
    assert client.call(p.RegisterApp("pre", dag)).accepted
    for i, agent in enumerate(AGENTS):
        rig.add(f"r{i}", agent, tokens=100, max_tokens=120)  # 4 blocks each: all 8
    # Decode until one request needs a block that is not there: vLLM preempts the other.
    for _ in range(100):
        out = rig.step()
        if out.preempted_req_ids:
            break
    (victim,) = out.preempted_req_ids
    agent = AGENTS[int(victim[1:])]
    assert conn.stats.preemptions_reported == 1
    kv = conn.agents[("pre", agent)]
    # The running request took the tail the preemption freed; the prefix is still cached.
    assert 0 < len(kv.blocks) < 4
    (job,) = out.kv_connector_metadata.stores
    assert job.blocks == kv.blocks and job.lend
    assert all(pool.blocks[b].ref_cnt >= 1 for b in kv.blocks)  # held while copied
    agents = {a.agent_id: a for a in client.call(p.ListAgents("pre")).agents}
    assert agents[agent].state == "waiting"
    saves = [
        d
        for d in client.call(p.ListDecisions(limit=100, agent_id=agent)).decisions
        if isinstance(d, p.OffloadDecision)
    ]
    assert [(d.reason.terms["trigger"], d.blocks, d.free_gpu) for d in saves] == [
        ("preempted", len(kv.blocks), False)
    ]
    # The worker's copy ends: committed, and the daemon credits the agent's host blocks.
    rig.step()
    agents = {a.agent_id: a for a in client.call(p.ListAgents("pre")).agents}
    assert agents[agent].host_blocks == len(kv.blocks)
    assert conn.stats.stored_blocks == len(kv.blocks)
    # Both finish, and every event fitted the daemon's phases (the readmission's too).
    for _ in range(400):
        if not rig.sched.requests:
            break
        rig.step()
    assert not rig.sched.requests
    stats = conn.get_stats()
    assert stats["events_refused"] == 0, stats
    assert not [k for k in stats if k.startswith("errors.")], stats
    client.close()
    rig.sched.shutdown()
