"""The engine replay's pin yields (``Simulator(pin_yield=True)``, ``admission.yield_pins``):
as ``TokenCakeScheduler`` does on the engine, the daemon's pins give way to a request they
keep out, and the yielded agent's KV is copied to the host so that its next call loads it
rather than recomputes it."""

from __future__ import annotations

from typing import Any

import pytest

from tokencake.daemon.scheduler import create_policy
from tokencake.sim.calltrace import CallTrace
from tokencake.sim.engine import Simulator
from tokencake.sim.profiles import get_profile
from tokencake.sim.runner import policy_config
from tokencake.sim.workload import AppSpec, NodeSpec, SegmentIds, ToolSpec, Trace, compose

PROFILE = get_profile("llama-79m-cpu")  # 119 blocks of 32 tokens


def _run(pin_yield: bool) -> tuple[Simulator, dict[str, Any]]:
    """Agent ``p/a`` (1,600 tokens, 50 blocks) calls a 30 s tool and Continuum pins its KV
    through it; ``q`` arrives meanwhile with a 2,400-token prompt (76 blocks with its
    output), which does not fit beside the pin."""
    tool = ToolSpec("shell", duration_s=30.0, result_tokens=16, predicted_s=30.0)
    p = AppSpec(
        "p",
        "t",
        [
            NodeSpec("a", "x", output_tokens=2, tool=tool),
            NodeSpec("b", "x", predecessors=("a",), instruction_tokens=16, output_tokens=2),
        ],
        1600,
    )
    q = AppSpec("q", "t", [NodeSpec("a", "x", output_tokens=2)], 2400, arrival_s=15.0)
    ids = SegmentIds()
    for app in (p, q):
        compose(app, ids)
    calls = CallTrace(PROFILE.block_tokens)
    sim = Simulator(
        Trace("t", 0, 0.0, [p, q]),
        create_policy("continuum", policy_config(PROFILE)),
        PROFILE,
        lru_eviction=True,
        call_trace=calls,
        vllm_rules=True,
        pin_yield=pin_yield,
    )
    sim.run()
    return sim, calls.calls()


def test_without_yields_the_request_waits_for_the_pin() -> None:
    sim, rec = _run(False)
    assert sim.pins_yielded == 0
    assert rec["q/a"]["scheduled_s"] - rec["q/a"]["submit_s"] > 10.0
    assert sim.c.offload_blocks == 0


def test_a_pin_yields_to_a_request_it_keeps_out_and_its_kv_goes_to_the_host() -> None:
    sim, rec = _run(True)
    assert sim.pins_yielded == 1
    # Admitted a step or two after it arrived (the copy holds the blocks one step).
    assert rec["q/a"]["scheduled_s"] - rec["q/a"]["submit_s"] < 8.0
    # p/a's 50 blocks were copied to the host, and q's allocation evicted part of them
    # from the GPU: p/b finds its whole prefix (``cached`` counts GPU and host hits, as
    # vLLM's ``num_cached_tokens``), part of it loaded from the host; nothing recomputed.
    assert sim.c.offload_blocks == 50
    b = rec["p/b"]
    assert b["cached"] == b["reusable"] == 1600
    assert 0 < b["loaded"] < 1600


@pytest.mark.parametrize("pin_yield", [False, True])
def test_both_replays_finish_every_call(pin_yield: bool) -> None:
    _, rec = _run(pin_yield)
    assert set(rec) == {"p/a", "p/b", "q/a"}
    assert all(c["finish_s"] is not None for c in rec.values())
