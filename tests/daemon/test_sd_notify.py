from __future__ import annotations

import socket
import time
from pathlib import Path

from tokencake.daemon.sd_notify import SystemdNotifier


def test_disabled_without_notify_socket() -> None:
    n = SystemdNotifier({})
    assert not n.enabled and not n.notify("READY=1") and n.watchdog_interval_s is None


def test_watchdog_interval_is_half_the_deadline() -> None:
    n = SystemdNotifier({"WATCHDOG_USEC": "30000000"})
    assert n.watchdog_interval_s == 15.0
    assert (
        SystemdNotifier({"WATCHDOG_USEC": "1000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
    )


def test_a_receiver_that_never_reads_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "n.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    try:
        n = SystemdNotifier({"NOTIFY_SOCKET": str(path)})
        t0 = time.monotonic()
        sent = sum(n.notify("WATCHDOG=1") for _ in range(5000))
        assert time.monotonic() - t0 < 5.0
        assert 0 < sent < 5000  # the queue filled up and later messages were dropped
        assert listener.recv(64) == b"WATCHDOG=1"
        n.close()
    finally:
        listener.close()
