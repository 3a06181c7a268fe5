"""Shared fixtures: a real tokencaked subprocess on a private ipc socket."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tokencake.clients.client import DaemonUnavailable, TokenCakeClient


@dataclass
class DaemonProcess:
    proc: subprocess.Popen[bytes]
    endpoint: str
    socket_path: Path
    instance: str
    log_path: Path

    def client(self, timeout_s: float = 5.0) -> TokenCakeClient:
        return TokenCakeClient(self.endpoint, timeout_s=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_daemon(
    tmp_path: Path, *extra: str, env: dict[str, str] | None = None, endpoint: str = ""
) -> DaemonProcess:
    instance = f"t{uuid.uuid4().hex[:10]}"
    sock = Path(endpoint[len("ipc://") :]) if endpoint else tmp_path / f"{instance}.sock"
    endpoint = f"ipc://{sock}"
    log_path = tmp_path / f"{instance}.log"
    cmd = [
        sys.executable,
        "-m",
        "tokencake.daemon",
        "--endpoint",
        endpoint,
        "--instance",
        instance,
        "--arena-bytes",
        "16MiB",
        "--metrics-port",
        "0",
        *extra,
    ]
    full_env = dict(os.environ)
    full_env.update(env or {})
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    daemon = DaemonProcess(proc, endpoint, sock, instance, log_path)
    deadline = time.monotonic() + 20
    with TokenCakeClient(endpoint, timeout_s=0.5) as client:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"tokencaked exited {proc.returncode}:\n{daemon.log()}")
            try:
                client.ping()
                return daemon
            except DaemonUnavailable:
                if time.monotonic() > deadline:
                    daemon.stop()
                    raise RuntimeError(f"tokencaked did not answer:\n{daemon.log()}") from None
                time.sleep(0.05)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[DaemonProcess]:
    d = start_daemon(tmp_path)
    yield d
    d.stop()
