"""Fixtures for the SGLang backend tests: a real tokencaked and SGLang's real classes."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.common import sglang_env
from tests.procs import Proc, start

BACKEND_MODULE = "tokencake.connectors.sglang.backend"
_names = itertools.count(1)


@pytest.fixture(scope="package", autouse=True)
def restore_environ() -> Iterator[None]:
    """``import sglang`` points TORCHINDUCTOR_CACHE_DIR, TRITON_CACHE_DIR and others at its
    own cache dir (``os.environ.setdefault``); put the environment back for the tests that
    run after these in the same process (vLLM-CPU's compile cache among them)."""
    before = dict(os.environ)
    yield
    for key in set(os.environ) - set(before):
        del os.environ[key]
    os.environ.update(before)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    d = start(tmp_path_factory.mktemp("sglang"), arena="4MiB")
    yield d
    d.stop()


def extra_config(endpoint: str, **more: Any) -> dict[str, Any]:
    """The extra config a user passes, as SGLang's dynamic loader receives it."""
    return {
        "backend_name": "tokencake",
        "module_path": BACKEND_MODULE,
        "class_name": "TokenCakeStorage",
        "interface_v1": 1,
        "endpoint": endpoint,
        "engine_name": f"sglang-test-{next(_names)}",
        "timeout_ms": 2000,
        "prefault": False,
        **more,
    }


@pytest.fixture
def make_backend(
    daemon: Proc,
) -> Iterator[Callable[..., Any]]:
    """Builds a backend through SGLang's own factory and registers a real host pool."""
    sglang_env.import_sglang()
    from sglang.srt.mem_cache.storage import StorageBackendFactory

    made: list[Any] = []

    def make(pool: Any = None, endpoint: str = "", **extra: Any) -> Any:
        cfg = sglang_env.storage_config(extra_config(endpoint or daemon.endpoint, **extra))
        backend = StorageBackendFactory.create_backend("dynamic", cfg, None)
        backend.register_mem_pool_host(pool if pool is not None else sglang_env.host_pool())
        made.append(backend)
        return backend

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def tmp_sock(tmp_path: Path) -> str:
    return f"ipc://{tmp_path}/nobody.sock"
