"""Fixtures: real redis-server processes (skipped with a reason where the binary is absent),
and the daemons a test starts (stopped after it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.l2.redis_procs import (
    MISSING,
    REDIS_CLI,
    REDIS_SERVER,
    VALKEY_MISSING,
    VALKEY_SERVER,
    RedisNode,
    start_node,
)
from tests.daemon.l2.redis_procs import start_cluster as _start_cluster
from tests.procs import Proc


@pytest.fixture
def redis_node(tmp_path: Path) -> Iterator[RedisNode]:
    if REDIS_SERVER is None:
        pytest.skip(MISSING)
    node = start_node(tmp_path)
    yield node
    node.stop()


@pytest.fixture
def valkey_node(tmp_path: Path) -> Iterator[RedisNode]:
    if VALKEY_SERVER is None:
        pytest.skip(VALKEY_MISSING)
    node = start_node(tmp_path, name="valkey", binary=VALKEY_SERVER)
    yield node
    node.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RedisNode]]:
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip(MISSING)
    nodes = _start_cluster(tmp_path_factory.mktemp("cluster"))
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture
def hosts() -> Iterator[list[Proc]]:
    """Daemons the test appends here are stopped after it."""
    started: list[Proc] = []
    yield started
    for d in started:
        d.stop()
