"""The systemd notify protocol (READY=1, WATCHDOG=1, STOPPING=1) without libsystemd."""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


class SystemdNotifier:
    """Sends state strings to ``$NOTIFY_SOCKET`` when systemd started us; no-op otherwise."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self._address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            # The event loop sends these: a full receiver queue must never block it.
            self._sock.setblocking(False)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            # Ping at half the deadline, as sd_watchdog_enabled(3) recommends.
            self.watchdog_interval_s = int(usec) / 2e6

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, state: str) -> bool:
        if self._sock is None:
            return False
        try:
            self._sock.sendto(state.encode(), self._address)
            return True
        except BlockingIOError:
            logger.debug("sd_notify %s dropped: the receiver's queue is full", state)
            return False
        except OSError as exc:
            logger.warning("sd_notify %s failed: %s", state, exc)
            return False

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
