"""Fixtures for the vLLM connector tests: a real tokencaked subprocess and a tiny model.

The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``) so a test can read
the scheduler-side connector's counters and the worker's KV tensors directly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.common.vllm_workload import DaemonProcess

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("vllm")
    from bench.common.vllm_models import build_tiny_llama

    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    pytest.importorskip("vllm")
    workdir = tmp_path_factory.mktemp("tcd")
    d = DaemonProcess(workdir, f"vt{os.getpid()}")
    d.start()
    yield d
    d.stop()
