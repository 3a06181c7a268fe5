"""The README's first command ends in this demo: it must keep working end to end."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from click.testing import CliRunner

from tokencake.clients import ctl


def _private_env(tmp_path: Path) -> dict[str, str]:
    """The embedded default, made private to a test: its own runtime dir (so its own
    socket), no metrics port, a smaller arena so the pre-fault is quick."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCAKE_")}
    env.update(
        XDG_RUNTIME_DIR=str(tmp_path),
        TOKENCAKE_METRICS_PORT="0",
        TOKENCAKE_ARENA_BYTES="64MiB",
        TOKENCAKE_INSTANCE=f"demo{os.getpid()}",
    )
    return env


def test_demo_offloads_uploads_and_verifies_bytes(tmp_path: Path) -> None:
    env = _private_env(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "tokencake.clients.demo", "--apps", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    offloads = re.search(r"offloads applied:\s+(\d+) \((\d+) blocks", text)
    uploads = re.search(r"uploads applied:\s+(\d+) \((\d+) blocks", text)
    assert offloads and uploads, text
    assert int(offloads.group(1)) > 0 and int(uploads.group(1)) > 0
    assert re.search(r"bytes verified:\s+\d+ blocks, 0 mismatches", text)
    assert "tokencaked stopped" in text
    assert "inspect:" not in text  # the daemon is gone: nothing to inspect
    assert re.search(r"\(stall q=\d+\.\d{3}s, margin -?\d+\.\d{3}s, rule", text), text
    assert not (tmp_path / "tokencake" / "tokencaked.sock").exists()


def test_demo_keep_leaves_the_daemon_for_ctl(tmp_path: Path) -> None:
    env = _private_env(tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "tokencake.clients.demo", "--apps", "1", "--keep"],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    left = re.search(
        r"tokencaked left running \(pid (\d+), log (\S+)\); stop it with: kill", out.stdout
    )
    assert left, out.stdout
    pid, log = int(left.group(1)), Path(left.group(2))
    try:
        assert "inspect: " in out.stdout and "status | agents | decisions" in out.stdout
        endpoint = f"ipc://{tmp_path}/tokencake/tokencaked.sock"
        status = CliRunner().invoke(ctl.main, ["--endpoint", endpoint, "status"])
        assert status.exit_code == 0, status.output
        assert "apps          0 live, 1 ended" in status.output
        assert "agents        0 in live apps, 4 in ended apps" in status.output
    finally:
        os.kill(pid, signal.SIGTERM)
        for _ in range(200):  # not our child: wait for its socket to go
            if not (tmp_path / "tokencake" / "tokencaked.sock").exists():
                break
            time.sleep(0.05)
        log.unlink(missing_ok=True)
    assert not (tmp_path / "tokencake" / "tokencaked.sock").exists()
