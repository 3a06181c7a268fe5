"""Smoke version of ``bench/bench_engine.py``: 2 scaled apps (one Code-Writer, one ReAct) on
the tiny model, every engine setup, greedy outputs identical to plain vLLM.

The setups run one after the other in this process (each engine is shut down, with vLLM's
process-wide connector, before the next one starts), each with a fresh daemon. LMCache runs
only where ``lmcache`` imports with vLLM; elsewhere it is skipped with the import error.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from tests.connectors.vllm.conftest import shutdown_engine
from tests.connectors.vllm.engine_apps import (
    DAEMON_POLICY,
    AppDriver,
    AppSet,
    build_trace,
    setup_kwargs,
    watch_lmcache_errors,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

APPS = AppSet(
    code_writer=1,
    react=1,
    qps=2.0,
    seed=3,
    context_scale=1 / 32,
    output_scale=1 / 100,
    time_scale=0.05,
    max_tool_s=0.3,
    react_steps=4,
)
KV_BYTES = 16 * 32 * 1024  # 16 blocks of the tiny model: the apps' contexts do not all fit
MAX_MODEL_LEN = 480  # 15 blocks: what fits the pool less the null block


def _lmcache_missing() -> str:
    try:
        import lmcache.integration.vllm.vllm_v1_adapter  # noqa: F401
    except Exception as e:  # any import failure means it cannot run here
        return f"{type(e).__name__}: {e}"
    return ""


def _run(setup: str, model: Path, workdir: Path) -> dict[str, Any]:
    from vllm import LLM

    from tests.procs import start

    daemon = None
    if setup in DAEMON_POLICY:
        (workdir / setup).mkdir()
        daemon = start(workdir / setup, "--policy", DAEMON_POLICY[setup], arena="64MiB")
    try:
        endpoint = daemon.endpoint if daemon is not None else ""
        lmcache_errors = watch_lmcache_errors() if setup == "lmcache" else []
        llm = LLM(
            **setup_kwargs(
                setup, str(model), kv_bytes=KV_BYTES, endpoint=endpoint, max_model_len=MAX_MODEL_LEN
            )
        )
        try:
            if lmcache_errors:
                pytest.skip(f"LMCache did not start here: {lmcache_errors[-1]}")
            driver = AppDriver(
                llm,
                build_trace(APPS),
                agent_params=setup in ("swap", "continuum", "tokencake"),
                register=setup in ("continuum", "tokencake"),
                endpoint=endpoint,
            )
            driver.run(timeout_s=120)
            out = driver.summary()
            out["outputs"] = driver.outputs_by_call()
            core: Any = llm.llm_engine.engine_core  # in-process
            conn = core.engine_core.scheduler.connector
            out["connector"] = conn.get_stats() if hasattr(conn, "get_stats") else {}
        finally:
            shutdown_engine(llm)
            del llm
            gc.collect()
    finally:
        if daemon is not None:
            daemon.stop()
    return out


@pytest.fixture(scope="module")
def plain(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return _run("plain", tiny_model, tmp_path_factory.mktemp("plain"))


def _same_outputs(setup: str, r: dict[str, Any], plain: dict[str, Any]) -> None:
    assert r["apps"] == len(build_trace(APPS).apps), setup
    assert r["outputs"].keys() == plain["outputs"].keys(), setup
    for key, (tokens, logprobs) in plain["outputs"].items():
        got_tokens, got_lp = r["outputs"][key]
        assert got_tokens == tokens, (setup, key)
        assert got_lp == pytest.approx(logprobs, abs=1e-4), (setup, key)


def test_every_setup_runs_the_apps_with_outputs_identical_to_plain(
    plain: dict[str, Any], tiny_model: Path, tmp_path: Path
) -> None:
    trace = build_trace(APPS)
    assert {a.workload for a in trace.apps} == {"code-writer", "react-coding"}
    assert plain["calls"] == sum(len(a.llm_nodes) for a in trace.apps)
    res = {s: _run(s, tiny_model, tmp_path) for s in ("swap", "continuum", "tokencake")}
    for setup, r in res.items():
        _same_outputs(setup, r, plain)
    # The pool is too small for the apps' contexts: plain vLLM recomputes KV it had.
    assert plain["recomputed_tokens"] > 0
    assert plain["loaded_tokens"] == 0
    # The swap baseline offloads at every tool call and the continuations load from the host.
    assert res["swap"]["connector"]["stored_blocks"] > 0
    assert res["swap"]["loaded_tokens"] > 0
    assert res["swap"]["recomputed_tokens"] < plain["recomputed_tokens"]


def test_lmcache_setup(plain: dict[str, Any], tiny_model: Path, tmp_path: Path) -> None:
    missing = _lmcache_missing()
    if missing:
        pytest.skip(f"lmcache cannot run here: {missing}")
    _same_outputs("lmcache", _run("lmcache", tiny_model, tmp_path), plain)
