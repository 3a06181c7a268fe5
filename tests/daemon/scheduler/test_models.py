"""Predictor, transfer cost model and DAG analysis (and its sharing between apps)."""

from __future__ import annotations

import json
import math
import random
import weakref
from pathlib import Path

import pytest

from tokencake.daemon.scheduler import create_policy
from tokencake.daemon.scheduler.costmodel import TransferCostModel
from tokencake.daemon.scheduler.dag import DagError, analyse
from tokencake.daemon.scheduler.predictor import Z_Q20, ToolDurationPredictor
from tokencake.daemon.scheduler.tracking import TrackingPolicy
from tokencake.protocol import AppDag, AppEnd, DagNode, RegisterApp

WORKLOAD = Path("/work/shared/workloads/code_writer_dag.json")


def test_cold_start_uses_hint_then_default() -> None:
    p = ToolDurationPredictor(default_s=1.0)
    assert p.predict("a", "search", None).median_s == pytest.approx(1.0)
    assert p.predict("a", "search", None).source == "default"
    assert p.predict("a", "search", 4.0).median_s == pytest.approx(4.0)


def test_lognormal_median_beats_running_mean_on_heavy_tails() -> None:
    rng = random.Random(7)
    samples = [math.exp(rng.gauss(math.log(0.5), 1.2)) for _ in range(400)]
    p = ToolDurationPredictor()
    for s in samples[:300]:
        p.observe("coder", "shell", s, None, None)
    pred = p.predict("coder", "shell", None)
    mean = sum(samples[:300]) / 300
    test = samples[300:]
    err_pred = sum(abs(math.log(s / pred.median_s)) for s in test)
    err_mean = sum(abs(math.log(s / mean)) for s in test)
    assert err_pred < err_mean
    assert pred.sigma == pytest.approx(1.2, rel=0.2)
    # a low quantile really is low: about 20 % of new samples fall under it
    under = sum(s < pred.quantile_s(Z_Q20) for s in test) / len(test)
    assert 0.08 < under < 0.35


def test_biased_hints_are_corrected_and_errors_tracked() -> None:
    p = ToolDurationPredictor()
    for _ in range(30):
        before = p.predict("a", "test", 1.0)
        p.observe("a", "test", 4.0, 1.0, before)
    pred = p.predict("a", "test", 1.0)
    assert pred.median_s == pytest.approx(4.0, rel=0.05)
    assert pred.err_abs < 0.2  # the recent predictions were right
    assert p.predict("b", "test", None).source == "kind"  # falls back to the tool kind


@pytest.mark.parametrize("z", [-1.2816, -0.8416, 0.0, 1.6449])
def test_remaining_stall_quantile_is_never_negative(z: float) -> None:
    """Past its predicted quantile, a call's remaining stall is the quantile of what is
    left given it ran that long: positive, and equal to the plain quantile at the start."""
    pred = ToolDurationPredictor().predict("coder", "pytest", 2.0)
    assert pred.remaining_quantile_s(0.0, z) == pytest.approx(pred.quantile_s(z))
    for elapsed in (0.5, 1.0, 2.0, 4.0, 8.0, 60.0, 1e4):
        left = pred.remaining_quantile_s(elapsed, z)
        assert left >= 0.0 and math.isfinite(left)
        total = elapsed + left
        assert total >= elapsed and total >= pred.quantile_s(z) - 1e-9
    # At the low quantile the old estimate (quantile - elapsed) went negative.
    assert pred.quantile_s(z) - 8.0 < 0 < pred.remaining_quantile_s(8.0, z)


def test_cost_model_fits_bandwidth_and_overhead() -> None:
    m = TransferCostModel(1 << 20, 12e9, 12e9, 0.002)
    true_bw, true_oh = 25e9, 0.0005
    for blocks in [1, 4, 16, 64, 256, 8, 32, 128] * 5:
        nbytes = blocks << 20
        m.observe("d2h", nbytes, true_oh + nbytes / true_bw)
    assert m.bandwidth("d2h") == pytest.approx(true_bw, rel=0.02)
    assert m.overhead("d2h") == pytest.approx(true_oh, abs=5e-5)
    assert m.bandwidth("h2d") == 12e9  # the other direction is untouched
    assert m.seconds("d2h", 0) == 0.0


