"""Fixtures for the vLLM connector tests: a real tokencaked subprocess and a tiny model.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so a test can read
the scheduler-side connector's counters and the worker's KV tensors directly.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


class DaemonProcess:
    """tokencaked as a child process that a test can kill and start again on one socket."""

    def __init__(self, workdir: Path, instance: str, policy: str = "tokencake") -> None:
        self.policy = policy
        self.workdir = workdir
        self.sock = workdir / "tokencaked.sock"
        self.endpoint = f"ipc://{self.sock}"
        self.instance = instance
        self.log = workdir / "tokencaked.log"
        self._daemon: Any = None

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self._daemon.proc if self._daemon is not None else None

    def start(self, timeout_s: float = 20.0) -> None:
        from tokencake.clients.launcher import daemon_flags, spawn

        self._daemon = spawn(
            *daemon_flags(arena="64MiB", policy=self.policy),
            endpoint=self.endpoint,
            instance=self.instance,
            workdir=self.workdir,
            log_path=self.log,
            inherit_settings=True,
        )
        self._daemon.wait_ready(timeout_s)

    def kill(self) -> None:
        if self._daemon is not None:
            self._daemon.kill9()
        self._daemon = None

    def stop(self) -> None:
        if self._daemon is not None:
            self._daemon.stop()
        self._daemon = None


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
