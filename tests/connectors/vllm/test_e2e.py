"""TokenCake inside a real vLLM-CPU engine, end to end, with the real daemon.

The workload: several agents each make an LLM call that ends in a tool call; while the
tools "run", other traffic fills the small GPU KV cache; then each agent continues with
its previous prompt, its output and the tool's result. The same workload runs on a plain
engine (vLLM prefix caching only) and on an engine with TokenCake.
"""

from __future__ import annotations

import gc
import random
import time
from typing import Any

import pytest

from tokencake import protocol as p

pytest.importorskip("vllm")

from bench.common.vllm_workload import DaemonProcess, Turn, engine_kwargs, generate, shutdown_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

AGENTS = 3
PROMPT = 150
TOOL = 40
OUT = 8
FILLER = 900
KV_BYTES = 40 * 32 * 1024  # 40 blocks of 32 tokens x 2 layers x 2 heads x 2*32 fp32


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(n)]


def _params(agent: int, tool: bool) -> dict[str, Any]:
    from tokencake.agent_params import kv_transfer_params

    return kv_transfer_params(
        "app-e2e",
        f"agent-{agent}",
        tool_kind="search" if tool else "",
        tool_predicted_s=5.0 if tool else None,
    )


def run_workload(llm: Any, with_params: bool, round_: int = 0) -> dict[str, list[Turn]]:
    """First calls, filler traffic during the tools, continuations. Returns turns by phase."""
    firsts = [_ids(100 * round_ + a, PROMPT) for a in range(AGENTS)]
    p1 = [_params(a, True) if with_params else None for a in range(AGENTS)]
    t1 = generate(llm, firsts, p1, OUT)
    # Two long requests one after the other: together they cycle the whole GPU KV cache.
    filler = generate(llm, [_ids(9000 + round_, FILLER)], [None], OUT)
    filler += generate(llm, [_ids(9500 + round_, FILLER)], [None], OUT)
    seconds = [
        firsts[a] + t1[a].token_ids + _ids(500 + 100 * round_ + a, TOOL) for a in range(AGENTS)
    ]
    p2 = [_params(a, False) if with_params else None for a in range(AGENTS)]
    t2 = generate(llm, seconds, p2, OUT)
    return {"first": t1, "filler": filler, "second": t2}


def _assert_same(a: list[Turn], b: list[Turn]) -> None:
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-4)


@pytest.fixture(scope="module")
def baseline(tiny_model: Any) -> dict[str, list[Turn]]:
    from vllm import LLM

    llm = LLM(**engine_kwargs(str(tiny_model), kv_bytes=KV_BYTES, connector=None))
    out = run_workload(llm, with_params=False)
    out_r1 = run_workload(llm, with_params=False, round_=1)
    out_r2 = run_workload(llm, with_params=False, round_=2)
    del llm
    gc.collect()
    return {
        **out,
        **{f"r1_{k}": v for k, v in out_r1.items()},
        **{f"r2_{k}": v for k, v in out_r2.items()},
    }


@pytest.fixture(scope="module")
def engine(tiny_model: Any, daemon: DaemonProcess, baseline: Any) -> Any:
    from vllm import LLM

    llm = LLM(
        **engine_kwargs(
            str(tiny_model),
            kv_bytes=KV_BYTES,
            connector={
                "endpoint": daemon.endpoint,
                "engine_name": "e2e",
                "tool_offload": "always",
                "reconnect_s": 0.2,
                # 20 ms by default; a shared, overloaded test machine can miss that.
                "timeout_ms": 250,
            },
        )
    )
    yield llm
    shutdown_engine(llm)
    del llm
    gc.collect()