def _diamond() -> AppDag:
    return AppDag(
        nodes=[
            DagNode(id="s", expected_llm_s=1),
            DagNode(id="long", expected_llm_s=1, expected_tool_s=10, tool_kind="test"),
            DagNode(id="short", expected_llm_s=1),
            DagNode(id="join", expected_llm_s=1),
        ],
        edges=[("s", "long"), ("s", "short"), ("long", "join"), ("short", "join")],
    )


def test_critical_path_and_slack() -> None:
    info = analyse(_diamond(), 2.0, 1.0)
    assert info.critical_path == ["s", "long", "join"]
    assert info.critical_length_s == pytest.approx(13.0)
    node = {n.node_id: n for n in info.nodes}
    assert node["short"].slack_s == pytest.approx(10.0)
    assert not node["short"].on_critical_path and node["long"].on_critical_path
    assert node["short"].join_group == "join" and node["join"].fan_in == 2
    assert node["short"].next_gap_s == pytest.approx(10.0)  # join waits for the long branch
    assert node["s"].remaining_depth == 2 and node["join"].depth == 2


def test_apps_with_the_same_dag_share_its_analysis() -> None:
    """One workflow run many times: its apps share one read-only analysis (the nodes every
    event reads), a different DAG gets its own, and the shared one goes with its last app."""
    policy = create_policy("tokencake")
    other = AppDag(nodes=[DagNode(id="s", expected_llm_s=3)])
    for app, dag in (("a", _diamond()), ("b", _diamond()), ("c", other)):
        policy.on_event(RegisterApp(app, dag), 0.0)
    assert isinstance(policy, TrackingPolicy)
    apps = policy.apps
    assert apps["a"].info is apps["b"].info and apps["a"].info is not apps["c"].info
    assert apps["b"].info.critical_path == ["s", "long", "join"]
    shared = weakref.ref(apps["a"].info)
    for app in ("a", "b"):
        policy.on_event(AppEnd(app), 1.0)
    assert "a" not in apps and "b" not in apps
    assert shared() is None  # nothing but the two apps held it
    policy.on_event(RegisterApp("d", _diamond()), 2.0)
    assert apps["d"].info.critical_path == ["s", "long", "join"]


def test_cycles_and_dangling_edges_are_typed_errors() -> None:
    with pytest.raises(DagError):
        analyse(
            AppDag(nodes=[DagNode(id="a"), DagNode(id="b")], edges=[("a", "b"), ("b", "a")]), 1, 1
        )
    with pytest.raises(DagError):
        analyse(AppDag(nodes=[DagNode(id="a")], edges=[("a", "zz")]), 1, 1)


@pytest.mark.skipif(not WORKLOAD.exists(), reason="shared workload not present")
def test_code_writer_dag_structure() -> None:
    raw = json.loads(WORKLOAD.read_text())
    nodes = [
        DagNode(
            id=n["id"],
            expected_llm_s=1.0 if n.get("max_tokens") else 0.01,
            expected_tool_s=float(n.get("metadata", {}).get("expected_tool_stall_s") or 0.0),
            tool_kind="tool" if n.get("metadata", {}).get("expected_tool_stall_s") else "",
        )
        for n in raw["nodes"]
    ]
    edges = [(p, n["id"]) for n in raw["nodes"] for p in n["predecessors"]]
    info = analyse(AppDag(nodes=nodes, edges=edges), 1.0, 1.0)
    depth = max(n.depth for n in info.nodes)
    assert depth == 15  # 16 levels (0..15), not the 17 the metadata claims: trust the edges
    assert len(edges) == 36
    assert info.critical_path[0] == "start_mcp"
    assert all(info.nodes[info.index[n]].on_critical_path for n in info.critical_path)
