"""systemd-analyze verify on the shipped unit (Debian's systemd package, installed by CI)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[1] / "systemd" / "tokencaked.service"


def test_unit_has_notify_watchdog_and_sandboxing() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "RuntimeDirectory=tokencake",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ):
        assert line in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    daemon = Path(sys.executable).with_name("tokencaked")
    assert daemon.exists(), "tokencaked console script is not installed"
    unit = tmp_path / "tokencaked.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/tokencaked", str(daemon)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "tokencaked.service" not in result.stderr, result.stderr