def scheduler_connector(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler.connector


def worker_connector() -> Any:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    return get_kv_transfer_group()


def test_outputs_identical_and_prefix_from_daemon(baseline: Any, engine: Any) -> None:
    conn = scheduler_connector(engine)
    out = run_workload(engine, with_params=True)
    _assert_same(out["first"], baseline["first"])
    _assert_same(out["second"], baseline["second"])
    # The plain engine lost the agents' prefixes to the filler traffic ...
    assert all(t.cached_tokens == 0 for t in baseline["second"])
    # ... TokenCake loaded them back from the daemon: fewer prefill tokens computed.
    for turn in out["second"]:
        assert turn.loaded_tokens >= (PROMPT // 32) * 32
        assert turn.cached_tokens >= turn.loaded_tokens
    assert conn.stats.loaded_blocks >= AGENTS * (PROMPT // 32)
    assert conn.stats.load_failures == 0


def test_tool_call_offloads_and_frees_gpu_blocks(engine: Any) -> None:
    """After a call that ends in a tool call, the agent's blocks are on the host and no
    longer in vLLM's GPU prefix cache (freed for other requests)."""
    from tokencake.clients.client import TokenCakeClient

    conn = scheduler_connector(engine)
    freed_before = conn.stats.gpu_blocks_freed
    firsts = [_ids(7000 + a, PROMPT) for a in range(AGENTS)]
    generate(engine, firsts, [_params(a, True) for a in range(AGENTS)], OUT)
    # request_finished -> the store runs in the next step -> the free in the one after.
    generate(engine, [_ids(7777, 40)], [None], 2)
    pool = conn.connector_scheduler.pool
    with TokenCakeClient(conn.connector_scheduler.link.client.endpoint, timeout_s=1.0) as client:
        for a in range(AGENTS):
            kv = conn.connector_scheduler.agents[("app-e2e", f"agent-{a}")]
            assert len(kv.hashes) >= PROMPT // 32
            hit = client.call(p.Lookup(conn.connector_scheduler.link.engine_id, kv.hashes, ""))
            assert hit.hit_blocks == len(kv.hashes)  # offloaded: all on the host
            assert pool.get_cached_block(kv.hashes[0], [0]) is None  # freed on the GPU
    assert conn.stats.gpu_blocks_freed - freed_before >= AGENTS * (PROMPT // 32)


def test_loaded_bytes_are_the_stored_bytes(engine: Any) -> None:
    """Proof that the continuation used the daemon's bytes: the engine blocks after the load
    equal the arena slots, and corrupting the slots changes the continuation's output."""
    import torch

    from tokencake.clients.client import TokenCakeClient

    conn = scheduler_connector(engine)
    wconn = worker_connector()
    prompt = _ids(4242, PROMPT)
    first = generate(engine, [prompt], [_params(0, True)], OUT)[0]
    generate(engine, [_ids(4243, 40)], [None], 2)
    agent = conn.connector_scheduler.agents[("app-e2e", "agent-0")]
    hashes = list(agent.hashes)  # the continuation replaces the agent's record
    with TokenCakeClient(conn.connector_scheduler.link.client.endpoint, timeout_s=1.0) as client:
        slots = client.call(p.Lookup(conn.connector_scheduler.link.engine_id, hashes, "")).slots
    assert len(slots) == len(hashes)
    cont = prompt + first.token_ids + _ids(4244, TOOL)
    good = generate(engine, [cont], [_params(0, False)], OUT)[0]
    assert good.loaded_tokens == len(slots) * 32
    # The blocks the engine used for the prefix hold exactly the slots' bytes.
    arena = torch.from_numpy(wconn.connector_worker.arena.slots_view())  # the worker's ArenaMapping
    copier = wconn.connector_worker.copier
    pool = conn.connector_scheduler.pool
    for h, slot in zip(hashes, slots, strict=True):
        block = pool.get_cached_block(h, [0])[0].block_id
        engine_bytes = torch.cat([region[block] for region in copier.regions])
        assert torch.equal(engine_bytes, arena[slot, : copier.bytes_per_block])
    # Corrupt the host copy, make the engine forget its own, and run the same continuation.
    # (vLLM may cache one hash in several blocks; free each copy through the connector.)
    for round_ in range(8):
        copies = [(c[0].block_id, h) for h in hashes if (c := pool.get_cached_block(h, [0]))]
        if not copies:
            break
        conn.connector_scheduler.copies.to_free.extend(([b], [h]) for b, h in copies)
        generate(engine, [_ids(4245 + round_, 40)], [None], 1)
    assert all(pool.get_cached_block(h, [0]) is None for h in hashes)
    saved = arena[slots].clone()
    arena[slots] = torch.randint(0, 255, saved.shape, dtype=torch.uint8)
    try:
        bad = generate(engine, [cont], [_params(0, False)], OUT)[0]
    finally:
        arena[slots] = saved
    # (The good run stored its own longer prefix too, so the second load may be longer.)
    assert bad.loaded_tokens >= good.loaded_tokens
    assert bad.token_ids != good.token_ids or bad.logprobs != pytest.approx(good.logprobs)


def _decision(kind: str, agent_id: str, **fields: Any) -> Any:
    """A decision as tokencaked pushes it: the kind's struct with its typed fields."""
    from typing import get_args

    from tokencake import protocol as p

    cls = {c.__struct_config__.tag: c for c in get_args(p.PushedDecision)}[kind]
    return cls(
        app_id="app-e2e",
        agent_id=agent_id,
        at_s=0.0,
        policy="test",
        reason=p.DecisionReason("test"),
        **fields,
    )


def test_decision_after_block_reuse_leaves_other_requests_kv_alone(engine: Any) -> None:
    """vLLM gives a finished agent's freed block ids to the next request. A pin or offload
    that arrives later must find the agent's KV by hash, never act on whatever now sits in
    the recorded ids: pinning them would hold another request's blocks, and offloading them
    would store another request's KV under the agent's hashes."""
    from vllm.v1.core.kv_cache_utils import get_block_hash

    from tokencake.agent_params import kv_transfer_params
    from tokencake.clients.client import TokenCakeClient

    conn = scheduler_connector(engine)
    pool = conn.connector_scheduler.pool
    tool = kv_transfer_params("app-e2e", "reuse", tool_kind="search", tool_predicted_s=5.0)
    generate(engine, [_ids(8100, PROMPT)], [tool], OUT)
    generate(engine, [_ids(8101, 40)], [None], 2)  # the store commits; the blocks are freed
    agent = conn.connector_scheduler.agents[("app-e2e", "reuse")]
    ids, hashes = list(agent.blocks), list(agent.hashes)
    engine_id = conn.connector_scheduler.link.engine_id
    with TokenCakeClient(conn.connector_scheduler.link.client.endpoint, timeout_s=1.0) as client:
        client.call(p.Drop(engine_id, hashes))  # forget the host copy: a wrong offload would store
        assert client.call(p.Lookup(engine_id, hashes)).hit_blocks == 0
        # The freed ids sit at the front of vLLM's free queue: the next request takes them.
        generate(engine, [_ids(8102, PROMPT)], [None], OUT)
        now = [pool.blocks[b].block_hash for b in ids]
        assert all(h is None or bytes(get_block_hash(h)) not in hashes for h in now)
        assert sum(h is not None for h in now) >= len(ids) - 1  # another request's KV
        refs = [pool.blocks[b].ref_cnt for b in ids]
        conn.connector_scheduler.holds.apply(_decision("pin", "reuse", ttl_s=30.0))
        assert agent.pinned == []
        assert [pool.blocks[b].ref_cnt for b in ids] == refs
        conn.connector_scheduler.holds.apply(_decision("offload", "reuse", free_gpu=True))
        stores = conn.connector_scheduler.copies.stores
        assert not [j for j in stores if not j.req_id]  # no offload copy queued
        generate(engine, [_ids(8103, 40)], [None], 2)  # a step for any store to run in
        assert client.call(p.Lookup(engine_id, hashes)).hit_blocks == 0
        assert [pool.blocks[b].block_hash for b in ids] == now  # nothing evicted either


def test_daemon_killed_mid_run(baseline: Any, engine: Any, daemon: DaemonProcess) -> None:
    """Kill the daemon between the first calls and the continuations: vLLM keeps answering,
    with the same outputs, without multi-second stalls; after a restart it reconnects."""
    conn = scheduler_connector(engine)
    firsts = [_ids(100 + a, PROMPT) for a in range(AGENTS)]
    t1 = generate(engine, firsts, [_params(a, True) for a in range(AGENTS)], OUT)
    _assert_same(t1, baseline["r1_first"])
    daemon.kill()
    started = time.monotonic()
    filler = generate(engine, [_ids(9001, FILLER)], [None], OUT)
    filler += generate(engine, [_ids(9501, FILLER)], [None], OUT)
    seconds = [firsts[a] + t1[a].token_ids + _ids(600 + a, TOOL) for a in range(AGENTS)]
    t2 = generate(engine, seconds, [_params(a, False) for a in range(AGENTS)], OUT)
    elapsed = time.monotonic() - started
    _assert_same(filler, baseline["r1_filler"])
    _assert_same(t2, baseline["r1_second"])
    assert all(t.loaded_tokens == 0 for t in t2)  # nothing loaded from a dead daemon
    assert not conn.connector_scheduler.link.up
    assert elapsed < 30.0
    # Restart: the connector registers again within reconnect_s and serves hits again.
    reconnects = conn.stats.reconnects
    daemon.start()
    deadline = time.monotonic() + 10
    while not conn.connector_scheduler.link.up and time.monotonic() < deadline:
        generate(engine, [_ids(31337, 40)], [None], 1)
        time.sleep(0.2)
    assert conn.connector_scheduler.link.up and conn.stats.reconnects == reconnects + 1
    out = run_workload(engine, with_params=True, round_=2)
    _assert_same(out["second"], baseline["r2_second"])
    assert all(t.loaded_tokens > 0 for t in out["second"])
