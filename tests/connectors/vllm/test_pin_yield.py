"""A waiting request is never kept waiting by a pin, and a blocked request is not looked up
again every step.

vLLM's ``Scheduler`` (as ``TokenCakeScheduler``) and its KV cache manager run for real at a
small size (9 blocks of 32 tokens), with the connector's scheduler side and a real daemon; no
model runs (``sched_rig.SchedRig``: made-up model outputs, the worker's copies reported
done without moving bytes).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from bench.common.vllm_workload import DaemonProcess  # noqa: E402
from tests.connectors.vllm.sched_rig import BLOCK, SchedRig  # noqa: E402
from tokencake import protocol as p  # noqa: E402
from tokencake.clients.client import TokenCakeClient  # noqa: E402


@pytest.fixture
def rig(
    tiny_model: Path, daemon: DaemonProcess, request: pytest.FixtureRequest
) -> Iterator[SchedRig]:
    """A scheduler with the connector settings the test passes (``indirect``
    parametrization), its app registered under the test's name."""
    app = request.node.name
    with TokenCakeClient(daemon.endpoint, timeout_s=10.0) as c:
        dag = p.AppDag(nodes=[p.DagNode(a) for a in ("a", "b", "c")])
        assert c.call(p.RegisterApp(app, dag)).accepted
    r = SchedRig(tiny_model, daemon.endpoint, app, **request.param)
    yield r
    r.sched.shutdown()


def _pin(rig: SchedRig, agent: str, ttl_s: float) -> None:
    """The daemon's pin decision on ``agent``'s KV, applied as a push would be."""
    reason = p.DecisionReason("test", {})
    pin = p.PinDecision(at_s=0.0, app_id=rig.app, agent_id=agent, ttl_s=ttl_s, reason=reason)
    rig.conn.holds.apply(pin)


def _on_host(rig: SchedRig, agent: str) -> int:
    """How many of ``agent``'s blocks the daemon's host store holds, in prefix order."""
    link, kv = rig.conn.link, rig.conn.agents[(rig.app, agent)]
    reply = link.call(p.Lookup(link.engine_id, kv.hashes, ""))
    assert reply is not None
    return int(reply.hit_blocks)


@pytest.mark.parametrize("rig", [{"save": "never"}], indirect=True)
def test_a_pin_yields_to_a_request_the_free_blocks_cannot_hold(rig: SchedRig) -> None:
    """Agent a's 3 blocks are pinned for 30 s; b's 7-block request finds 5 free. The pin
    yields: a's KV is copied to the host (the copy holds the blocks one step), then b runs,
    tens of seconds before the pin would have ended. Without the rule b never runs here."""
    rig.add("a0", "a", 100, 1)  # 3 full blocks
    assert rig.until_scheduled("a0", 3) == 1
    rig.step()
    assert "a0" not in rig.sched.requests
    assert len(rig.conn.agents[(rig.app, "a")].blocks) == 3
    assert _on_host(rig, "a") == 0
    _pin(rig, "a", 30.0)
    assert rig.conn.holds.held() == 3
    rig.add("b0", "b", 7 * BLOCK - 8, 4)  # 7 blocks with its first decode token
    assert rig.until_scheduled("b0", 4) == 3  # the copy's step, its commit, then b
    assert rig.conn.stats.pins_yielded == 1
    assert rig.conn.holds.held() == 0
    # a's KV is on the host: its return loads it rather than recomputes it.
    assert rig.conn.stats.stored_blocks == 3
    assert _on_host(rig, "a") == 3


@pytest.mark.parametrize("rig", [{"save": "never"}], indirect=True)
def test_a_pin_stands_while_running_requests_hold_the_rest(rig: SchedRig) -> None:
    """a's 3 blocks are pinned and c's running request holds 3-4 more: b's 6-block request
    lacks 4-5 blocks, more than the pin holds, so the pin stands (yielding it would not let
    b run). Once c is done, b lacks 1 block: then the pin yields and b runs."""
    rig.add("a0", "a", 100, 1)
    for _ in range(2):
        rig.step()
    _pin(rig, "a", 30.0)
    rig.add("c0", "c", 3 * BLOCK - 8, 30)  # 3 blocks, 4 as it decodes
    assert "c0" in rig.step().num_scheduled_tokens
    rig.add("b0", "b", 6 * BLOCK - 8, 2)
    for _ in range(10):
        assert "b0" not in rig.step().num_scheduled_tokens
    assert rig.conn.stats.pins_yielded == 0
    assert rig.conn.holds.held() == 3
    assert rig.until_scheduled("b0", 40) <= 40
    assert "c0" not in rig.sched.requests
    assert rig.conn.stats.pins_yielded == 1


@pytest.mark.parametrize("rig", [{"save": "finished", "tool_offload": "never"}], indirect=True)
def test_a_pin_on_kv_the_host_has_yields_at_once(rig: SchedRig) -> None:
    """The same, with a's KV written through at its finish: no copy, b runs in the step
    that found it short."""
    rig.add("a0", "a", 100, 1)
    for _ in range(4):
        rig.step()
    assert rig.conn.stats.stored_blocks == 3
    _pin(rig, "a", 30.0)
    assert rig.conn.holds.held() == 3
    rig.add("b0", "b", 7 * BLOCK - 8, 4)
    assert rig.until_scheduled("b0", 4) == 1
    assert rig.conn.stats.pins_yielded == 1


@pytest.mark.parametrize(
    "rig", [{"save": "finished", "tool_offload": "never", "lookup_retry_s": 60}], indirect=True
)
def test_a_blocked_request_is_looked_up_once_until_a_copy_ends(rig: SchedRig) -> None:
    """b waits for the blocks a's running request holds: its lookup's answer stands for the
    retries (no daemon call per step) until a copy of this engine ends."""
    rig.add("a0", "a", 4 * BLOCK - 8, 40)  # runs, growing to 6 blocks
    rig.step()
    before = rig.conn.stats.lookups  # a0's own
    rig.add("b0", "b", 5 * BLOCK - 8, 2)  # 5 blocks: waits while a0 runs
    for _ in range(10):
        assert "b0" not in rig.step().num_scheduled_tokens
    assert rig.conn.stats.lookups == before + 1
    assert rig.conn.stats.lookups_reused == 9
    # a0 finishes: its write-through copy starts, then ends (the host may hold more now):
    # b asks the daemon again after each, and runs once a0's blocks are free.
    assert rig.until_scheduled("b0", 60) <= 60
    assert rig.conn.stats.lookups == before + 3
