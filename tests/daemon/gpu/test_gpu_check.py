"""``scripts/gpu-check.sh`` cannot rot unnoticed: its dry run (no GPU: the gpu tests skip,
the bench runs on the FAKE device) must pass here, and every gpu-marked test must be where
the script looks for them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "scripts" / "gpu-check.sh"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.mark.slow
def test_dry_run_passes_and_prints_one_summary() -> None:
    pytest.importorskip("torch")
    proc = _run("--dry-run")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    summary = out[out.index("== gpu-check summary (DRY RUN, fake device)") :]
    steps = ["python", "preinstalled", "install from wheels", "imports", "gpu-marked tests"]
    for step in [*steps, "bench/bench_gpu.py"]:
        assert re.search(rf"^{re.escape(step)}.* ok ", summary, re.M), summary
    assert "bench/bench_gpu.py on fake (FAKE: no real figure)" in summary
    for figure in ("engine store / pinned copy_", "CUDA IPC load / pinned copy_"):
        assert figure in summary
    assert "kernel slowdown from daemon-driven uploads" in summary
    assert "python 3." in out  # it says which Python it found


def test_bad_usage_is_exit_2() -> None:
    assert _run().returncode == 2  # the GPU run needs its wheel folder
    proc = _run("/nonexistent-wheels")
    assert proc.returncode == 2 and "no wheel folder" in proc.stderr


def test_every_gpu_test_is_where_the_script_runs_them() -> None:
    listed = re.search(r"^GPU_TESTS=\((.*)\)$", SCRIPT.read_text(), re.M)
    assert listed is not None
    roots = [ROOT / part for part in listed.group(1).split()]
    marked = [
        path for path in (ROOT / "tests").rglob("test_*.py") if "mark.gpu" in path.read_text()
    ]
    assert marked
    for path in marked:
        assert any(path == r or r in path.parents for r in roots), path
