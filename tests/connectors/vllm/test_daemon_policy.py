"""The decision path against the daemon's real ``tokencake`` policy (``tool_offload=daemon``).

An agent app registers its DAG and reports its tool call through the client library's
``AppSession``; the connector reports the LLM calls. While the coder's tool runs, another
agent's call is in flight and holds most of the pool, so the engine is under KV pressure
(usage above the policy's floor). The daemon's policy decides to
offload the coder's KV (the predicted stall exceeds the round trip), the connector stores the
blocks with the agent named (so the daemon's scheduler gets ``TransferDone``) and frees them
on the GPU; the policy's predictive upload comes before the predicted return; the
continuation loads the prefix from the host. Everything is asserted from what
``tokencake-ctl`` shows (decisions, agents, stats) and the connector's counters.
"""

from __future__ import annotations

import gc
import random
from collections.abc import Iterator
from typing import Any

import pytest

from tokencake import protocol as p

pytest.importorskip("vllm")

from bench.common.vllm_workload import DaemonProcess, Stepper, engine_kwargs, shutdown_engine

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

APP = "app-policy"
PROMPT = 150  # 4 full blocks of 32 tokens
KV_BYTES = 40 * 32 * 1024
TOOL_S = 2.0


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(n)]


@pytest.fixture(scope="module")
def engine(tiny_model: Any, daemon: DaemonProcess) -> Iterator[Any]:
    from vllm import LLM

    llm = LLM(
        **engine_kwargs(
            str(tiny_model),
            kv_bytes=KV_BYTES,
            connector={
                "endpoint": daemon.endpoint,
                "engine_name": "policy",
                "tool_offload": "daemon",
                # The upload's on-arrival form: the continuation loads from the host
                # (test_preload.py covers the predictive upload into GPU blocks).
                "preload": False,
                # 20 ms by default; a shared, overloaded test machine can miss that.
                "timeout_ms": 250,
            },
        )
    )
    yield llm
    shutdown_engine(llm)
    del llm
    gc.collect()


def _records(client: Any, agent_id: str, kind: str) -> list[Any]:
    return [d for d in client.call(p.ListDecisions(500, agent_id)).decisions if d.kind == kind]


def _why(client: Any) -> str:
    """The policy's ``keep`` records, for a failure message."""
    keeps = [d for d in client.call(p.ListDecisions(500)).decisions if d.kind == "keep"]
    return "; ".join(f"{d.agent_id}: {d.reason}" for d in keeps) or "no keep records"


def test_daemon_policy_offloads_uploads_and_the_continuation_hits(
    engine: Any, daemon: DaemonProcess
) -> None:
    from tokencake import protocol as p
    from tokencake.agent_params import kv_transfer_params
    from tokencake.clients.client import AppSession, TokenCakeClient

    conn = engine.llm_engine.engine_core.engine_core.scheduler.connector
    pool = conn.connector_scheduler.pool
    steps = Stepper(engine)
    dag = p.AppDag(
        nodes=[
            p.DagNode("coder", expected_llm_s=1.0, expected_tool_s=TOOL_S, tool_kind="pytest"),
            p.DagNode("reviewer", expected_llm_s=1.0),
        ],
        edges=[("coder", "reviewer")],
    )
    with (
        TokenCakeClient(daemon.endpoint, timeout_s=2.0) as client,
        AppSession(client, APP, dag, strict=True) as app,
    ):
        engine_id = conn.connector_scheduler.link.engine_id
        before = client.call(p.Stats())
        coder = app.agent("coder", engine_id)
        prompt = _ids(1, PROMPT)
        first = steps.add(prompt, kv_transfer_params(APP, "coder"), 2)
        # The reviewer's call is in flight when the coder's tool starts, holding 25 of the
        # 39 blocks and growing: KV pressure (usage above the policy's 0.6 floor).
        other = steps.add(_ids(2, 800), kv_transfer_params(APP, "reviewer"), 300)
        steps.until(lambda: first in steps.done)
        hashes = list(conn.connector_scheduler.agents[(APP, "coder")].hashes)
        assert len(hashes) == PROMPT // 32
        with coder.tool_call("pytest", predicted_s=TOOL_S):
            offloads = _records(client, "coder", "offload")
            assert offloads, f"the policy did not offload: {_why(client)}"
            assert offloads[0].engine_id == engine_id
            assert offloads[0].reason.rule == "offload:stall_exceeds_round_trip"
            assert offloads[0].blocks == len(hashes)
            # The connector applies it in the next steps: store, commit, free on the GPU.
            steps.until(lambda: all(pool.get_cached_block(h, [0]) is None for h in hashes))
            assert client.call(p.Lookup(engine_id, hashes)).hit_blocks == len(hashes)
            # The commit named the agent: the daemon's scheduler counted the offload done.
            agent = client.call(p.ListAgents(APP)).agents
            assert {a.agent_id: a.host_blocks for a in agent}["coder"] == len(hashes)
            # The predictive upload comes before the predicted return (a low quantile of it).
            steps.until(lambda: bool(_records(client, "coder", "upload")))
            upload = _records(client, "coder", "upload")[0]
            assert upload.reason.rule == "predictive_upload"
            assert isinstance(upload, p.UploadDecision) and upload.priority == p.PREDICTIVE
            assert upload.at_s - offloads[0].at_s < TOOL_S
        steps.until(lambda: other in steps.done, timeout_s=60)
        cont = prompt + steps.done[first].token_ids + _ids(3, 40)
        second = steps.add(cont, kv_transfer_params(APP, "coder"), 4)
        steps.until(lambda: second in steps.done)
        turn = steps.done[second]
        after = client.call(p.Stats())
        agents = {a.agent_id: a for a in client.call(p.ListAgents(APP)).agents}

    # The continuation's prefix came from the host.
    assert turn.loaded_tokens == len(hashes) * 32
    assert turn.cached_tokens >= turn.loaded_tokens
    block_bytes = conn.layout.bytes_per_block
    assert after.bytes_offloaded - before.bytes_offloaded == len(hashes) * block_bytes
    assert after.bytes_uploaded - before.bytes_uploaded == len(hashes) * block_bytes
    # The load named the agent too: the upload is done, nothing of it left on the host.
    assert agents["coder"].host_blocks == 0
    assert conn.stats.offloads_started >= 1
    # The connector applied the upload: during the reviewer's steps, or, if the reviewer
    # finished first (vLLM does not schedule an idle engine), before the continuation's
    # allocation.
    assert conn.stats.uploads_staged >= 1
    assert conn.stats.gpu_blocks_freed >= len(hashes)
    assert conn.stats.load_failures == 0
