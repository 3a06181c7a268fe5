"""End to end: ``tokencake-sim run`` writes results.json, table.md and the four figures."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from rich.console import Console

from tokencake.sim.cli import main, run_progress

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
    assert f"wrote {out / 'results.json'}, {out / 'table.md'} and 4 figures" in res.stdout
    # The utilisation target is reported without a verdict (not comparable with the paper's).
    util = next(line for line in res.stdout.splitlines() if "GPU KV utilisation" in line)
    assert "not comparable" in util and "met" not in util
    # Not a terminal: one line per run on stderr, no progress bar.
    assert res.stderr.count(" app/s ") == 6 and "\x1b[" not in res.stderr


def test_no_plots_still_names_what_it_wrote(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", "--qps", "1", "--apps", "1", "--policies", "vllm", "--out", str(out)]
    res = CliRunner().invoke(main, [*args, "--no-plots"])
    assert res.exit_code == 0, res.output
    assert f"{out / 'table.md'} (no figures: --no-plots)" in res.stdout
    assert not list(out.glob("*.png"))


def test_missing_matplotlib_is_said_before_the_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if not installed
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["run", "--qps", "1", "--apps", "1", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert "need matplotlib" in res.stderr and "--no-plots" in res.stderr
    assert res.stdout == "" and not out.exists()


def test_progress_bar_on_a_terminal() -> None:
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=100)
    rec = {"workload": "w", "qps": 1.0, "policy": "vllm", "wall_s": 0.5, "mean_latency_s": 2.0}
    with run_progress(3, console) as advance:
        advance(rec)
        advance(rec)
    text = buf.getvalue()
    assert "2/3" in text and "w 1 app/s vllm" in text


def test_bad_arguments_are_usage_errors(tmp_path: Path) -> None:
    r = CliRunner().invoke(main, ["run", "--policies", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown policies" in r.output
    r = CliRunner().invoke(main, ["run", "--workload", "nope", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "unknown workload" in r.output


def test_dash_h_is_help() -> None:
    for args in (["-h"], ["run", "-h"], ["list", "-h"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0 and r.output.startswith("Usage:"), r.output


def test_list() -> None:
    r = CliRunner().invoke(main, ["list"])
    assert r.exit_code == 0
    assert "code-writer" in r.output and "3050 blocks" in r.output and "oracle" in r.output
