"""The scheduler knows the L2 tier's latency, end to end: real daemons, real redis-server.

On host A two agents go into 2-minute tool calls and their KV is offloaded to A's arena:
``h`` first, then ``t``. Then the arena fills and ``t``'s blocks are evicted, written back
to Redis. A's policy now plans ``t``'s upload earlier by the L2 fetch (the daemon is told
the store is slow: ``l2_fetch_bytes_per_s``), so ``t``'s upload is decided at once, before
``h``'s although ``h``'s call started first; the upload brings ``t``'s blocks back from L2
into A's arena, byte for byte, and host B finds them in the same store.

Deterministic: the two upload timers sit in one policy's heap, so which fires first is an
order of planned times (``t``: now; ``h``: over a minute after its tool call began), not
of wall-clock speed. The only timing assumption is that the steps below take less than
that minute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.daemon.l2.redis_procs import RedisNode
from tests.daemon.l2.test_two_daemons import SALT, Engine, blocks, chain, l2_env, start_pair
from tests.procs import Proc, start
from tokencake import protocol as p

APP = "lead-app"
KV = 4  # blocks per agent
TOOL_S = 120.0
DAG = p.AppDag(
    nodes=[p.DagNode(a, expected_tool_s=TOOL_S, tool_kind="tests") for a in ("h", "t", "x")]
)


def tool_call(e: Engine, agent: str) -> p.OffloadDecision:
    """The agent's LLM call leaves ``KV`` blocks; its tool call starts and, under pressure,
    gets an offload pushed to the engine."""
    c = e.client
    c.call(p.LlmCallStart(APP, agent, e.engine_id, f"r-{agent}", prompt_tokens=64))
    c.call(p.LlmCallFinish(APP, agent, f"r-{agent}", output_tokens=1, kv_blocks=KV))
    c.call(p.EngineHeartbeat(e.engine_id, num_gpu_blocks_free=2, num_waiting=4, num_running=2))
    c.call(p.ToolCallStart(APP, agent, "tests", predicted_s=TOOL_S, call_id=f"c-{agent}"))
    offloads = [d for d in c.poll_pushes() if d.kind == "offload" and d.agent_id == agent]
    assert len(offloads) == 1, offloads
    assert isinstance(offloads[0], p.OffloadDecision) and offloads[0].blocks == KV
    return offloads[0]


def offload(e: Engine, agent: str, hashes: list[bytes], data: np.ndarray) -> None:
    """Carry out the agent's offload: store its blocks in the arena, named as its KV."""
    reserve = p.Reserve(e.engine_id, hashes, salt=SALT, app_id=APP, agent_id=agent)
    slots = e.client.call(reserve).slots
    assert len(slots) == len(hashes) and min(slots) >= 0
    e.arena.write_blocks(slots, data)
    assert e.client.call(p.Commit(e.engine_id, slots)).committed == len(slots)


def host_blocks(e: Engine, agent: str) -> int:
    agents = {a.agent_id: a for a in e.client.call(p.ListAgents(APP)).agents}
    return agents[agent].host_blocks


def term(d: p.DecisionRecord, name: str) -> float:
    value = d.reason.terms[name]
    assert isinstance(value, int | float), (name, value)
    return float(value)


def uploads(e: Engine) -> list[p.UploadDecision]:
    listed = e.client.call(p.ListDecisions(limit=200)).decisions
    return sorted((d for d in listed if isinstance(d, p.UploadDecision)), key=lambda d: d.seq)


def test_kv_in_l2_is_uploaded_earlier_and_comes_back(
    tmp_path: Path, hosts: list[Proc], redis_node: RedisNode
) -> None:
    env = l2_env("redis", redis_node.url) | {"TOKENCAKE_L2_FETCH_BYTES_PER_S": "1000"}
    a, b = start_pair(tmp_path, hosts, env)
    try:
        a.client.call(p.RegisterApp(APP, DAG))
        slots = a.client.call(p.Pool()).pool.num_slots
        h_off, t_off = tool_call(a, "h"), tool_call(a, "t")
        # Planned with both copies on the host: h's upload first (its call began first).
        assert term(h_off, "upload_at_s") < term(t_off, "upload_at_s")
        h, t = chain("h", KV), chain("t", KV)
        t_data = blocks(7, KV)
        offload(a, "t", t, t_data)  # the engine copies t's first: t is the least recent
        offload(a, "h", h, blocks(8, KV))
        assert uploads(a) == []
        a.store(chain("fill", slots - 2 * KV), blocks(9, slots - 2 * KV))  # the arena is full
        a.client.call(p.Lookup(a.engine_id, h, salt=SALT))  # h is recent, t is not
        a.store(chain("more", KV), blocks(10, KV))  # evicts t's blocks: written back to L2
        assert a.client.call(p.Lookup(a.engine_id, t, salt=SALT)).hit_blocks == 0

        # t's upload was decided at once, knowing its KV is in L2; h's is still a minute away.
        first, *rest = uploads(a)
        assert (first.agent_id, first.reason.rule) == ("t", "predictive_upload")
        assert term(first, "l2_blocks") == KV
        assert first.at_s < term(t_off, "upload_at_s")
        assert all(d.agent_id == "t" for d in rest)
        # The upload brought t's blocks back from L2 into A's arena, whole.
        assert a.wait_hits(t) == KV
        assert np.array_equal(a.load(t), t_data)
        # And host B, sharing the store, finds them too.
        assert b.wait_hits(t) == KV
        assert np.array_equal(b.load(t), t_data)
        assert not any(d.agent_id == "h" for d in uploads(a))

        # Arena room counts what an eviction can make (it goes to L2): with every slot
        # holding a block, another agent's offload still fits.
        x_off = tool_call(a, "x")
        assert term(x_off, "host_free") >= KV
        stats = a.client.call(p.Stats()).l2
        assert stats["dropped_writes"] == stats["rejected_values"] == 0
    finally:
        a.close()
        b.close()


def test_kv_evicted_without_room_in_l2_is_forgotten(tmp_path: Path, hosts: list[Proc]) -> None:
    """Evicted blocks whose write to L2 is dropped (here: no room in the write queue) are
    gone from the host: the scheduler stops counting them as the agent's host copy."""
    env = {"TOKENCAKE_L2_BACKEND": "disk", "TOKENCAKE_L2_DIR": str(tmp_path / "l2")}
    hosts.append(start(tmp_path, arena="1MiB", env=env | {"TOKENCAKE_L2_QUEUE_BYTES": "0"}))
    a = Engine(hosts[0], "engine-a")
    try:
        a.client.call(p.RegisterApp(APP, DAG))
        slots = a.client.call(p.Pool()).pool.num_slots
        tool_call(a, "t")
        offload(a, "t", chain("t", KV), blocks(7, KV))
        assert host_blocks(a, "t") == KV
        a.store(chain("fill", slots), blocks(9, slots))  # evicts t's blocks; L2 takes none
        assert a.client.call(p.Stats()).l2["dropped_writes"] >= KV
        assert host_blocks(a, "t") == 0
    finally:
        a.close()
