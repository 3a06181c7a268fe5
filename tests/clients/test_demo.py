"""The README's first command ends in this demo: it must keep working end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_offloads_uploads_and_verifies_bytes(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCAKE_")}
    # The embedded default, made private to this test: its own runtime dir (so its own
    # socket), no metrics port, a smaller arena so the pre-fault is quick.
    env.update(
        XDG_RUNTIME_DIR=str(tmp_path),
        TOKENCAKE_METRICS_PORT="0",
        TOKENCAKE_ARENA_BYTES="64MiB",
        TOKENCAKE_INSTANCE=f"demo{os.getpid()}",
    )
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
    assert not (tmp_path / "tokencake" / "tokencaked.sock").exists()
