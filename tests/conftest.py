"""Shared fixtures: a real tokencaked subprocess on a private ipc socket."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from tests.procs import Proc, start

# Every property test runs the same examples on every run: derandomized, no example
# database, no deadline (this machine's speed is not the property). Tests set only how many
# examples they draw, and any health check of their own.
settings.register_profile(
    "tokencake",
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("tokencake")


DaemonProcess = Proc


def start_daemon(
    tmp_path: Path, *extra: str, env: dict[str, str] | None = None, endpoint: str = ""
) -> DaemonProcess:
    """A ready daemon (it answered ``ping``) with JSON logs, on a private or given socket."""
    return start(tmp_path, *extra, "--log-json", env=env, endpoint=endpoint)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path)
    yield d
    d.stop()
