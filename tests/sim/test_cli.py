"""End to end: ``tokencake-sim run`` writes results.json, table.md and the four figures."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from tokencake.sim.cli import main

REQUIRED = (
    "policy",
    "qps",
    "mean_latency_s",
    "p95_latency_s",
    "critical_path_latency_s",
    "gpu_kv_util",
    "recompute_tokens",
    "offload_bytes",
    "upload_bytes",
    "preemptions",
)


def test_run_writes_results_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    res = CliRunner().invoke(
        main,
        [
            "run",
            "--workload",
            "code-writer",
            "--qps",
            "0.5,1",
            "--apps",
            "2",
            "--policies",
            "vllm,tokencake,oracle",
            "--out",
            str(out),
            "--seed",
            "3",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads((out / "results.json").read_text())
    recs = doc["records"]
    assert {(r["policy"], r["qps"]) for r in recs} == {
        (p, q) for p in ("vllm", "tokencake", "oracle") for q in (0.5, 1.0)
    }
    for r in recs:
        for k in REQUIRED:
            assert k in r
        assert r["completed_apps"] == 2 and r["seed"] == 3
    assert doc["targets"]["code-writer"]["qps"] == 1.0
    assert "tokencake / vllm" in res.output and "events/s" in res.output
    for name in ("latency_vs_qps", "gpu_kv_util", "latency_cdf", "time_breakdown"):
        png = out / f"code-writer_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "table.md").read_text().startswith("| workload")


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["run", "--policies", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown policies" in r.output
    r = CliRunner().invoke(main, ["run", "--workload", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown workload" in r.output


def test_list() -> None:
    r = CliRunner().invoke(main, ["list"])
    assert r.exit_code == 0
    assert "code-writer" in r.output and "3050 blocks" in r.output and "oracle" in r.output
