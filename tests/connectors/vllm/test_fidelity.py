"""The simulator against real vLLM-CPU on the TokenCake path (``bench/bench_fidelity.py``).

Two agents call a 5 s tool; a plain request that needs most of the pool arrives while
the tools run. On the engine (``TokenCakeConnector`` + ``TokenCakeScheduler`` + a real
``tokencaked``) the daemon keeps the agents' KV at the tool's start (no pressure), offloads it
once the plain request waits for memory, lets that request run during the tool calls, and
uploads the KV before the agents return, whose continuations then load their prefixes. The
simulator, driving the same policy, must count the same tokens and blocks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("vllm")

from bench.common.vllm_workload import DaemonProcess

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BENCH = Path(__file__).resolve().parents[3] / "bench" / "bench_fidelity.py"
AGENTS = 2
# Long enough that the plain requests finish inside the tool call on a loaded 2-core box
# (at 2 s a filler finished 0.1 s after the tool at load 24); the simulator counts the same
# tokens and blocks for 2, 4 and 6 s.
TOOL_S = "5.0"
COUNTS = (
    "prefix_hit_tokens",
    "prefill_computed_tokens",
    "recompute_tokens",
    "offloaded_blocks",
    "uploaded_blocks",
)


def _bench(*args: str) -> Any:
    cmd = [sys.executable, str(BENCH), "--agents", str(AGENTS), "--tool-s", TOOL_S, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    if "--phase" in args:  # one JSON line, last (vLLM may print before it)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    return json.loads(proc.stdout)


def test_engine_and_simulator_agree_on_the_tokencake_path(tiny_model: Path, tmp_path: Path) -> None:
    daemon = DaemonProcess(tmp_path, f"fid{os.getpid()}")
    daemon.start()
    try:
        real = _bench(
            "--phase", "daemon", "--model", str(tiny_model), "--endpoint", daemon.endpoint
        )
    finally:
        daemon.stop()
    sim = _bench("--sim-only")["tokencake"]

    # What happened on the engine: kept at the tool's start, offloaded under the waiting
    # demand, the plain requests served during the tool calls, every prefix loaded back.
    rules = [d.split()[2] for d in real["decisions"]]
    assert rules.count("keep:no_pressure") == AGENTS
    assert rules.count("offload:stall_exceeds_round_trip") == AGENTS
    done = {rid: t for t, kind, rid in real["timeline"] if kind == "done"}
    added = {rid: t for t, kind, rid in real["timeline"] if kind == "add"}
    assert done["filler-0"] < added["a0-b"]
    assert real["recompute_tokens"] == 0
    assert real["offloaded_blocks"] == real["uploaded_blocks"] == AGENTS * 4
    # The simulator counts the same.
    assert {k: sim[k] for k in COUNTS} == {k: real[k] for k in COUNTS}
