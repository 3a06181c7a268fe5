"""Real tokencaked processes for the tests: daemons on any endpoint, that tests can stop
cleanly, kill -9, and restart on the same socket."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokencake.clients.client import DaemonUnavailable, TokenCakeClient


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    endpoint: str
    instance: str
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def socket_path(self) -> Path:
        return Path(self.endpoint.removeprefix("ipc://"))

    def client(self, timeout_s: float = 5.0) -> TokenCakeClient:
        return TokenCakeClient(self.endpoint, timeout_s=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill9(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


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
    instance = instance or f"r{uuid.uuid4().hex[:10]}"
    endpoint = endpoint or f"ipc://{tmp_path}/{instance}.sock"
    log_path = tmp_path / (log_name or f"{instance}-{time.monotonic_ns()}.log")
    cmd = [
        sys.executable,
        "-m",
        "tokencake.daemon",
        "--endpoint",
        endpoint,
        "--instance",
        instance,
        "--arena-bytes",
        arena,
        "--metrics-port",
        "0",
        "--log-text",
        *args,
    ]
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENCAKE_")}
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    return Proc(proc, endpoint, instance, log_path)


def wait_ready(
    d: Proc, make_client: Callable[[], TokenCakeClient] | None = None, timeout: float = 20.0
) -> None:
    deadline = time.monotonic() + timeout
    make = make_client or (lambda: TokenCakeClient(d.endpoint, timeout_s=0.5))
    with make() as client:
        while True:
            if d.proc.poll() is not None:
                raise RuntimeError(f"tokencaked exited {d.proc.returncode}:\n{d.log()}")
            try:
                client.ping()
                return
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    d.stop()
                    raise RuntimeError(f"tokencaked did not answer:\n{d.log()}") from None
                time.sleep(0.05)


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
