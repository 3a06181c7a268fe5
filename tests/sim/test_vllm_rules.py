"""The engine replay's scheduling rules (``Simulator(vllm_rules=True)``, what
``bench/bench_engine.py --sim-from`` runs) and its per-call record (``CallTrace``).

vLLM 0.32's scheduler, read in ``vllm/v1/core/sched/scheduler.py`` and
``kv_cache_manager.py``: ``allocate_slots`` hashes a request's full blocks when it allocates
them for a step (``cache_blocks``), so a request admitted later in the same step already
hits them; and waiting requests are only scheduled ``if not preempted_reqs``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from tokencake.daemon.scheduler import create_policy
from tokencake.sim import admission
from tokencake.sim.calltrace import CallTrace
from tokencake.sim.engine import Simulator
from tokencake.sim.profiles import Profile, get_profile
from tokencake.sim.runner import policy_config
from tokencake.sim.workload import AppSpec, NodeSpec, SegmentIds, Trace, compose

CPU_FIT = get_profile("llama-79m-cpu")


def _run(
    apps: list[AppSpec], profile: Profile, rules: bool, adjust: Any = None
) -> tuple[Simulator, CallTrace]:
    ids = SegmentIds()
    for app in apps:
        compose(app, ids)
    calls = CallTrace(profile.block_tokens)
    policy = create_policy("vllm", policy_config(profile))
    if adjust is not None:
        adjust(policy)
    sim = Simulator(
        Trace("t", 0, 0.0, apps),
        policy,
        profile,
        lru_eviction=True,
        call_trace=calls,
        vllm_rules=rules,
    )
    sim.run()
    return sim, calls


def _siblings() -> list[AppSpec]:
    """Two calls with the same 320-token prompt, ready at once, then one that extends the
    first one's prompt and output."""
    nodes = [
        NodeSpec("a", "x", output_tokens=40),
        NodeSpec("b", "x", output_tokens=2),
        NodeSpec("c", "x", predecessors=("a",), instruction_tokens=64, output_tokens=1),
    ]
    return [AppSpec("app", "t", nodes, initial_tokens=320)]


@pytest.mark.parametrize("rules", [False, True])
def test_a_sibling_admitted_in_the_same_step_hits_the_blocks_being_computed(
    rules: bool,
) -> None:
    sim, calls = _run(_siblings(), CPU_FIT, rules)
    rec = calls.calls()
    assert rec["app/a"]["scheduled_s"] == rec["app/b"]["scheduled_s"] == 0.0
    assert rec["app/a"]["cached"] == 0
    # vLLM: b finds a's 9 full blocks (its last token is always computed): 288 tokens.
    assert rec["app/b"]["cached"] == (288 if rules else 0)
    assert rec["app/b"]["reusable"] == 0  # nothing had finished when b was submitted
    # Prompt tokens computed: a's 320, b's 32 or 320, then c's 424 less the 352 it hits.
    assert sim.c.prefill_tokens == 320 + (32 if rules else 320) + 424 - 352


def test_the_call_trace_counts_reusable_and_cached_as_the_engine_bench_does() -> None:
    _, calls = _run(_siblings(), CPU_FIT, True)
    c = calls.calls()["app/c"]
    # c's prompt: a's 320 + a's 40 output tokens + 64 = 424 tokens; a left 359 tokens of KV
    # (its last output token's is never written): 11 full blocks, all still cached.
    assert (c["prompt"], c["reusable"], c["source"]) == (424, 352, "app/a")
    assert (c["cached"], c["loaded"], c["preemptions"]) == (352, 0, 0)
    assert c["submit_s"] <= c["scheduled_s"] <= c["finish_s"]


def _pressure() -> list[AppSpec]:
    """Two long decodes that fill a 10-block pool at 33 output tokens each (about 26 s) and
    outgrow it at 65 (the second is preempted, about 50 s), and a small call that arrives
    in between."""
    return [
        AppSpec("p", "t", [NodeSpec("a", "x", output_tokens=100)], 96),
        AppSpec("q", "t", [NodeSpec("a", "x", output_tokens=100)], 96),
        AppSpec("r", "t", [NodeSpec("a", "x", output_tokens=1)], 40, arrival_s=35.0),
    ]


@pytest.mark.parametrize("rules", [False, True])
def test_a_step_that_preempts_admits_no_waiting_request(
    rules: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The late call is first in the admission order (as a policy's ranking may put it,
    ahead of the preempted request) and fits once the preempted request's blocks are
    evictable: the default model admits it in the preempting step, vLLM one step later."""
    steps: dict[str, list[int]] = {"preempt": [], "admit": []}
    preempt, admit_with = admission.preempt, admission.admit_with

    def preempt_logged(sim: Simulator, req: Any) -> None:
        steps["preempt"].append(sim.c.steps)
        preempt(sim, req)

    def admit_logged(sim: Simulator, *a: Any) -> bool | None:
        ok = admit_with(sim, *a)
        if ok:
            steps["admit"].append(sim.c.steps)
        return ok

    monkeypatch.setattr(admission, "preempt", preempt_logged)
    monkeypatch.setattr(admission, "admit_with", admit_logged)

    def late_first(policy: Any) -> None:
        policy.admission_order = lambda waiting, now: sorted(waiting, key=lambda w: w.app_id)[::-1]

    _, calls = _run(_pressure(), replace(CPU_FIT, fixed_gpu_blocks=10), rules, late_first)
    assert len(steps["preempt"]) == 1
    assert (steps["preempt"][0] in steps["admit"]) is not rules
    rec = calls.calls()
    assert sum(r["preemptions"] for r in rec.values()) == 1
    assert all(r["finish_s"] is not None for r in rec.values())
