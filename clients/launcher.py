"""Start a ``tokencaked`` process, wait until it answers a ping, stop it cleanly.

The one launcher the tests, the benchmarks, the simulator's live mode and the demo use. The
daemon is configured the way a user configures it: command-line flags (``args``), a TOML
file (``config_file``) or ``TOKENCAKE_*`` variables (``env``); nothing here imports the
daemon. Its output goes to a log file, not a pipe, so a daemon left running outlives the
process that started it without blocking on a write nobody reads.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tokencake import protocol as p
from tokencake.clients.client import DaemonUnavailable, TokenCakeClient

DEFAULT_START_S = 20.0
LOG_TAIL_CHARS = 4000
"""How much of the daemon's log a ``LaunchError`` quotes."""
PING_INTERVAL_S = 0.05


class LaunchError(RuntimeError):
    """tokencaked exited or did not answer in time; the message ends with its log's tail."""


@dataclass
class DaemonProcess:
    """A running (or finished) ``python -m tokencake.daemon``."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    instance: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket_path(self) -> Path:
        """The socket file of an ``ipc://`` endpoint."""
        return Path(self.endpoint.removeprefix("ipc://"))

    def client(self, timeout_s: float = 5.0) -> TokenCakeClient:
        return TokenCakeClient(self.endpoint, timeout_s=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, chars: int = LOG_TAIL_CHARS) -> str:
        try:
            return self.log()[-chars:]
        except OSError as exc:
            return f"(log {self.log_path} unreadable: {exc})"

    def wait_ready(
        self,
        timeout_s: float = DEFAULT_START_S,
        make_client: Callable[[], TokenCakeClient] | None = None,
    ) -> None:
        """Ping until the daemon answers. Raises ``LaunchError`` (with the log's tail) when it
        exits first, or stops it and raises when ``timeout_s`` passes without an answer."""
        deadline = time.monotonic() + timeout_s
        make = make_client or (lambda: TokenCakeClient(self.endpoint, timeout_s=0.5))
        with make() as client:
            while True:
                if self.proc.poll() is not None:
                    raise LaunchError(
                        f"tokencaked exited {self.proc.returncode}:\n{self.log_tail()}"
                    )
                try:
                    client.call(p.Ping())
                    return
                except DaemonUnavailable:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise LaunchError(
                            f"tokencaked did not answer within {timeout_s:g} s:\n{self.log_tail()}"
                        ) from None
                    time.sleep(PING_INTERVAL_S)

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``; its exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


def spawn(
    *args: str,
    endpoint: str = "",
    instance: str | None = "",
    workdir: Path | None = None,
    log_path: Path | None = None,
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    inherit_settings: bool = False,
    detach: bool = False,
) -> DaemonProcess:
    """Start ``python -m tokencake.daemon --endpoint ENDPOINT --instance INSTANCE ARGS``.

    Does not wait (see ``DaemonProcess.wait_ready``). Without ``endpoint`` the daemon gets a
    socket of its own under ``workdir`` (a fresh temporary directory if none). The caller's
    ``TOKENCAKE_*`` variables are left out unless ``inherit_settings``; ``env`` is added on
    top. ``instance`` "" is a fresh unique name; None leaves it to the daemon's settings.
    ``detach`` starts it in a session of its own, to outlive the caller's terminal.
    """
    if instance == "":
        instance = f"d{uuid.uuid4().hex[:10]}"
    if workdir is None and not (endpoint and log_path):
        workdir = Path(tempfile.mkdtemp(prefix="tokencaked-"))
    name = instance or "tokencaked"
    endpoint = endpoint or f"ipc://{workdir}/{name}.sock"
    log_path = log_path or Path(f"{workdir}/{name}-{time.monotonic_ns()}.log")
    cmd = [sys.executable, "-m", "tokencake.daemon", "--endpoint", endpoint]
    if instance is not None:
        cmd += ["--instance", instance]
    if config_file is not None:
        cmd += ["--config", str(config_file)]
    cmd += list(args)
    full_env = {
        k: v for k, v in os.environ.items() if inherit_settings or not k.startswith("TOKENCAKE_")
    }
    full_env.update(env or {})
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env, start_new_session=detach
        )
    return DaemonProcess(proc, endpoint, instance or "", log_path)


def launch(*args: str, timeout_s: float = DEFAULT_START_S, **kwargs: object) -> DaemonProcess:
    """``spawn`` and wait until it answers a ping. Raises ``LaunchError``."""
    daemon = spawn(*args, **kwargs)  # type: ignore[arg-type]
    daemon.wait_ready(timeout_s)
    return daemon


@contextmanager
def running(
    *args: str, timeout_s: float = DEFAULT_START_S, **kwargs: object
) -> Iterator[DaemonProcess]:
    """A daemon for the ``with`` block; stopped (SIGTERM) when it ends."""
    daemon = spawn(*args, **kwargs)  # type: ignore[arg-type]
    try:
        daemon.wait_ready(timeout_s)
        yield daemon
    finally:
        daemon.stop()


def daemon_flags(
    *,
    arena: str | int | None = None,
    policy: str | None = None,
    metrics_port: int | None = 0,
    log_text: bool = True,
    log_level: str | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The usual flags, spelled once: arena size, policy, metrics port, log format."""
    flags: list[str] = []
    if arena is not None:
        flags += ["--arena-bytes", str(arena)]
    if policy is not None:
        flags += ["--policy", policy]
    if metrics_port is not None:
        flags += ["--metrics-port", str(metrics_port)]
    if log_text:
        flags.append("--log-text")
    if log_level is not None:
        flags += ["--log-level", log_level]
    return [*flags, *extra]
