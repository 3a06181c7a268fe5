"""Real tokencaked processes for the tests: daemons on any endpoint, that tests can stop
cleanly, kill -9, and restart on the same socket. The processes come from the package's
launcher (``tokencake.clients.launcher``); this adds the tests' defaults (a 16 MiB arena,
no metrics port, text logs in the test's directory)."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

from tokencake.clients.client import TokenCakeClient
from tokencake.clients.launcher import DaemonProcess, daemon_flags, spawn

Proc = DaemonProcess


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def spawn_daemon(
    tmp_path: Path,
    *args: str,
    endpoint: str = "",
    instance: str = "",
    env: dict[str, str] | None = None,
    arena: str = "16MiB",
    log_name: str = "",
) -> Proc:
    """Start ``python -m tokencake.daemon``; does not wait for it (see ``wait_ready``)."""
    return spawn(
        *daemon_flags(arena=arena),
        *args,
        endpoint=endpoint,
        instance=instance,
        workdir=tmp_path,
        log_path=tmp_path / log_name if log_name else None,
        env=env,
    )


def wait_ready(
    d: Proc, make_client: Callable[[], TokenCakeClient] | None = None, timeout: float = 20.0
) -> None:
    """Ping until it answers; ``LaunchError`` (a RuntimeError) with its log's tail if not."""
    d.wait_ready(timeout, make_client)


def start(tmp_path: Path, *args: str, **kwargs: object) -> Proc:
    d = spawn_daemon(tmp_path, *args, **kwargs)  # type: ignore[arg-type]
    wait_ready(d)
    return d


def wait_exit(d: Proc, timeout: float = 20.0) -> int:
    try:
        return d.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        d.stop()
        raise AssertionError(f"tokencaked did not exit:\n{d.log()}") from None
