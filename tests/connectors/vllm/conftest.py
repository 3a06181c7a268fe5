"""Fixtures for the vLLM connector tests: a real tokencaked subprocess and a tiny model.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so a test can read
the scheduler-side connector's counters and the worker's KV tensors directly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def daemon_argv(
    endpoint: str, instance: str, arena_bytes: str = "64MiB", policy: str = "tokencake"
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tokencake.daemon",
        "--endpoint",
        endpoint,
        "--arena-bytes",
        arena_bytes,
        "--instance",
        instance,
        "--metrics-port",
        "0",
        "--log-text",
        "--policy",
        policy,
    ]


class DaemonProcess:
    """tokencaked as a child process that a test can kill and start again."""

    def __init__(self, workdir: Path, instance: str, policy: str = "tokencake") -> None:
        self.policy = policy
        self.sock = workdir / "tokencaked.sock"
        self.endpoint = f"ipc://{self.sock}"
        self.instance = instance
        self.log = workdir / "tokencaked.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 20.0) -> None:
        from tokencake.clients.client import DaemonUnavailable, TokenCakeClient

        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                daemon_argv(self.endpoint, self.instance, policy=self.policy),
                stdout=log,
                stderr=log,
            )
        deadline = time.monotonic() + timeout_s
        with TokenCakeClient(self.endpoint, timeout_s=0.2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"tokencaked exited: {self.log.read_text()[-2000:]}")
                try:
                    client.ping()
                    return
                except DaemonUnavailable:
                    time.sleep(0.05)
        raise RuntimeError("tokencaked did not answer a ping in time")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


def shutdown_engine(llm: Any) -> None:
    """Shut an in-process engine down, including vLLM's process-wide worker connector, so a
    later engine in the same process builds its own instead of inheriting this one."""
    from vllm.distributed.kv_transfer.kv_transfer_state import ensure_kv_transfer_shutdown

    llm.llm_engine.engine_core.shutdown()
    ensure_kv_transfer_shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("vllm")
    from tests.connectors.vllm.fixtures import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    pytest.importorskip("vllm")
    workdir = tmp_path_factory.mktemp("tcd")
    d = DaemonProcess(workdir, f"vt{os.getpid()}")
    d.start()
    yield d
    d.stop()
